/* fuzz_route.c - libFuzzer harness for the route table and the peer-address table beside it:
 * fp_routes_new / _set / _del / _lookup / _count / _peer / _peer_subnets / _peer_count / _free
 * driven by a sequence of operations, each held to a brute-force model (a list of routes, every
 * answer found by scanning it):
 *   - set: 0 added / 1 replaced / -EINVAL (prefix_len > 32 or host bits set);
 *   - del: 0 / -ENOENT / -EINVAL;
 *   - lookup: the longest matching prefix's length and hop, or -ENOENT;
 *   - count: the model's size;
 *   - peer: -ENOENT for an IP that is no route's next hop, else whether the address lies in a
 *     subnet of a route naming it (routes replaced or deleted move subnets between peers);
 *   - peer_subnets: exactly the subnets of the routes naming the IP, each once, the first
 *     min(n, max) of them written and nothing past max; peer_count: distinct next-hop IPs.
 * Bulk inserts grow the table past several doublings, and deletions in the middle of probe
 * chains exercise the backward-shift deletion; at the end routes held are looked up again.
 * LeakSanitizer checks fp_routes_free. */
#include "fuzz.h"

#define MAX_ROUTES 400

typedef struct {
    uint32_t net, plen, ip;
    uint16_t port;
} route_t;

static route_t model[MAX_ROUTES];
static int nmodel;

static uint32_t mask_of(uint32_t plen) { return plen ? 0xffffffffu << (32 - plen) : 0; }

static int find(uint32_t net, uint32_t plen)
{
    for (int i = 0; i < nmodel; i++)
        if (model[i].net == net && model[i].plen == plen)
            return i;
    return -1;
}

static int ref_lookup(uint32_t addr, fp_hop *hop)
{
    int best = -1;
    for (int i = 0; i < nmodel; i++)
        if ((addr & mask_of(model[i].plen)) == model[i].net
            && (best < 0 || model[i].plen > model[best].plen))
            best = i;
    if (best < 0)
        return -ENOENT;
    hop->ip = model[best].ip;
    hop->port = model[best].port;
    return (int)model[best].plen;
}

/* Networks near each other, so that prefixes nest and hash chains collide. */
static uint32_t pick_net(fz_in *in)
{
    static const uint32_t pool[] = {
        0xc6130000u, 0xc6130100u, 0xc6130200u, 0xc6138000u, 0xc6138001u, 0x0a000000u,
        0x0a010000u, 0x00000000u, 0xffffffffu, 0xc0a80000u, 0xc6120000u, 0x80000000u,
    };
    uint8_t s = in_u8(in);
    if (s >= 0xc0)
        return in_u32(in);
    if (s >= 0x80) /* a /24 of 10.0.0.0/8 by number */
        return 0x0a000000u | (uint32_t)in_u16(in) << 8;
    return pool[s % (sizeof(pool) / sizeof(pool[0]))];
}

static uint32_t pick_plen(fz_in *in)
{
    static const uint8_t lens[] = { 24, 16, 32, 0, 8, 1, 31, 25, 33, 255 };
    uint8_t s = in_u8(in);
    return s >= 0xe0 ? in_u8(in) : lens[s % 10];
}

static void do_set(fp_routes *rt, uint32_t net, uint32_t plen, uint32_t ip, uint16_t port)
{
    if (nmodel >= MAX_ROUTES && find(net, plen) < 0)
        return; /* the model is full: add nothing more */
    int rc = fp_routes_set(rt, net, plen, ip, port);
    if (plen > 32 || (net & ~mask_of(plen))) {
        CHECK(rc == -EINVAL, "set %08x/%u: %d, want -EINVAL", net, plen, rc);
        return;
    }
    int at = find(net, plen);
    CHECK(rc == (at >= 0 ? 1 : 0), "set %08x/%u: %d, want %d", net, plen, rc, at >= 0);
    if (at >= 0) {
        model[at].ip = ip;
        model[at].port = port;
    } else {
        model[nmodel++] = (route_t){ net, plen, ip, port };
    }
}

static void do_del(fp_routes *rt, uint32_t net, uint32_t plen)
{
    int rc = fp_routes_del(rt, net, plen);
    if (plen > 32 || (net & ~mask_of(plen))) {
        CHECK(rc == -EINVAL, "del %08x/%u: %d, want -EINVAL", net, plen, rc);
        return;
    }
    int at = find(net, plen);
    CHECK(rc == (at >= 0 ? 0 : -ENOENT), "del %08x/%u: %d", net, plen, rc);
    if (at >= 0)
        model[at] = model[--nmodel];
}

static void do_peer(const fp_routes *rt, uint32_t ip, uint32_t addr)
{
    int known = 0, in = 0;
    for (int i = 0; i < nmodel; i++)
        if (model[i].ip == ip) {
            known = 1;
            in |= (addr & mask_of(model[i].plen)) == model[i].net;
        }
    int rc = fp_routes_peer(rt, ip, addr), want = known ? in : -ENOENT;
    CHECK(rc == want, "peer %08x, %08x: %d, want %d", ip, addr, rc, want);
}

static void do_peer_subnets(const fp_routes *rt, uint32_t ip, uint32_t max)
{
    int want = 0;
    for (int i = 0; i < nmodel; i++)
        want += model[i].ip == ip;
    uint32_t *nets = xmalloc(max * sizeof(uint32_t)), *plens = xmalloc(max * sizeof(uint32_t));
    int rc = fp_routes_peer_subnets(rt, ip, nets, plens, max);
    CHECK(rc == (want ? want : -ENOENT), "peer_subnets %08x: %d, want %d", ip, rc, want);
    for (uint32_t k = 0; rc > 0 && k < (uint32_t)rc && k < max; k++) {
        int at = find(nets[k], plens[k]);
        CHECK(at >= 0 && model[at].ip == ip, "peer_subnets %08x: %08x/%u names another peer", ip,
              nets[k], plens[k]);
        for (uint32_t j = 0; j < k; j++)
            CHECK(nets[j] != nets[k] || plens[j] != plens[k], "peer_subnets %08x: %08x/%u twice", ip,
                  nets[k], plens[k]);
    }
    free(nets);
    free(plens);
}

static void do_peer_count(const fp_routes *rt)
{
    int want = 0;
    for (int i = 0; i < nmodel; i++) {
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = model[j].ip == model[i].ip;
        want += !seen;
    }
    CHECK(fp_routes_peer_count(rt) == want, "peer_count %d, want %d", fp_routes_peer_count(rt), want);
}

/* Next hops: a few public IPs that many routes share (a peer with several subnets), or any. */
static uint32_t pick_peer(fz_in *in)
{
    static const uint32_t pool[] = { 0x7f000001u, 0x0a000001u, 0x0a000002u, 0xc0000201u, 0, 0xffffffffu };
    uint8_t s = in_u8(in);
    return s >= 0xc0 ? in_u32(in) : pool[s % 6];
}

static void do_lookup(const fp_routes *rt, uint32_t addr)
{
    fp_hop hop = { 0xdeadbeef, 0xbeef }, want = { 0, 0 };
    int rc = fp_routes_lookup(rt, addr, &hop), w = ref_lookup(addr, &want);
    CHECK(rc == w, "lookup %08x: %d, want %d", addr, rc, w);
    if (w >= 0)
        CHECK(hop.ip == want.ip && hop.port == want.port, "lookup %08x: hop %08x:%u, want %08x:%u",
              addr, hop.ip, hop.port, want.ip, want.port);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    nmodel = 0;
    fp_routes *rt = fp_routes_new();
    CHECK(rt != NULL, "fp_routes_new");
    while (in.n) {
        uint8_t op = in_u8(&in);
        switch (op % 11) {
        case 0: case 1: case 2: {
            uint32_t plen = pick_plen(&in), net = pick_net(&in);
            if (!(op & 0x80)) /* mostly a valid prefix */
                net &= plen <= 32 ? mask_of(plen) : 0xffffffffu;
            do_set(rt, net, plen, pick_peer(&in), in_u16(&in));
            break;
        }
        case 3: case 4: {
            uint32_t plen = pick_plen(&in), net = pick_net(&in);
            if (!(op & 0x80))
                net &= plen <= 32 ? mask_of(plen) : 0xffffffffu;
            if ((op & 0x40) && nmodel) { /* one that is there */
                int i = in_u16(&in) % nmodel;
                net = model[i].net;
                plen = model[i].plen;
            }
            do_del(rt, net, plen);
            break;
        }
        case 5: case 6: {
            uint32_t addr = pick_net(&in);
            if (op & 0x80)
                addr |= in_u8(&in);
            do_lookup(rt, addr);
            break;
        }
        case 7: { /* many /24s (or /32s) at once: the table grows */
            uint32_t base = 0x0b000000u | (uint32_t)in_u8(&in) << 16, k = 1 + in_u16(&in) % 300;
            uint32_t plen = op & 0x80 ? 32 : 24, step = plen == 32 ? 1 : 256;
            uint32_t peers = 1 + in_u8(&in) % 8; /* spread over this many next hops */
            for (uint32_t i = 0; i < k && nmodel < MAX_ROUTES; i++)
                do_set(rt, base + i * step, plen, 0x0a000000u + i % peers, (uint16_t)i);
            break;
        }
        case 8: { /* delete many, from wherever in the model */
            for (uint32_t k = 1 + in_u8(&in) % 64; k && nmodel; k--) {
                int i = (int)((k * 2654435761u) % (uint32_t)nmodel);
                do_del(rt, model[i].net, model[i].plen);
            }
            break;
        }
        case 9: { /* the peer table */
            uint32_t ip = pick_peer(&in);
            if ((op & 0x80) && nmodel)
                ip = model[in_u16(&in) % nmodel].ip;
            if (op & 0x40)
                do_peer_subnets(rt, ip, in_u8(&in) % 12);
            else
                do_peer(rt, ip, pick_net(&in) | (op & 0x20 ? in_u8(&in) : 0));
            break;
        }
        default:
            CHECK(fp_routes_count(rt) == nmodel, "count %d, want %d", fp_routes_count(rt), nmodel);
            do_peer_count(rt);
            break;
        }
    }
    CHECK(fp_routes_count(rt) == nmodel, "count %d, want %d", fp_routes_count(rt), nmodel);
    do_peer_count(rt);
    for (int i = 0; i < nmodel; i += 1 + nmodel / 32) {
        do_lookup(rt, model[i].net);
        do_lookup(rt, model[i].net | ~mask_of(model[i].plen));
        do_peer(rt, model[i].ip, model[i].net);
        do_peer_subnets(rt, model[i].ip, 1 + (uint32_t)i % 8);
    }
    fp_routes_free(rt);
    return 0;
}
