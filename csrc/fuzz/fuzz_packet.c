/* fuzz_packet.c - libFuzzer harness for the sans-IO core: fp_ctx_init, fp_checksum, fp_egress,
 * fp_ingress (and the route and peer-table lookups they make), held to a reference model
 * written from fastpath.h and the pure-Python twin (udpbackend/dataplane/packet.py):
 *   - the verdict and the one drop reason counted, in fastpath.h's order of checks, with the
 *     ingress source check (UNKNOWN_PEER first, SPOOFED_SOURCE / NOT_LOCAL after the header
 *     checks) in each FP_PEER_CHECK_* mode and egress fragmentation-needed for DF packets over
 *     the mtu;
 *   - a forwarded packet is the input trimmed to its total length, TTL exactly - 1, the header
 *     checksum as if recomputed from scratch, every other byte as it was (L4 checksum still
 *     valid), the hop the longest-prefix match gives;
 *   - an ICMP error is byte for byte the one RFC 792 describes (built here independently), IPv4
 *     and ICMP checksums valid, <= FP_REPLY_MAX bytes, and only when it may be sent (not about an
 *     ICMP error, a later fragment, a multicast or zero address, a token in the bucket);
 *   - the token bucket as the twin defines it; counters: exactly one drop per packet not
 *     forwarded, the ICMP counters as the replies, nothing else touched;
 *   - fp_checksum equals the naive RFC 1071 sum at any offset and length.
 * Input: a context recipe (mtu, ICMP bucket, local subnet, peer check), up to 4 extra routes,
 * then up to 8 packets (direction, time step, the datagram's source address, packet recipe:
 * see fuzz.h). */
#include "fuzz.h"

#define NS 1000000000ull

typedef struct {
    uint32_t net, plen, ip;
    uint16_t port;
} route_t;

static const route_t base_routes[] = {
    { 0xc6130000u, 16, 0x7f000001u, 8285 }, /* 198.19.0.0/16 */
    { 0xc6130200u, 24, 0x7f000001u, 0 },    /* 198.19.2.0/24 */
    { 0xc6138001u, 32, 0x0a000001u, 1 },    /* 198.19.128.1/32 */
};

static uint32_t mask_of(uint32_t plen) { return plen ? 0xffffffffu << (32 - plen) : 0; }

/* Longest match over the list (the later of equal prefixes: fp_routes_set replaces). */
static int ref_lookup(const route_t *r, int n, uint32_t addr, fp_hop *hop)
{
    int best = -1;
    for (int i = 0; i < n; i++)
        if ((addr & mask_of(r[i].plen)) == r[i].net && (best < 0 || r[i].plen >= r[best].plen))
            best = i;
    if (best < 0)
        return -1;
    hop->ip = r[best].ip;
    hop->port = r[best].port;
    return (int)r[best].plen;
}

/* The twin's token bucket (Context._take_token), step for step. */
typedef struct {
    uint32_t rate, burst, tokens;
    uint64_t last;
} bucket_t;

static int take_token(bucket_t *b, uint64_t now)
{
    if (b->rate == 0)
        return 0;
    uint64_t elapsed = now > b->last ? now - b->last : 0;
    if (elapsed >= NS) {
        b->tokens = b->burst;
        b->last = now;
    } else {
        uint64_t add = elapsed * b->rate / NS;
        if (add > 0) {
            uint64_t t = (uint64_t)b->tokens + add;
            b->tokens = (uint32_t)(t < b->burst ? t : b->burst);
            b->last += add * NS / b->rate;
        }
    }
    if (b->tokens == 0)
        return 0;
    b->tokens--;
    return 1;
}

/* The ICMP error about p[0:len] (RFC 792: header + 8 bytes quoted), built from scratch. */
static uint32_t ref_icmp(uint32_t local, const uint8_t *p, uint32_t len, uint8_t type,
                         uint8_t code, uint16_t mtu_field, uint8_t *out)
{
    uint32_t ihl = (uint32_t)(p[0] & 15) * 4;
    uint32_t quote = len < ihl + 8 ? len : ihl + 8;
    uint32_t total = 28 + quote;
    memset(out, 0, 28);
    out[0] = 0x45;
    s16(out + 2, (uint16_t)total);
    out[8] = FP_ICMP_TTL;
    out[9] = P_ICMP;
    s32(out + 12, local);
    memcpy(out + 16, p + 12, 4);
    s16(out + 10, ref_csum(out, 20));
    out[20] = type;
    out[21] = code;
    s16(out + 26, mtu_field);
    memcpy(out + 28, p, quote);
    s16(out + 22, ref_csum(out + 20, 8 + quote));
    return total;
}

/* RFC 1812 4.3.2.7 as fastpath.h states it. */
static int may_answer(const uint8_t *p, uint32_t len)
{
    uint32_t ihl = (uint32_t)(p[0] & 15) * 4;
    if (p[9] == P_ICMP) {
        if (ihl + 1 > len)
            return 0;
        uint8_t t = p[ihl];
        if (t == 3 || t == 4 || t == 5 || t == 11 || t == 12)
            return 0;
    }
    if (g16(p + 6) & 0x1fff)
        return 0;
    uint32_t src = g32(p + 12), dst = g32(p + 16);
    return !(src == 0 || src >= 0xe0000000u || dst >= 0xe0000000u);
}

typedef struct {
    int verdict;        /* FP_FORWARD / FP_REPLY / FP_DROP */
    int reason;         /* drop reason, or -1 */
    uint32_t len;       /* *len afterwards */
    uint32_t reply_len;
    uint8_t reply[FP_REPLY_MAX];
    int ratelimited;    /* an ICMP error was due but the bucket was empty */
    uint8_t icmp_type;
    fp_hop hop;
} ref_t;

static void ref_answer(ref_t *r, bucket_t *b, uint32_t local, const uint8_t *p, uint32_t len,
                       uint64_t now, uint8_t type, uint8_t code, uint16_t mtu_field)
{
    r->verdict = FP_DROP;
    if (!may_answer(p, len))
        return;
    if (!take_token(b, now)) {
        r->ratelimited = 1;
        return;
    }
    r->verdict = FP_REPLY;
    r->icmp_type = type;
    r->reply_len = ref_icmp(local, p, len, type, code, mtu_field, r->reply);
}

typedef struct {
    uint32_t local, mtu, local_net, local_mask, peer_check;
} conf_t;

/* fp_routes_peer over the list: -1 unknown peer, else 1 when addr is in a subnet naming it. */
static int ref_peer(const route_t *r, int n, uint32_t peer, uint32_t addr)
{
    int known = 0;
    for (int i = 0; i < n; i++) {
        if (r[i].ip != peer)
            continue;
        known = 1;
        if ((addr & mask_of(r[i].plen)) == r[i].net)
            return 1;
    }
    return known ? 0 : -1;
}

static ref_t ref_decide(int egress, const route_t *routes, int nroutes, bucket_t *b,
                        const conf_t *c, const uint8_t *p, uint32_t n, uint32_t src_ip,
                        uint64_t now)
{
    ref_t r = { .verdict = FP_DROP, .reason = -1, .len = n };
    uint32_t local = c->local, mtu = c->mtu;
    if (!egress && c->peer_check != FP_PEER_CHECK_OFF && ref_peer(routes, nroutes, src_ip, 0) < 0) {
        r.reason = FP_DROP_UNKNOWN_PEER;
        return r;
    }
    if (n < 20) { r.reason = FP_DROP_TOO_SHORT; return r; }
    if (p[0] >> 4 != 4) { r.reason = FP_DROP_NOT_IPV4; return r; }
    uint32_t ihl = (uint32_t)(p[0] & 15) * 4, tot = g16(p + 2);
    if (ihl < 20 || ihl > n || tot < ihl) { r.reason = FP_DROP_BAD_HEADER; return r; }
    if (tot > n) { r.reason = FP_DROP_TRUNCATED; return r; }
    r.len = tot;
    if (tot > mtu) {
        r.reason = FP_DROP_OVERSIZE;
        /* RFC 1191: fragmentation needed, the mtu as next-hop MTU, for DF and a good header */
        if (egress && (g16(p + 6) & 0x4000) && ref_csum(p, ihl) == 0)
            ref_answer(&r, b, local, p, tot, now, 3, 4, (uint16_t)mtu);
        return r;
    }
    if (ref_csum(p, ihl) != 0) { r.reason = FP_DROP_BAD_CHECKSUM; return r; }
    if (!egress && c->peer_check == FP_PEER_CHECK_STRICT) {
        uint32_t dst = g32(p + 16);
        if (ref_peer(routes, nroutes, src_ip, g32(p + 12)) != 1) {
            r.reason = FP_DROP_SPOOFED_SOURCE;
            return r;
        }
        if ((dst & c->local_mask) != c->local_net && dst != c->local) {
            r.reason = FP_DROP_NOT_LOCAL;
            return r;
        }
    }
    if (p[8] <= 1) {
        r.reason = FP_DROP_TTL_EXCEEDED;
        ref_answer(&r, b, local, p, tot, now, 11, 0, 0);
        return r;
    }
    if (egress && ref_lookup(routes, nroutes, g32(p + 16), &r.hop) < 0) {
        r.reason = FP_DROP_NO_ROUTE;
        ref_answer(&r, b, local, p, tot, now, 3, 0, 0);
        return r;
    }
    r.verdict = FP_FORWARD;
    return r;
}

static uint32_t pick_mtu(fz_in *in)
{
    static const uint32_t mtus[] = { 1400, 1400, 1500, 68, 576, 65535, 9000, 1280, 67, 65536, 0 };
    uint8_t s = in_u8(in);
    return s >= 0xf0 ? in_u32(in) : mtus[s % (sizeof(mtus) / sizeof(mtus[0]))];
}

static int check_ctx_init(fp_ctx *cx, const conf_t *c, uint32_t plen, uint32_t pp, uint32_t rate,
                          uint32_t burst)
{
    uint32_t local = c->local, mtu = c->mtu;
    memset(cx, 0xa5, sizeof(*cx));
    int rc = fp_ctx_init(cx, local, mtu, pp, rate, burst, c->local_net, plen, c->peer_check);
    int ok = mtu >= 68 && mtu <= 65535;
    ok = ok && plen <= 32 && !(c->local_net & ~mask_of(plen)) && c->peer_check <= FP_PEER_CHECK_STRICT;
    CHECK(rc == (ok ? 0 : -EINVAL), "fp_ctx_init(mtu=%u, %08x/%u, peer_check %u) returned %d",
          mtu, c->local_net, plen, c->peer_check, rc);
    if (!ok)
        return 0;
    CHECK(cx->local_net == c->local_net && cx->local_mask == mask_of(plen)
              && cx->peer_check == c->peer_check, "fp_ctx_init: local subnet or peer check");
    CHECK(cx->local_ip == local && cx->mtu == mtu && cx->per_packet == (pp != 0)
              && cx->icmp_rate == rate && cx->icmp_burst == burst && cx->icmp_tokens == burst
              && cx->icmp_last_ns == 0 && cx->udp_gso == 0 && cx->udp_gro == 0 && cx->vnet == 0,
          "fp_ctx_init left a field wrong");
    static const fp_stats zero;
    CHECK(memcmp(&cx->stats, &zero, sizeof(zero)) == 0, "fp_ctx_init left counters nonzero");
    return 1;
}

static void check_checksum(fz_in *in, const uint8_t *p, uint32_t n)
{
    CHECK(fp_checksum(p, n) == ref_csum(p, n), "fp_checksum over %u bytes", n);
    if (n == 0)
        return;
    uint32_t off = in_u8(in) % n, len = n - off;
    if (len)
        len -= in_u8(in) % len;
    CHECK(fp_checksum(p + off, len) == ref_csum(p + off, len),
          "fp_checksum over %u bytes at offset %u", len, off);
}

static uint64_t drops_total(const fp_dir_stats *d)
{
    uint64_t t = 0;
    for (int i = 0; i < FP_DROP_REASONS; i++)
        t += d->drops[i];
    return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    fp_ctx cx;
    uint32_t mtu = pick_mtu(&in), pp = in_u8(&in) & 1;
    static const uint32_t rates[] = { 1000, 0, 1, 10, 1000000000u, 3 };
    static const uint32_t bursts[] = { 100, 0, 1, 2, 5, 0xffffffffu };
    uint8_t rs = in_u8(&in), bs = in_u8(&in);
    uint32_t rate = rs >= 0xf0 ? in_u32(&in) : rates[rs % 6];
    uint32_t burst = bs >= 0xf0 ? in_u32(&in) : bursts[bs % 6];
    /* this node's subnet: 198.18.0.0/16 holds A_SRC, A_LOCAL, A_UNROUTED; or another */
    static const uint32_t lnets[] = { 0xc6120000u, 0xc6120500u, 0, 0xc6130000u, 0xc6120000u };
    static const uint32_t lplens[] = { 16, 24, 0, 16, 17 };
    uint8_t ls = in_u8(&in);
    conf_t c = { .local = A_LOCAL, .mtu = mtu, .local_net = lnets[ls % 5],
                 .peer_check = in_u8(&in) % 4 };
    uint32_t plen = lplens[ls % 5];
    if (ls >= 0xf0) { /* anything, host bits and all */
        plen = in_u8(&in) % 34;
        c.local_net = in_u32(&in);
        if (!(ls & 1))
            c.local_net &= mask_of(plen > 32 ? 32 : plen);
    }
    if (c.peer_check == 3 && (ls & 2))
        c.peer_check = in_u32(&in);
    if (!check_ctx_init(&cx, &c, plen, pp, rate, burst)) {
        c.mtu = mtu = 1400;
        c.local_net = 0xc6120000u;
        plen = 16;
        c.peer_check %= 3;
        CHECK(check_ctx_init(&cx, &c, plen, pp, rate, burst), "fp_ctx_init of a valid config");
    }
    c.local_mask = mask_of(plen);
    bucket_t bucket = { rate, burst, burst, 0 };

    /* routes: the base table and up to 4 more from the input */
    route_t routes[8];
    int nroutes = 0;
    fp_routes *rt = fp_routes_new();
    CHECK(rt != NULL, "fp_routes_new");
    for (size_t i = 0; i < sizeof(base_routes) / sizeof(base_routes[0]); i++) {
        routes[nroutes++] = base_routes[i];
        CHECK(fp_routes_set(rt, base_routes[i].net, base_routes[i].plen, base_routes[i].ip,
                            base_routes[i].port) == 0, "fp_routes_set base");
    }
    for (uint32_t k = in_u8(&in) % 5; k; k--) {
        uint32_t plen = in_u8(&in) % 33, net = pick_addr(&in) & mask_of(plen);
        route_t r = { net, plen, in_u32(&in), in_u16(&in) };
        int rc = fp_routes_set(rt, r.net, r.plen, r.ip, r.port);
        int replaced = 0;
        for (int i = 0; i < nroutes; i++)
            if (routes[i].net == net && routes[i].plen == plen) {
                routes[i] = r;
                replaced = 1;
            }
        CHECK(rc == replaced, "fp_routes_set(%08x/%u) returned %d", net, plen, rc);
        if (!replaced)
            routes[nroutes++] = r;
    }

    uint64_t now = in_u8(&in) >= 0x80 ? in_u64(&in) : 0;
    for (int k = 0; k < 8 && (k == 0 || in.n); k++) {
        uint8_t ctl = in_u8(&in);
        int egress = !(ctl & 1);
        switch ((ctl >> 1) % 4) { /* time steps: none, small, around a second, anything */
        case 1: now += in_u16(&in) * 1000ull; break;
        case 2: now += NS - 5000 + in_u16(&in) % 10000; break;
        case 3: now += in_u32(&in) * 64ull; break;
        default: break;
        }
        fz_geom g = { .mtu = mtu, .slot_size = mtu + 1, .proto = -1, .max_len = FP_IP_MAX_LEN + 2 };
        /* the datagram's source address: a peer (a route's next hop), or not */
        static const uint32_t srcs[] = { 0x7f000001u, 0x0a000001u, 0x7f000002u, 0 };
        uint8_t ss = in_u8(&in);
        uint32_t src_ip = ss >= 0xf0 ? in_u32(&in) : srcs[ss % 4];
        fz_pkt p = fz_build_ip(&in, &g);
        check_checksum(&in, p.buf, p.len);

        uint8_t *orig = dup_exact(p.buf, p.len);
        uint8_t *reply = xmalloc(FP_REPLY_MAX);
        uint32_t len = p.len, rlen = 0xdeadbeef;
        fp_hop hop = { 0xdeadbeef, 0xbeef };
        fp_stats before = cx.stats;
        ref_t r = ref_decide(egress, routes, nroutes, &bucket, &c, orig, p.len, src_ip, now);
        int v = egress ? fp_egress(&cx, rt, p.buf, &len, now, &hop, reply, &rlen)
                       : fp_ingress(&cx, rt, p.buf, &len, src_ip, now, reply, &rlen);
        const char *dir = egress ? "egress" : "ingress";

        CHECK(v == r.verdict, "%s verdict %d, want %d (reason %d, %u bytes)", dir, v, r.verdict,
              r.reason, p.len);
        CHECK(len == r.len, "%s: *len %u, want %u", dir, len, r.len);
        CHECK(len <= p.len, "%s: *len %u grew past %u", dir, len, p.len);

        /* counters: one drop for a packet not forwarded, ICMP counters as the replies */
        fp_dir_stats *st = egress ? &cx.stats.egress : &cx.stats.ingress;
        fp_dir_stats *bst = egress ? &before.egress : &before.ingress;
        uint64_t dd = drops_total(st) - drops_total(bst);
        CHECK(dd == (v == FP_FORWARD ? 0u : 1u), "%s: %llu drops counted for one packet", dir,
              (unsigned long long)dd);
        if (r.reason >= 0)
            CHECK(st->drops[r.reason] == bst->drops[r.reason] + 1, "%s: drop reason %d not counted",
                  dir, r.reason);
        CHECK(st->rx_packets == bst->rx_packets && st->tx_packets == bst->tx_packets
                  && st->batches == bst->batches,
              "%s: fp_egress/fp_ingress touched the pumps' counters", dir);
        fp_dir_stats *ost = egress ? &cx.stats.ingress : &cx.stats.egress;
        fp_dir_stats *obst = egress ? &before.ingress : &before.egress;
        CHECK(memcmp(ost, obst, sizeof(*ost)) == 0, "%s counted in the other direction", dir);
        uint64_t unreach = cx.stats.icmp_unreachable - before.icmp_unreachable;
        uint64_t texc = cx.stats.icmp_time_exceeded - before.icmp_time_exceeded;
        uint64_t limited = cx.stats.icmp_ratelimited - before.icmp_ratelimited;
        CHECK(unreach == (v == FP_REPLY && r.icmp_type == 3) && texc == (v == FP_REPLY && r.icmp_type == 11)
                  && limited == (uint64_t)r.ratelimited,
              "%s: ICMP counters +%llu/+%llu/+%llu", dir, (unsigned long long)unreach,
              (unsigned long long)texc, (unsigned long long)limited);
        CHECK(cx.icmp_tokens == bucket.tokens && cx.icmp_last_ns == bucket.last,
              "%s: token bucket %u@%llu, want %u@%llu", dir, cx.icmp_tokens,
              (unsigned long long)cx.icmp_last_ns, bucket.tokens, (unsigned long long)bucket.last);
        CHECK(cx.icmp_tokens <= cx.icmp_burst, "more tokens than the burst");

        if (v == FP_FORWARD) {
            CHECK(len >= 20 && len <= mtu, "%s: forwarded %u bytes, mtu %u", dir, len, mtu);
            CHECK(p.buf[8] == orig[8] - 1, "%s: TTL %u -> %u", dir, orig[8], p.buf[8]);
            CHECK(ref_ip_ok(p.buf, len), "%s: forwarded header checksum does not verify", dir);
            uint8_t *want = dup_exact(orig, p.len);
            want[8]--;
            set_ip_csum(want, len);
            CHECK(memcmp(want, p.buf, p.len) == 0,
                  "%s: forwarded bytes differ from the input's with TTL - 1 (checksum redone)", dir);
            free(want);
            if (ref_l4_ok(orig, len))
                CHECK(ref_l4_ok(p.buf, len), "%s: L4 checksum broken by forwarding", dir);
            if (egress)
                CHECK(hop.ip == r.hop.ip && hop.port == r.hop.port,
                      "egress hop %08x:%u, want %08x:%u", hop.ip, hop.port, r.hop.ip, r.hop.port);
        } else {
            CHECK(memcmp(orig, p.buf, p.len) == 0, "%s: a dropped packet was changed", dir);
        }
        if (v == FP_REPLY) {
            CHECK(rlen <= FP_REPLY_MAX && rlen == r.reply_len, "%s: reply of %u bytes, want %u",
                  dir, rlen, r.reply_len);
            CHECK(memcmp(reply, r.reply, rlen) == 0, "%s: ICMP error differs from RFC 792's", dir);
            CHECK(ref_ip_ok(reply, rlen) && ref_l4_ok(reply, rlen),
                  "%s: ICMP error checksums do not verify", dir);
        }
        free(orig);
        free(reply);
        free(p.buf);
    }
    fp_routes_free(rt);
    return 0;
}
