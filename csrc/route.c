/* route.c - the route table: IPv4 prefix -> next hop, longest-prefix match.
 * One open-addressing hash over (network, prefix length) plus the list of prefix lengths in
 * use, longest first: a lookup probes once per length in use, never scans the routes.
 * The only allocator of the fast path (on set, never per packet).  No syscalls. */
#include <stdlib.h>

#include "internal.h"

typedef struct {
    uint32_t net;
    uint32_t peer_ip;
    uint16_t peer_port;
    uint8_t plen;
    uint8_t used;
} slot_t;

struct fp_routes {
    slot_t *slots;
    uint32_t cap;               /* power of two */
    uint32_t count;
    uint32_t per_len[33];       /* routes per prefix length */
    uint8_t lens[33];           /* prefix lengths in use, longest first */
    uint32_t nlens;
};

static inline uint32_t mask_of(uint32_t plen) { return plen ? 0xffffffffu << (32 - plen) : 0; }

static inline uint32_t hash(uint32_t net, uint32_t plen)
{
    uint64_t h = ((uint64_t)net << 6 | plen) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(h >> 32);
}

fp_routes *fp_routes_new(void)
{
    fp_routes *rt = calloc(1, sizeof(*rt));
    if (!rt)
        return NULL;
    rt->cap = 16;
    rt->slots = calloc(rt->cap, sizeof(slot_t));
    if (!rt->slots) {
        free(rt);
        return NULL;
    }
    return rt;
}

void fp_routes_free(fp_routes *rt)
{
    if (rt) {
        free(rt->slots);
        free(rt);
    }
}

static int64_t find(const fp_routes *rt, uint32_t net, uint32_t plen)
{
    uint32_t m = rt->cap - 1;
    for (uint32_t i = hash(net, plen) & m;; i = (i + 1) & m) {
        const slot_t *s = &rt->slots[i];
        if (!s->used)
            return -1 - (int64_t)i;         /* not found: where it would go */
        if (s->net == net && s->plen == plen)
            return i;
    }
}

static int grow(fp_routes *rt)
{
    uint32_t ncap = rt->cap * 2;
    slot_t *ns = calloc(ncap, sizeof(slot_t));
    if (!ns)
        return -ENOMEM;
    slot_t *old = rt->slots;
    uint32_t ocap = rt->cap;
    rt->slots = ns;
    rt->cap = ncap;
    for (uint32_t i = 0; i < ocap; i++) {
        if (old[i].used) {
            int64_t at = find(rt, old[i].net, old[i].plen);
            rt->slots[-1 - at] = old[i];
        }
    }
    free(old);
    return 0;
}

static void relist_lens(fp_routes *rt)
{
    rt->nlens = 0;
    for (int l = 32; l >= 0; l--)
        if (rt->per_len[l])
            rt->lens[rt->nlens++] = (uint8_t)l;
}

static int check(uint32_t net, uint32_t plen)
{
    if (plen > 32 || (net & ~mask_of(plen)) != 0)
        return -EINVAL;
    return 0;
}

int fp_routes_set(fp_routes *rt, uint32_t net, uint32_t prefix_len, uint32_t peer_ip, uint16_t peer_port)
{
    int err = check(net, prefix_len);
    if (err)
        return err;
    int64_t at = find(rt, net, prefix_len);
    if (at >= 0) {
        rt->slots[at].peer_ip = peer_ip;
        rt->slots[at].peer_port = peer_port;
        return 1;
    }
    if ((rt->count + 1) * 2 > rt->cap) {   /* keep the load at or below one half */
        if ((err = grow(rt)) < 0)
            return err;
        at = find(rt, net, prefix_len);
    }
    slot_t *s = &rt->slots[-1 - at];
    s->net = net;
    s->plen = (uint8_t)prefix_len;
    s->peer_ip = peer_ip;
    s->peer_port = peer_port;
    s->used = 1;
    rt->count++;
    if (rt->per_len[prefix_len]++ == 0)
        relist_lens(rt);
    return 0;
}

int fp_routes_del(fp_routes *rt, uint32_t net, uint32_t prefix_len)
{
    int err = check(net, prefix_len);
    if (err)
        return err;
    int64_t at = find(rt, net, prefix_len);
    if (at < 0)
        return -ENOENT;
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    uint32_t m = rt->cap - 1, hole = (uint32_t)at;
    for (uint32_t i = (hole + 1) & m; rt->slots[i].used; i = (i + 1) & m) {
        uint32_t home = hash(rt->slots[i].net, rt->slots[i].plen) & m;
        /* move slot i into the hole unless its home lies cyclically in (hole, i] */
        if (((i - home) & m) >= ((i - hole) & m)) {
            rt->slots[hole] = rt->slots[i];
            hole = i;
        }
    }
    rt->slots[hole].used = 0;
    rt->count--;
    if (--rt->per_len[prefix_len] == 0)
        relist_lens(rt);
    return 0;
}

int fp_routes_lookup(const fp_routes *rt, uint32_t addr, fp_hop *hop)
{
    for (uint32_t k = 0; k < rt->nlens; k++) {
        uint32_t plen = rt->lens[k];
        int64_t at = find(rt, addr & mask_of(plen), plen);
        if (at >= 0) {
            hop->ip = rt->slots[at].peer_ip;
            hop->port = rt->slots[at].peer_port;
            return (int)plen;
        }
    }
    return -ENOENT;
}

int fp_routes_count(const fp_routes *rt) { return (int)rt->count; }
