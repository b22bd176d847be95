/* route.c - the route table: IPv4 prefix -> next hop, longest-prefix match, and beside it
 * the peer-address table the ingress source check reads: public IP -> the subnets of the
 * routes naming it, kept by the same fp_routes_set / fp_routes_del calls, never apart.
 * Routes: one open-addressing hash over (network, prefix length) plus the list of prefix
 * lengths in use, longest first: a lookup probes once per length in use, never scans.
 * Peers: one open-addressing hash over the public IP; a peer's subnets are a short list (one
 * in flannel, two while a lease moves), the first PEER_INLINE held in its slot.
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

#define PEER_INLINE 2

typedef struct {
    uint32_t net;
    uint32_t mask;
} psub_t;

/* One public IP: the subnets of the routes naming it, sub(p, i) for i < n (n == 0: free). */
typedef struct {
    uint32_t ip;
    uint32_t n;
    psub_t in[PEER_INLINE];     /* subnets 0..PEER_INLINE-1 */
    psub_t *more;               /* subnets PEER_INLINE..n-1, more_cap of them allocated */
    uint32_t more_cap;
} peer_t;

struct fp_routes {
    slot_t *slots;
    uint32_t cap;               /* power of two */
    uint32_t count;
    uint32_t per_len[33];       /* routes per prefix length */
    uint8_t lens[33];           /* prefix lengths in use, longest first */
    uint32_t nlens;
    peer_t *peers;              /* the peer-address table */
    uint32_t pcap;              /* power of two */
    uint32_t pcount;            /* distinct public IPs */
};

static inline uint32_t mask_of(uint32_t plen) { return plen ? 0xffffffffu << (32 - plen) : 0; }

static inline uint32_t hash(uint32_t net, uint32_t plen)
{
    uint64_t h = ((uint64_t)net << 6 | plen) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(h >> 32);
}

static inline uint32_t phash(uint32_t ip)
{
    return (uint32_t)(((uint64_t)ip * 0x9e3779b97f4a7c15ull) >> 32);
}

static inline psub_t *sub(peer_t *p, uint32_t i) { return i < PEER_INLINE ? &p->in[i] : &p->more[i - PEER_INLINE]; }
static inline const psub_t *csub(const peer_t *p, uint32_t i)
{
    return i < PEER_INLINE ? &p->in[i] : &p->more[i - PEER_INLINE];
}

fp_routes *fp_routes_new(void)
{
    fp_routes *rt = calloc(1, sizeof(*rt));
    if (!rt)
        return NULL;
    rt->cap = 16;
    rt->pcap = 16;
    rt->slots = calloc(rt->cap, sizeof(slot_t));
    rt->peers = calloc(rt->pcap, sizeof(peer_t));
    if (!rt->slots || !rt->peers) {
        free(rt->slots);
        free(rt->peers);
        free(rt);
        return NULL;
    }
    return rt;
}

void fp_routes_free(fp_routes *rt)
{
    if (rt) {
        for (uint32_t i = 0; i < rt->pcap; i++)
            free(rt->peers[i].more);
        free(rt->peers);
        free(rt->slots);
        free(rt);
    }
}

/* The peer slot of ip (>= 0), or -1 - the free slot where it would go. */
static int64_t pfind(const fp_routes *rt, uint32_t ip)
{
    uint32_t m = rt->pcap - 1;
    for (uint32_t i = phash(ip) & m;; i = (i + 1) & m) {
        const peer_t *p = &rt->peers[i];
        if (!p->n)
            return -1 - (int64_t)i;
        if (p->ip == ip)
            return i;
    }
}

static int pgrow(fp_routes *rt)
{
    uint32_t ncap = rt->pcap * 2;
    peer_t *np = calloc(ncap, sizeof(peer_t));
    if (!np)
        return -ENOMEM;
    peer_t *old = rt->peers;
    uint32_t ocap = rt->pcap;
    rt->peers = np;
    rt->pcap = ncap;
    for (uint32_t i = 0; i < ocap; i++)
        if (old[i].n)
            rt->peers[-1 - pfind(rt, old[i].ip)] = old[i];
    free(old);
    return 0;
}

/* Make room to add one subnet to ip's list: after 0, peer_add cannot fail. */
static int peer_reserve(fp_routes *rt, uint32_t ip)
{
    int64_t at = pfind(rt, ip);
    if (at < 0)
        return (rt->pcount + 1) * 2 > rt->pcap ? pgrow(rt) : 0;
    peer_t *p = &rt->peers[at];
    if (p->n < PEER_INLINE || p->n - PEER_INLINE < p->more_cap)
        return 0;
    uint32_t ncap = p->more_cap ? p->more_cap * 2 : 4;
    psub_t *nm = realloc(p->more, ncap * sizeof(psub_t));
    if (!nm)
        return -ENOMEM;
    p->more = nm;
    p->more_cap = ncap;
    return 0;
}

static void peer_add(fp_routes *rt, uint32_t ip, uint32_t net, uint32_t plen)
{
    int64_t at = pfind(rt, ip);
    peer_t *p;
    if (at < 0) {
        p = &rt->peers[-1 - at];
        memset(p, 0, sizeof(*p));
        p->ip = ip;
        rt->pcount++;
    } else {
        p = &rt->peers[at];
    }
    *sub(p, p->n++) = (psub_t){ .net = net, .mask = mask_of(plen) };
}

static void peer_remove(fp_routes *rt, uint32_t ip, uint32_t net, uint32_t plen)
{
    int64_t at = pfind(rt, ip);
    if (at < 0)
        return; /* cannot happen: every route's next hop is listed */
    peer_t *p = &rt->peers[at];
    uint32_t mask = mask_of(plen);
    for (uint32_t i = 0; i < p->n; i++) {
        if (sub(p, i)->net == net && sub(p, i)->mask == mask) {
            *sub(p, i) = *sub(p, p->n - 1);
            p->n--;
            break;
        }
    }
    if (p->n)
        return;
    free(p->more);
    p->more = NULL;
    p->more_cap = 0;
    rt->pcount--;
    /* Backward-shift deletion, as for routes (a slot is free when n == 0). */
    uint32_t m = rt->pcap - 1, hole = (uint32_t)at;
    for (uint32_t i = (hole + 1) & m; rt->peers[i].n; i = (i + 1) & m) {
        uint32_t home = phash(rt->peers[i].ip) & m;
        if (((i - home) & m) >= ((i - hole) & m)) {
            rt->peers[hole] = rt->peers[i];
            hole = i;
        }
    }
    memset(&rt->peers[hole], 0, sizeof(peer_t));
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
        uint32_t old_ip = rt->slots[at].peer_ip;
        if (old_ip != peer_ip) {           /* the subnet moves to another public IP */
            if ((err = peer_reserve(rt, peer_ip)) < 0)
                return err;
            peer_remove(rt, old_ip, net, prefix_len);
            peer_add(rt, peer_ip, net, prefix_len);
        }
        rt->slots[at].peer_ip = peer_ip;
        rt->slots[at].peer_port = peer_port;
        return 1;
    }
    /* Room first, in both tables, so that a refusal (-ENOMEM) leaves them as they were. */
    if ((err = peer_reserve(rt, peer_ip)) < 0)
        return err;
    if ((rt->count + 1) * 2 > rt->cap) {   /* keep the load at or below one half */
        if ((err = grow(rt)) < 0)
            return err;
        at = find(rt, net, prefix_len);
    }
    peer_add(rt, peer_ip, net, prefix_len);
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
    peer_remove(rt, rt->slots[at].peer_ip, net, prefix_len);
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

int fp_routes_peer(const fp_routes *rt, uint32_t peer_ip, uint32_t addr)
{
    int64_t at = pfind(rt, peer_ip);
    if (at < 0)
        return -ENOENT;
    const peer_t *p = &rt->peers[at];
    for (uint32_t i = 0; i < p->n; i++) {
        const psub_t *s = csub(p, i);
        if ((addr & s->mask) == s->net)
            return 1;
    }
    return 0;
}

int fp_routes_peer_subnets(const fp_routes *rt, uint32_t peer_ip, uint32_t *nets,
                           uint32_t *plens, uint32_t max)
{
    int64_t at = pfind(rt, peer_ip);
    if (at < 0)
        return -ENOENT;
    const peer_t *p = &rt->peers[at];
    for (uint32_t i = 0; i < p->n && i < max; i++) {
        nets[i] = csub(p, i)->net;
        plens[i] = (uint32_t)__builtin_popcount(csub(p, i)->mask);
    }
    return (int)p->n;
}

int fp_routes_peer_count(const fp_routes *rt) { return (int)rt->pcount; }
