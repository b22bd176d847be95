/* fuzz_pump.c - libFuzzer harness for the pumps over real fds: fp_tun_to_udp, fp_udp_to_tun,
 * fp_run, fp_serve and fp_udp_offloads.  An AF_UNIX SOCK_DGRAM socketpair stands in for the TUN
 * (one datagram per read, as tests/test_fastpath_io.py does) and UDP sockets on 127.0.0.1 carry
 * the overlay: a peer (127.0.0.1, the next hop of the routes), a stranger (127.0.0.2, no
 * route's next hop) and a blackhole route to port 0 whose every send fails.
 *
 * Each input is one scenario: a context (mtu, per-packet or batched, vnet headers, UDP GSO/GRO,
 * peer check, ICMP on or off), a batch geometry anywhere in (and just outside) what fastpath.h
 * allows - nslots 0..65, slot_size mtu..65537, aux absent / FP_AUX_MIN - 1 / FP_AUX_MIN, each
 * arena and aux a malloc of exactly nslots * slot_size / aux_size bytes - a budget, a driver
 * (the pump itself, fp_run or fp_serve), sometimes a full TUN (its queue towards the kernel
 * filled first, so that ICMP errors cannot be written), and packets: TUN frames (fuzz.h's packets, or
 * virtio-net super-packets) for egress, datagrams and UDP_SEGMENT trains from the peer or the
 * stranger for ingress.  The oracle is the sans-IO core, fuzzed on its own by the other
 * harnesses: what each input must become is worked out with fp_egress / fp_ingress /
 * fp_gso_split on a twin context (and the fastpath.h rules for truncation, oversize UDP and
 * failed sends).  Held to:
 *   - a geometry outside the contract: -EINVAL, nothing taken; inside it: never an access
 *     outside arena / aux (ASan), a return within the budget (plus fastpath.h's overshoot);
 *   - the datagrams at the peer, the frames written into the TUN and the ICMP errors sent back
 *     are exactly the model's, in order (merged TUN writes split again, as in fuzz_gro.c): so
 *     TTL exactly - 1, IPv4 and L4 checksums valid, lengths <= mtu;
 *   - counters: rx = the inputs (segments) taken, each counted exactly once as forwarded or as
 *     one drop reason, per reason as the model says; tx_bytes / rx_bytes; the batch histogram
 *     adds up to the batches.
 * But for one thing the project chose: a refused ICMP error counts a TX_ERROR drop on top of
 * its packet's drop (model_reply), so then rx + refused replies = tx + drops. */
#include "fuzz.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_IN 640          /* inputs (datagrams, segments of UDP_SEGMENT trains) per scenario */
#define MAX_ONE_BY_ONE 96   /* ...of them sent one syscall each */
#define MAX_OUT 3000        /* no more inputs once the model predicts this many outputs (the
                             * peer's receive buffer holds them all) */

static int tun_pump = -1, tun_test = -1;    /* the fake TUN: the pump's end, the kernel's end */
static int sock = -1, peer = -1, stranger = -1;
static int stop_fd = -1, ctl_fd = -1, ep_fd = -1;
static uint16_t peer_port;
static fp_routes *rt;
static uint8_t *rbuf;                       /* receive buffer for draining, 70000 bytes */

/* ---------------------------------------------------------------------------------------------
 * Set-up (once per process)
 * ------------------------------------------------------------------------------------------ */
static void big_buffers(int fd)
{
    int sz = 32 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof(sz)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof(sz)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
}

static int udp_bound(uint32_t ip)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0, "socket: %s", strerror(errno));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(ip) };
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "bind: %s", strerror(errno));
    big_buffers(fd);
    return fd;
}

static uint16_t port_of(int fd)
{
    struct sockaddr_in a;
    socklen_t l = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &l);
    return ntohs(a.sin_port);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    int sp[2];
    CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) == 0, "socketpair");
    tun_pump = sp[0];
    tun_test = sp[1];
    big_buffers(tun_pump);
    big_buffers(tun_test);
    sock = udp_bound(0x7f000001u);
    peer = udp_bound(0x7f000001u);
    stranger = udp_bound(0x7f000002u);
    peer_port = port_of(peer);
    stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ep_fd = epoll_create1(EPOLL_CLOEXEC);
    int fds[3] = { tun_pump, sock, ctl_fd };
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fds[i] };
        CHECK(epoll_ctl(ep_fd, EPOLL_CTL_ADD, fds[i], &ev) == 0, "epoll_ctl");
    }
    rt = fp_routes_new();
    fp_routes_set(rt, 0xc6130000u, 16, 0x7f000001u, peer_port); /* 198.19.0.0/16: the peer */
    fp_routes_set(rt, 0xc6130200u, 24, 0x7f000001u, 0);         /* 198.19.2.0/24: blackhole */
    rbuf = xmalloc(70000);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The model's outputs: byte strings in order
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    uint8_t **b;
    uint32_t *len;
    int *to_stranger;         /* ingress replies: which socket they go back to */
    uint32_t n, cap;
} blist;

static void bl_add(blist *l, const uint8_t *p, uint32_t n, const uint8_t *prefix, uint32_t pn)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->b = realloc(l->b, l->cap * sizeof(*l->b));
        l->len = realloc(l->len, l->cap * sizeof(*l->len));
        l->to_stranger = realloc(l->to_stranger, l->cap * sizeof(*l->to_stranger));
        CHECK(l->b && l->len && l->to_stranger, "out of memory");
    }
    uint8_t *c = xmalloc(pn + n);
    if (pn)
        memcpy(c, prefix, pn);
    memcpy(c + pn, p, n);
    l->b[l->n] = c;
    l->len[l->n] = pn + n;
    l->to_stranger[l->n] = 0;
    l->n++;
}

static void bl_free(blist *l)
{
    for (uint32_t i = 0; i < l->n; i++)
        free(l->b[i]);
    free(l->b);
    free(l->len);
    free(l->to_stranger);
    memset(l, 0, sizeof(*l));
}

/* Everything readable on fd now, appended to l. */
static void drain_into(int fd, blist *l)
{
    for (;;) {
        ssize_t r = recv(fd, rbuf, 70000, MSG_DONTWAIT);
        if (r < 0)
            return;
        if (l)
            bl_add(l, rbuf, (uint32_t)r, NULL, 0);
    }
}

static void drain_all(void)
{
    drain_into(tun_pump, NULL);
    drain_into(tun_test, NULL);
    drain_into(sock, NULL);
    drain_into(peer, NULL);
    drain_into(stranger, NULL);
    uint64_t v;
    while (read(stop_fd, &v, 8) == 8) {}
    while (read(ctl_fd, &v, 8) == 8) {}
}

/* Wait until fd has something to read or ms pass. */
static void wait_readable(int fd, int ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    poll(&p, 1, ms);
}

/* ---------------------------------------------------------------------------------------------
 * The scenario
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    uint32_t mtu, pp, vnet, want_off, peer_check, icmp_rate, nslots, slot_size, aux_size;
    int aux_null, arena_null, budget, driver, egress, linger;
    int tun_full;     /* the TUN's queue towards the kernel is full: writes into it fail */
} scen_t;

static scen_t S; /* the scenario running, for fz_context */

static void say_scenario(void)
{
    static const char *drivers[] = { "pump", "fp_run", "fp_serve" };
    fprintf(stderr, "  scenario: %s%s, mtu %u, %s%s, offloads want %u, peer_check %u, icmp %s, "
            "%u slots x %u, aux %u%s, budget %d, driver %s\n", S.egress ? "egress" : "ingress",
            S.tun_full ? " (TUN full)" : "",
            S.mtu, S.pp ? "per-packet" : "batched", S.vnet ? " vnet" : "", S.want_off, S.peer_check,
            S.icmp_rate ? "on" : "off", S.nslots, S.slot_size, S.aux_size, S.aux_null ? " (NULL)" : "",
            S.budget, drivers[S.driver]);
}

static uint64_t dsum(const fp_dir_stats *d)
{
    uint64_t t = 0;
    for (int i = 0; i < FP_DROP_REASONS; i++)
        t += d->drops[i];
    return t;
}

/* fastpath.h's fp_batch rules, for a batch that takes UDP receives or not. */
static int batch_ok(const scen_t *s, const fp_ctx *cx, int receiving)
{
    if (s->arena_null || s->nslots < 1 || s->nslots > FP_MAX_BATCH || s->slot_size > FP_MAX_SLOT
        || s->slot_size < s->mtu + 1)
        return 0;
    if (receiving && cx->udp_gro && s->slot_size < FP_UDP_MAX_PAYLOAD)
        return 0;
    if (cx->vnet && (s->aux_null || s->aux_size < FP_AUX_MIN
                     || (uint64_t)s->nslots * s->slot_size < FRAME_MAX))
        return 0;
    return 1;
}

static uint32_t pick_geom_slots(fz_in *in)
{
    static const uint32_t v[] = { 8, 1, 2, 64, 63, 16, 0, 65, 3, 32 };
    uint8_t s = in_u8(in);
    return s >= 0xf0 ? in_u8(in) % 66 : v[s % 10];
}

static uint32_t pick_slot_size(fz_in *in, uint32_t mtu)
{
    uint8_t s = in_u8(in);
    switch (s % 10) {
    case 1: return mtu;                       /* one short: -EINVAL */
    case 2: return FP_UDP_MAX_PAYLOAD;
    case 3: return FP_MAX_SLOT;
    case 4: return FP_MAX_SLOT + 1;           /* -EINVAL */
    case 5: return FP_UDP_MAX_PAYLOAD - 1;
    case 6: return mtu + 1 + in_u16(in) % (FP_MAX_SLOT - mtu);
    case 7: return mtu + 2;
    case 8: return (FRAME_MAX + 7) / 8;       /* 8 slots hold one frame exactly (and a bit) */
    default: return mtu + 1;
    }
}

/* What the scenario's inputs must become (the model), and what the pump did. */
typedef struct {
    uint32_t inputs;                 /* inputs taken (segments on the egress vnet path) */
    uint64_t rx_bytes, tx_bytes;
    uint64_t drops[FP_DROP_REASONS];
    uint32_t failed_replies;         /* ICMP errors the full TUN refused */
    blist fwd;                       /* egress: datagrams at the peer; ingress: packets into the TUN */
    blist replies;                   /* egress: frames into the TUN; ingress: ICMP to the sender */
} model_t;

static model_t M, G; /* the model, and what came out */

static void model_reset(void)
{
    bl_free(&M.fwd);
    bl_free(&M.replies);
    bl_free(&G.fwd);
    bl_free(&G.replies);
    M.inputs = M.failed_replies = 0;
    M.rx_bytes = M.tx_bytes = 0;
    memset(M.drops, 0, sizeof(M.drops));
}

static const uint8_t zero_vnet[FP_VNET_HDR_LEN];

/* An ICMP error the egress pump writes into the TUN: there, or refused by a full TUN.  A
 * refused reply counts a TX_ERROR drop on top of the drop (TTL_EXCEEDED, NO_ROUTE, OVERSIZE)
 * its packet was counted as - one input, two drops - as the twin's Pump does and
 * tests/test_fastpath_io.py's test_full_tun_costs_tx_error asserts. */
static void model_reply(const uint8_t *reply, uint32_t rl, int vnet)
{
    if (S.tun_full) {
        M.drops[FP_DROP_TX_ERROR]++;
        M.failed_replies++;
    } else {
        bl_add(&M.replies, reply, rl, zero_vnet, vnet ? FP_VNET_HDR_LEN : 0);
    }
}

/* One packet through fp_egress on the twin context: queued for the peer, or a reply. */
static void model_egress_one(fp_ctx *tw, uint8_t *p, uint32_t len, int vnet)
{
    uint8_t reply[FP_REPLY_MAX];
    uint32_t rl = 0;
    fp_hop hop;
    uint64_t before[FP_DROP_REASONS];
    memcpy(before, tw->stats.egress.drops, sizeof(before));
    M.inputs++;
    M.rx_bytes += len;
    int v = fp_egress(tw, rt, p, &len, 0, &hop, reply, &rl);
    for (int i = 0; i < FP_DROP_REASONS; i++)
        M.drops[i] += tw->stats.egress.drops[i] - before[i];
    if (v == FP_FORWARD) {
        if (hop.port == 0 || len > FP_UDP_MAX_PAYLOAD) {
            M.drops[FP_DROP_TX_ERROR]++; /* port 0, or more than a UDP datagram holds */
        } else {
            bl_add(&M.fwd, p, len, NULL, 0);
            M.tx_bytes += len;
        }
    } else if (v == FP_REPLY) {
        model_reply(reply, rl, vnet);
    }
}

static void model_egress_frame(fp_ctx *tw, const uint8_t *frame, uint32_t len, const scen_t *s)
{
    if (!s->vnet) {
        uint32_t n = len < s->slot_size ? len : s->slot_size; /* a read into one slot */
        uint8_t *p = dup_exact(frame, n);
        model_egress_one(tw, p, n, 0);
        free(p);
        return;
    }
    /* vnet: fp_gso_split, then fp_egress on each segment (fastpath.h: the fast path for a
     * super-packet is byte for byte the same) */
    uint32_t cap = len + FP_MAX_QUEUE * FP_SEG_HDR_MAX;
    uint8_t *out = xmalloc(cap);
    uint32_t *lens = xmalloc(FP_MAX_QUEUE * sizeof(uint32_t));
    int n = fp_gso_split(frame, len, s->mtu, out, cap, lens, FP_MAX_QUEUE);
    if (n < 0) {
        M.inputs++;
        M.rx_bytes += len > FP_VNET_HDR_LEN ? len - FP_VNET_HDR_LEN : 0;
        M.drops[n == -EMSGSIZE ? FP_DROP_OVERSIZE : FP_DROP_BAD_OFFLOAD]++;
        uint8_t reply[FP_REPLY_MAX];
        uint32_t rl = 0;
        if (n == -EMSGSIZE
            && fp_egress_too_big(tw, frame + FP_VNET_HDR_LEN, len - FP_VNET_HDR_LEN, 0, reply, &rl)
                   == FP_REPLY)
            model_reply(reply, rl, 1);
    } else {
        uint8_t *o = out;
        for (int k = 0; k < n; k++) {
            model_egress_one(tw, o, lens[k], 1);
            o += lens[k];
        }
    }
    free(out);
    free(lens);
}

/* One datagram (or GRO segment) through fp_ingress on the twin context. */
static void model_ingress_one(fp_ctx *tw, const uint8_t *d, uint32_t len, int from_stranger,
                              const scen_t *s)
{
    uint32_t src = from_stranger ? 0x7f000002u : 0x7f000001u;
    M.inputs++;
    M.rx_bytes += len; /* its real length, also when the kernel cut it */
    if (len > s->slot_size) { /* cut by the kernel: oversize, or the stranger refused first */
        int why = FP_DROP_OVERSIZE;
        if (tw->peer_check != FP_PEER_CHECK_OFF && fp_routes_peer(rt, src, 0) < 0)
            why = FP_DROP_UNKNOWN_PEER;
        M.drops[why]++;
        return;
    }
    uint8_t *p = dup_exact(d, len), reply[FP_REPLY_MAX];
    uint32_t l = len, rl = 0;
    uint64_t before[FP_DROP_REASONS];
    memcpy(before, tw->stats.ingress.drops, sizeof(before));
    int v = fp_ingress(tw, rt, p, &l, src, 0, reply, &rl);
    for (int i = 0; i < FP_DROP_REASONS; i++)
        M.drops[i] += tw->stats.ingress.drops[i] - before[i];
    if (v == FP_FORWARD && S.tun_full) {
        M.drops[FP_DROP_TX_ERROR]++; /* the write into the TUN refused: the one drop */
    } else if (v == FP_FORWARD) {
        bl_add(&M.fwd, p, l, NULL, 0);
        M.tx_bytes += l;
    } else if (v == FP_REPLY) {
        bl_add(&M.replies, reply, rl, NULL, 0);
        M.replies.to_stranger[M.replies.n - 1] = from_stranger;
    }
    free(p);
}

/* The TUN writes of the ingress vnet path, unmerged: each write is a zero header + a packet, or
 * a TCPV4 super-packet that fp_gso_split cuts back into the packets it carried (their IP id
 * and urgent pointer renumbered, which the comparison forgives). */
static void unmerge(const blist *writes, blist *pkts)
{
    for (uint32_t i = 0; i < writes->n; i++) {
        const uint8_t *w = writes->b[i];
        uint32_t wl = writes->len[i];
        CHECK(wl >= FP_VNET_HDR_LEN, "a TUN write of %u bytes has no virtio-net header", wl);
        if (memcmp(w, zero_vnet, FP_VNET_HDR_LEN) == 0) {
            bl_add(pkts, w + FP_VNET_HDR_LEN, wl - FP_VNET_HDR_LEN, NULL, 0);
            continue;
        }
        CHECK(w[0] == FP_VNET_F_NEEDS_CSUM && w[1] == FP_VNET_GSO_TCPV4 && gle16(w + 6) == 20
                  && gle16(w + 8) == 16 && wl - FP_VNET_HDR_LEN <= FP_IP_MAX_LEN
                  && ref_ip_ok(w + FP_VNET_HDR_LEN, wl - FP_VNET_HDR_LEN),
              "merged TUN write %u: bad virtio-net or IPv4 header", i);
        uint32_t cap = wl + FP_GSO_MAX_SEGS * FP_SEG_HDR_MAX;
        uint8_t *out = xmalloc(cap);
        uint32_t lens[FP_GSO_MAX_SEGS];
        uint8_t *frame = dup_exact(w, wl);
        int n = fp_gso_split(frame, wl, FP_IP_MAX_LEN, out, cap, lens, FP_GSO_MAX_SEGS);
        CHECK(n >= 2, "merged TUN write %u splits into %d", i, n);
        uint8_t *o = out;
        for (int k = 0; k < n; k++) {
            bl_add(pkts, o, lens[k], NULL, 0);
            o += lens[k];
        }
        free(frame);
        free(out);
    }
}

/* got == want, but for the IP id and TCP urgent pointer of packets that went through a merge. */
static int same_packet(const uint8_t *got, uint32_t gl, const uint8_t *want, uint32_t wl, int merged)
{
    if (gl != wl)
        return 0;
    if (memcmp(got, want, gl) == 0)
        return 1;
    if (!merged || gl < 40 || !ref_l4_ok(want, wl)) /* a merged packet had a valid checksum */
        return 0;
    uint8_t *q = dup_exact(want, wl);
    memcpy(q + 4, got + 4, 2);
    memcpy(q + 38, got + 38, 2);
    set_l4_csum(q, wl, 0);
    set_ip_csum(q, wl);
    int same = memcmp(got, q, gl) == 0;
    free(q);
    return same;
}

static void compare(const blist *got, const blist *want, const char *what, int merged)
{
    CHECK(got->n == want->n, "%s: %u, want %u", what, got->n, want->n);
    for (uint32_t i = 0; i < got->n; i++) {
        if (!same_packet(got->b[i], got->len[i], want->b[i], want->len[i], merged)) {
            uint32_t n = got->len[i] < want->len[i] ? got->len[i] : want->len[i];
            CHECK_SAME(got->b[i], want->b[i], n, "%s %u of %u differs (%u bytes, want %u)", what,
                       i, got->n, got->len[i], want->len[i]);
            CHECK(0, "%s %u of %u: %u bytes, want %u", what, i, got->n, got->len[i], want->len[i]);
        }
    }
}

/* Send one datagram from src_fd to the pump's socket; 0 if the kernel refused it. */
static int send_dgram(int src_fd, const uint8_t *p, uint32_t n)
{
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port_of(sock)),
                              .sin_addr.s_addr = htonl(0x7f000001u) };
    return sendto(src_fd, p, n, 0, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)n;
}

/* buf[0:total] as one UDP_SEGMENT message of gso-byte datagrams (the last may be shorter);
 * 0 if the kernel refused it. */
static int send_train(int src_fd, const uint8_t *buf, uint32_t total, uint32_t gso)
{
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port_of(sock)),
                              .sin_addr.s_addr = htonl(0x7f000001u) };
    struct iovec iov = { (void *)buf, total };
    union {
        char b[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } ctrl;
    struct msghdr h = { .msg_name = &to, .msg_namelen = sizeof(to), .msg_iov = &iov,
                        .msg_iovlen = 1, .msg_control = ctrl.b, .msg_controllen = sizeof(ctrl.b) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t g = (uint16_t)gso;
    memcpy(CMSG_DATA(c), &g, sizeof(g));
    return sendmsg(src_fd, &h, 0) == (ssize_t)total;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    scen_t s = { 0 };
    static const uint32_t mtus[] = { 1400, 1500, 9000, 65535, 68, 576, 1280, 16000 };
    uint8_t ms = in_u8(&in);
    s.mtu = ms >= 0xf0 ? 68 + in_u16(&in) % (65535 - 67) : mtus[ms % 8];
    uint8_t mode = in_u8(&in);
    s.egress = !(mode & 1);
    s.pp = (mode >> 1) & 1;
    s.vnet = !s.pp && ((mode >> 2) & 1);
    s.want_off = (mode >> 3) & 3;
    s.peer_check = (mode >> 5) % 3;
    s.icmp_rate = mode & 0x80 ? 0 : 1000000;
    uint8_t drv = in_u8(&in);
    s.driver = drv % 4 == 3 ? 2 : drv % 4 == 2 ? 1 : 0; /* pump, fp_run, fp_serve */
    s.tun_full = !s.vnet && (drv & 0x80);
    static const int budgets[] = { 64, 1, 2, 7, 1000, 3, 128, 0 };
    uint8_t bs = in_u8(&in);
    s.budget = bs >= 0xf8 ? (int)in_u16(&in) : budgets[bs % 8];
    if (s.budget == 0)
        s.budget = 1;
    s.nslots = pick_geom_slots(&in);
    s.slot_size = pick_slot_size(&in, s.mtu);
    uint8_t ax = in_u8(&in);
    s.aux_size = ax % 8 == 1 ? FP_AUX_MIN - 1 : ax % 8 == 2 ? FP_AUX_MIN + in_u16(&in) : FP_AUX_MIN;
    s.aux_null = ax % 8 == 3;
    s.arena_null = ax == 0xff;
    if (s.vnet && (ax & 0x80) && s.nslots >= 1 && s.nslots <= FP_MAX_BATCH) {
        /* mostly an arena a vnet frame fits in */
        uint32_t min = (FRAME_MAX + s.nslots - 1) / s.nslots;
        if (s.slot_size < min && min <= FP_MAX_SLOT)
            s.slot_size = min + (ax & 0x40 ? 0 : in_u16(&in) % 64);
    }

    /* the context, and its twin for the model */
    fp_ctx cx, tw;
    CHECK(fp_ctx_init(&cx, A_LOCAL, s.mtu, s.pp, s.icmp_rate, 1000000, 0xc6120000u, 16,
                      s.peer_check) == 0, "fp_ctx_init");
    int got = fp_udp_offloads(&cx, sock, s.want_off);
    CHECK(got >= 0 && (got & ~(int)s.want_off) == 0 && (!s.pp || got == 0)
              && cx.udp_gso == !!(got & FP_OFFLOAD_GSO) && cx.udp_gro == !!(got & FP_OFFLOAD_GRO),
          "fp_udp_offloads(want %u, per_packet %u) = %d, gso %u gro %u", s.want_off, s.pp, got,
          cx.udp_gso, cx.udp_gro);
    if (!cx.udp_gro) {
        int zero = 0;
        setsockopt(sock, SOL_UDP, UDP_GRO, &zero, sizeof(zero));
    }
    cx.vnet = s.vnet;
    tw = cx;

    /* the batches: each buffer exactly its size */
    uint64_t asz = (uint64_t)s.nslots * s.slot_size;
    fp_batch eb = { 0 }, ib = { 0 };
    uint8_t *ea = s.arena_null ? NULL : xmalloc(asz), *ia = s.arena_null ? NULL : xmalloc(asz);
    uint8_t *ex = s.aux_null ? NULL : xmalloc(s.aux_size), *ix = s.aux_null ? NULL : xmalloc(s.aux_size);
    eb = (fp_batch){ ea, s.slot_size, s.nslots, ex, s.aux_size };
    ib = (fp_batch){ ia, s.slot_size, s.nslots, ix, s.aux_size };
    int ok = batch_ok(&s, &cx, !s.egress);
    if (s.driver != 0 && !(batch_ok(&s, &cx, 0) && batch_ok(&s, &cx, 1)))
        s.driver = 0; /* fp_run / fp_serve: both batches valid (each pump is tested alone) */

    S = s;
    fz_context = say_scenario;
    /* the inputs, and the model of what they become */
    model_reset();
    uint32_t nin = 0;
    uint8_t kstate = in_u8(&in);
    uint32_t want_in = 1 + kstate % 12;
    if (s.tun_full) /* each refused write costs the pump a 5 ms wait */
        want_in = 1 + kstate % 2;
    for (uint32_t item = 0; item < want_in && nin < MAX_IN && M.fwd.n + M.replies.n < MAX_OUT;
         item++) {
        uint8_t rep = in_u8(&in);
        uint32_t copies = rep >= 0xf0 ? 1 + in_u8(&in) % 70 : 1;
        if (s.tun_full)
            copies = 1;
        if (s.egress) {
            uint8_t *f;
            uint32_t fl;
            if (s.vnet) {
                fz_frame fr = fz_build_frame(&in, s.mtu, FRAME_MAX);
                f = fr.buf;
                fl = fr.len;
            } else {
                fz_geom g = { .mtu = s.mtu, .slot_size = s.slot_size, .proto = -1,
                              .max_len = FP_IP_MAX_LEN };
                fz_pkt p = fz_build_ip(&in, &g);
                f = p.buf;
                fl = p.len;
            }
            for (uint32_t c = 0; c < copies && nin < MAX_ONE_BY_ONE && M.fwd.n < MAX_OUT; c++, nin++) {
                CHECK(send(tun_test, f, fl, 0) == (ssize_t)fl, "fake TUN refused %u bytes: %s", fl,
                      strerror(errno));
                model_egress_frame(&tw, f, fl, &s);
            }
            free(f);
        } else {
            int from_stranger = (rep & 7) == 1;
            int src_fd = from_stranger ? stranger : peer;
            fz_geom g = { .mtu = s.mtu, .slot_size = s.slot_size, .proto = -1,
                          .max_len = FP_UDP_MAX_PAYLOAD };
            if ((rep & 7) == 3 && !s.tun_full) { /* segments of one TCP flow: they may merge */
                uint32_t k = 1 + in_u8(&in) % 64, optw = rep & 0x10 ? 3 : 0;
                uint32_t mss = rep & 0x20 ? s.mtu - 40 - optw * 4 : 1 + in_u16(&in) % 1460;
                if (mss > 16000 || s.mtu < 40 + optw * 4 + 1)
                    mss = 1000;
                uint32_t last = mss - in_u16(&in) % mss, seq = in_u32(&in);
                int train = (rep & 8) && !s.pp;
                if (nin + k > MAX_IN)
                    k = MAX_IN - nin;
                while (train && k > 1 && (uint64_t)k * (40 + optw * 4 + mss) > FP_UDP_MAX_PAYLOAD)
                    k--;
                uint8_t *seg[64];
                uint32_t sl[64], total = 0;
                for (uint32_t i = 0; i < k; i++) {
                    uint8_t fl = T_ACK | (i == k - 1 && (rep & 0x40) ? T_PSH : 0);
                    seg[i] = fz_tcp_segment(i == k - 1 ? last : mss, seq, fl, (uint16_t)(7 + i), optw,
                                            (uint8_t)i, A_ROUTED, A_SRC, &sl[i]);
                    seq += i == k - 1 ? last : mss;
                    total += sl[i];
                }
                int sent = 0;
                if (train && total <= FP_UDP_MAX_PAYLOAD) {
                    uint8_t *buf = xmalloc(total);
                    for (uint32_t i = 0, at = 0; i < k; at += sl[i++])
                        memcpy(buf + at, seg[i], sl[i]);
                    sent = send_train(src_fd, buf, total, sl[0]);
                    free(buf);
                }
                for (uint32_t i = 0; i < k && nin < MAX_IN; i++, nin++) {
                    if (sent || send_dgram(src_fd, seg[i], sl[i]))
                        model_ingress_one(&tw, seg[i], sl[i], from_stranger, &s);
                }
                for (uint32_t i = 0; i < k; i++)
                    free(seg[i]);
                continue;
            }
            fz_pkt p = fz_build_ip(&in, &g);
            if ((rep & 7) == 2 && p.len > 0 && !s.pp && !s.tun_full) { /* a UDP_SEGMENT train */
                uint32_t k = 1 + in_u8(&in) % 64;
                fz_pkt q = fz_build_ip(&in, &g);
                uint32_t ll = q.len <= p.len ? q.len : 0;
                if ((uint64_t)p.len * k + ll > FP_UDP_MAX_PAYLOAD)
                    k = (FP_UDP_MAX_PAYLOAD - ll) / p.len;
                if (nin + k + 1 > MAX_IN)
                    k = 0;
                uint8_t *buf = xmalloc((size_t)p.len * k + ll);
                for (uint32_t i = 0; i < k; i++)
                    memcpy(buf + (size_t)i * p.len, p.buf, p.len);
                if (ll)
                    memcpy(buf + (size_t)k * p.len, q.buf, ll);
                int sent = k >= 1 && send_train(src_fd, buf, p.len * k + ll, p.len);
                free(buf);
                if (sent) {
                    for (uint32_t i = 0; i < k; i++)
                        model_ingress_one(&tw, p.buf, p.len, from_stranger, &s);
                    if (ll)
                        model_ingress_one(&tw, q.buf, ll, from_stranger, &s);
                    nin += k + (ll != 0);
                } else {
                    nin++;
                }
                free(q.buf);
            } else {
                for (uint32_t c = 0; c < copies && nin < MAX_ONE_BY_ONE; c++, nin++)
                    if (send_dgram(src_fd, p.buf, p.len))
                        model_ingress_one(&tw, p.buf, p.len, from_stranger, &s);
            }
            free(p.buf);
        }
    }

    /* a full TUN: the pump's end may queue no more towards the kernel */
    uint32_t filler = 0;
    if (s.tun_full) {
        int small = 4096;
        setsockopt(tun_pump, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
        static const uint8_t junk[1000];
        while (send(tun_pump, junk, sizeof(junk), MSG_DONTWAIT) == (ssize_t)sizeof(junk))
            filler++;
    }

    /* run */
    fp_stats before = cx.stats;
    fp_dir_stats *st = s.egress ? &cx.stats.egress : &cx.stats.ingress;
    fp_dir_stats *bst = s.egress ? &before.egress : &before.ingress;
    if (!ok) {
        int rc = s.egress ? fp_tun_to_udp(&cx, rt, &eb, tun_pump, sock, s.budget)
                          : fp_udp_to_tun(&cx, rt, &ib, sock, tun_pump, s.budget);
        CHECK(rc == -EINVAL, "a batch outside fastpath.h's rules (%u x %u, aux %u%s): %d", s.nslots,
              s.slot_size, s.aux_size, s.aux_null ? " NULL" : "", rc);
        CHECK(memcmp(&cx.stats, &before, sizeof(before)) == 0, "-EINVAL, yet something was counted");
        drain_all();
        goto out;
    }
    if (s.driver == 1) { /* fp_run: one round, stop_fd already readable */
        uint64_t one = 1;
        CHECK(write(stop_fd, &one, 8) == 8, "eventfd");
        int rc = fp_run(&cx, rt, &eb, &ib, tun_pump, sock, stop_fd, s.budget);
        CHECK(rc == 0, "fp_run: %d", rc);
        while (read(stop_fd, &one, 8) == 8) {}
    } else if (s.driver == 2) { /* fp_serve: until nothing moves (or ctl_fd says stop) */
        if (kstate & 0x80) {
            uint64_t one = 1;
            CHECK(write(ctl_fd, &one, 8) == 8, "eventfd");
        }
        int rc = fp_serve(&cx, rt, &eb, &ib, tun_pump, sock, ep_fd, ctl_fd, s.budget, 0);
        CHECK(rc >= 0, "fp_serve: %d", rc);
        uint64_t v;
        while (read(ctl_fd, &v, 8) == 8) {}
    }
    /* then the pump itself until every input is taken */
    int bound = s.budget;
    if (s.egress && s.vnet)
        bound += FP_MAX_QUEUE; /* a super-packet is taken whole */
    if (!s.egress && cx.udp_gro)
        bound += (128 - 1) * (s.budget < (int)s.nslots ? s.budget : (int)s.nslots);
    for (int tries = 0; st->rx_packets - bst->rx_packets < M.inputs && tries < 2000; tries++) {
        int rc = s.egress ? fp_tun_to_udp(&cx, rt, &eb, tun_pump, sock, s.budget)
                          : fp_udp_to_tun(&cx, rt, &ib, sock, tun_pump, s.budget);
        CHECK(rc >= 0 && rc <= bound, "pump returned %d (budget %d)", rc, s.budget);
        if (rc == 0)
            wait_readable(s.egress ? tun_pump : sock, 1);
    }
    CHECK(st->rx_packets - bst->rx_packets == M.inputs, "taken %llu inputs, want %u",
          (unsigned long long)(st->rx_packets - bst->rx_packets), M.inputs);

    /* collect what came out */
    if (s.egress) {
        for (int t = 0; t < 2000 && G.fwd.n < M.fwd.n; t++) {
            drain_into(peer, &G.fwd);
            if (G.fwd.n < M.fwd.n)
                wait_readable(peer, 1);
        }
        drain_into(peer, &G.fwd);
        drain_into(tun_test, &G.replies);
        if (s.tun_full) { /* the filler, and nothing the pump wrote */
            CHECK(G.replies.n == filler, "a full TUN took %u writes", G.replies.n - filler);
            bl_free(&G.replies);
        }
        compare(&G.fwd, &M.fwd, "datagrams at the peer", 0);
        compare(&G.replies, &M.replies, "ICMP errors into the TUN", 0);
        for (uint32_t i = 0; i < G.fwd.n; i++)
            CHECK(G.fwd.len[i] <= s.mtu && ref_ip_ok(G.fwd.b[i], G.fwd.len[i]),
                  "datagram %u: %u bytes (mtu %u), header checksum", i, G.fwd.len[i], s.mtu);
    } else {
        blist writes = { 0 };
        drain_into(tun_test, &writes);
        if (s.tun_full) { /* the filler, and nothing the pump wrote */
            CHECK(writes.n == filler, "a full TUN took %u writes", writes.n - filler);
            bl_free(&writes);
        }
        if (s.vnet) {
            unmerge(&writes, &G.fwd);
            bl_free(&writes);
        } else {
            bl_free(&G.fwd);
            G.fwd = writes;
        }
        compare(&G.fwd, &M.fwd, "packets into the TUN", s.vnet);
        uint32_t want_p = 0, want_s = 0;
        for (uint32_t i = 0; i < M.replies.n; i++) {
            if (M.replies.to_stranger[i])
                want_s++;
            else
                want_p++;
        }
        blist gp = { 0 }, gs = { 0 }, mp = { 0 }, ms2 = { 0 };
        for (int t = 0; t < 2000 && (gp.n < want_p || gs.n < want_s); t++) {
            drain_into(peer, &gp);
            drain_into(stranger, &gs);
            if (gp.n < want_p || gs.n < want_s)
                wait_readable(gp.n < want_p ? peer : stranger, 1);
        }
        for (uint32_t i = 0; i < M.replies.n; i++)
            bl_add(M.replies.to_stranger[i] ? &ms2 : &mp, M.replies.b[i], M.replies.len[i], NULL, 0);
        compare(&gp, &mp, "ICMP errors at the peer", 0);
        compare(&gs, &ms2, "ICMP errors at the stranger", 0);
        bl_free(&gp); bl_free(&gs); bl_free(&mp); bl_free(&ms2);
        for (uint32_t i = 0; i < G.fwd.n; i++)
            CHECK(G.fwd.len[i] <= s.mtu && ref_ip_ok(G.fwd.b[i], G.fwd.len[i]),
                  "packet %u into the TUN: %u bytes (mtu %u), header checksum", i, G.fwd.len[i], s.mtu);
    }

    /* counters */
    uint64_t rx = st->rx_packets - bst->rx_packets, tx = st->tx_packets - bst->tx_packets;
    uint64_t dr = dsum(st) - dsum(bst);
    /* every input counted once, as forwarded or as one drop (refused replies: model_reply) */
    CHECK(rx + M.failed_replies == tx + dr, "rx %llu != tx %llu + drops %llu", (unsigned long long)rx,
          (unsigned long long)tx, (unsigned long long)dr);
    CHECK(tx == M.fwd.n, "tx_packets %llu, want %u", (unsigned long long)tx, M.fwd.n);
    for (int i = 0; i < FP_DROP_REASONS; i++)
        CHECK(st->drops[i] - bst->drops[i] == M.drops[i], "drop reason %d: %llu, want %llu", i,
              (unsigned long long)(st->drops[i] - bst->drops[i]), (unsigned long long)M.drops[i]);
    CHECK(st->tx_bytes - bst->tx_bytes == M.tx_bytes && st->rx_bytes - bst->rx_bytes == M.rx_bytes,
          "bytes: tx %llu want %llu, rx %llu want %llu",
          (unsigned long long)(st->tx_bytes - bst->tx_bytes), (unsigned long long)M.tx_bytes,
          (unsigned long long)(st->rx_bytes - bst->rx_bytes), (unsigned long long)M.rx_bytes);
    uint64_t hist = 0;
    for (int i = 0; i < FP_HIST_BUCKETS; i++)
        hist += st->batch_hist[i] - bst->batch_hist[i];
    CHECK(hist == st->batches - bst->batches, "batch histogram adds up to %llu, batches %llu",
          (unsigned long long)hist, (unsigned long long)(st->batches - bst->batches));
    CHECK(rx == 0 || st->batches > bst->batches, "inputs taken in no batch");
    drain_all();

out:
    if (s.tun_full) {
        drain_all();
        int big = 32 << 20;
        setsockopt(tun_pump, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big));
    }
    free(ea); free(ia); free(ex); free(ix);
    model_reset();
    return 0;
}
