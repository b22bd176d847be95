/* io.c - the only file with syscalls: the two pumps, fp_tun_to_udp and fp_udp_to_tun,
 * composed from the sans-IO verdicts of packet.c, the transforms of offload.c and the route
 * table of route.c.  It reads, cuts, queues and sends; every forwarding decision is packet.c's.
 * Never blocks for long (non-blocking fds, a 5 ms wait at most when the socket is full);
 * counts every syscall, batch and outcome in cx->stats.
 *
 * Plain TUN (no virtio-net headers), and every per-packet mode:
 *   Outbound (TUN -> UDP), one round:
 *     1. read up to nslots packets from the TUN into the batch's slots, one read(2) each,
 *        stop at EAGAIN;
 *     2. fp_egress decides each: forward (own next hop), reply (ICMP into the TUN), drop;
 *     3. one sendmmsg(2) for everything forwarded, runs coalesced into UDP_SEGMENT messages
 *        with udp_gso (per-packet mode: sendto(2) each).
 *   Inbound (UDP -> TUN), one round:
 *     1. one recvmmsg(2) of up to nslots messages, a UDP_GRO message split into its
 *        datagrams (per-packet mode: recvfrom(2));
 *     2. fp_ingress decides each: forward -> one write(2) into the TUN each (a TUN has no
 *        batch write without vnet headers); reply (time exceeded) -> sendto(2) the sender.
 * vnet TUN (IFF_VNET_HDR, batched only): every read and write carries a virtio-net header.
 *   Outbound (tun_to_udp_vnet): one read(2) per frame, frames one after another in the
 *     arena; fp_egress_super decides a super-packet once for all its segments, which are
 *     sent as headers (in aux) + payload (where the read put it); any other frame is cut by
 *     fp_gso_split into aux and decided segment by segment by fp_egress.  Segments wait in a
 *     send queue (txq_t) across reads; txq_flush sends them with sendmmsg(2) (as step 3
 *     above) when the arena, aux or the queue runs short, and at the end of the call.
 *   Inbound: as without vnet headers, then the forwarded packets of the round are merged by
 *     fp_gro_coalesce_spans (headers into aux, payloads left in the arena): one writev(2)
 *     per merged run or lone packet. */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <sys/uio.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define SEND_WAIT_MS 5
/* Room kept for the segments of the next frame on the egress vnet path (queue entries and
 * headers in aux) before it is read: a 64 KiB super-packet at an MSS of 512 or more; one cut
 * into more segments sends the queue mid-frame. */
#define ROOM_SEGS 128

typedef union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} ctrl_t;

int fp_udp_offloads(fp_ctx *cx, int udp_fd, uint32_t want)
{
    uint32_t got = 0;
    cx->udp_gso = cx->udp_gro = 0;
    if (cx->per_packet)
        return 0;
    if (want & FP_OFFLOAD_GSO) {
        int v = 0;
        socklen_t l = sizeof(v);
        if (getsockopt(udp_fd, SOL_UDP, UDP_SEGMENT, &v, &l) == 0) {
            cx->udp_gso = 1;
            got |= FP_OFFLOAD_GSO;
        }
    }
    if (want & FP_OFFLOAD_GRO) {
        int one = 1;
        if (setsockopt(udp_fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0) {
            cx->udp_gro = 1;
            got |= FP_OFFLOAD_GRO;
        }
    }
    return (int)got;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_addr(struct sockaddr_in *sa, uint32_t ip, uint16_t port)
{
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_addr.s_addr = htonl(ip);
    sa->sin_port = htons(port);
}

/* fp_batch's rules (fastpath.h); receiving: the batch takes UDP receives. */
static int check_batch(const fp_ctx *cx, const fp_batch *b, int receiving)
{
    if (!b->arena || b->nslots < 1 || b->nslots > FP_MAX_BATCH || b->slot_size > FP_MAX_SLOT
        || b->slot_size < cx->mtu + 1)
        return -EINVAL;
    if (receiving && cx->udp_gro && b->slot_size < FP_UDP_MAX_PAYLOAD)
        return -EINVAL;
    if (cx->vnet && (!b->aux || b->aux_size < FP_AUX_MIN
                     || (uint64_t)b->nslots * b->slot_size < FRAME_MAX))
        return -EINVAL;
    return 0;
}

static void count_batch(fp_dir_stats *st, uint32_t n)
{
    st->batches++;
    st->batch_hist[hist_bucket(n)]++;
}

/* Wait until fd is writable; 1 if it is, 0 on timeout.  Counted as a poll syscall. */
static int wait_writable(fp_ctx *cx, int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    cx->stats.syscalls[FP_SYS_POLL]++;
    return poll(&p, 1, SEND_WAIT_MS) > 0;
}

/* One counted read from the TUN: the byte count, or -1 at EAGAIN or on a failure (then *err
 * is -errno).  EINTR is retried. */
static ssize_t tun_read(fp_ctx *cx, int fd, uint8_t *buf, uint32_t size, int *err)
{
    for (;;) {
        cx->stats.syscalls[FP_SYS_READ]++;
        ssize_t r = read(fd, buf, size);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            *err = -errno;
        return -1;
    }
}

/* Send one datagram of niov pieces (sendto for one, as flannel's loop does; sendmsg for
 * more); a full socket gets one wait of up to SEND_WAIT_MS and one retry.  0 sent, -1
 * dropped. */
static int send_one_iov(fp_ctx *cx, int fd, struct iovec *iov, uint32_t niov,
                        const struct sockaddr_in *to)
{
    struct msghdr h = { .msg_name = (void *)to, .msg_namelen = sizeof(*to), .msg_iov = iov,
                        .msg_iovlen = niov };
    for (int tries = 0; tries < 2; tries++) {
        ssize_t r;
        do {
            cx->stats.syscalls[FP_SYS_SENDTO]++;
            r = niov == 1 ? sendto(fd, iov[0].iov_base, iov[0].iov_len, MSG_DONTWAIT,
                                   (const struct sockaddr *)to, sizeof(*to))
                          : sendmsg(fd, &h, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r >= 0)
            return 0;
        if (errno != EAGAIN || tries == 1 || !wait_writable(cx, fd))
            return -1;
    }
    return -1;
}

static int send_one(fp_ctx *cx, int fd, const uint8_t *buf, uint32_t len, const struct sockaddr_in *to)
{
    struct iovec v = { .iov_base = (void *)buf, .iov_len = len };
    return send_one_iov(cx, fd, &v, 1, to);
}

/* Datagrams queued for one send: datagram k is the dg[k].niov iovecs from iov[dg[k].iov0]
 * (the first holds at least the IPv4 header and the L4 port word), dg[k].len bytes in all.
 * Without vnet headers every datagram is one iovec; on the vnet path a split segment is two
 * (its own headers in b->aux, its payload left where the TUN read put it). */
typedef struct {
    uint32_t iov0, niov, len;
} dgram_t;

/* One counted writev into the TUN; a full queue gets one wait of up to SEND_WAIT_MS and one
 * retry.  0 written, -1 refused. */
static int tun_writev(fp_ctx *cx, int fd, const struct iovec *v, int nv)
{
    for (int tries = 0; tries < 2; tries++) {
        ssize_t r;
        do {
            cx->stats.syscalls[FP_SYS_WRITE]++;
            r = nv == 1 ? write(fd, v[0].iov_base, v[0].iov_len) : writev(fd, v, nv);
        } while (r < 0 && errno == EINTR);
        if (r >= 0)
            return 0;
        if (errno != EAGAIN || tries == 1 || !wait_writable(cx, fd))
            return -1;
    }
    return -1;
}

/* Write one packet into the TUN (behind a zero virtio-net header when cx->vnet).  A packet
 * already carrying its header (vnet_included) is written as it is.  0 written, -1 refused. */
static int tun_write(fp_ctx *cx, int fd, const uint8_t *buf, uint32_t len, int vnet_included)
{
    uint8_t zero_hdr[FP_VNET_HDR_LEN] = {0};
    struct iovec v[2] = {
        { .iov_base = (void *)zero_hdr, .iov_len = FP_VNET_HDR_LEN },
        { .iov_base = (void *)buf, .iov_len = len },
    };
    int with_hdr = cx->vnet && !vnet_included;
    return tun_writev(cx, fd, with_hdr ? v : v + 1, with_hdr ? 2 : 1);
}

/* sendmmsg everything in msgs[0:n] (message k carries the pkts[k] datagrams from
 * dg[first[k]]), retrying partial sends; counts what went out and returns the datagrams that
 * did not. */
static uint32_t send_batch(fp_ctx *cx, int fd, struct mmsghdr *msgs, const uint32_t *pkts,
                           const uint32_t *first, const dgram_t *dg, struct iovec *iov,
                           uint32_t n, fp_dir_stats *st)
{
    uint32_t done = 0, failed = 0;
    int waited = 0;
    while (done < n) {
        cx->stats.syscalls[FP_SYS_SENDMMSG]++;
        int r = sendmmsg(fd, msgs + done, n - done, MSG_DONTWAIT);
        if (r > 0) {
            for (int i = 0; i < r; i++) {
                st->tx_packets += pkts[done + i];
                st->tx_bytes += msgs[done + i].msg_len;
                if (pkts[done + i] > 1)
                    cx->stats.gso_sends++;
            }
            done += (uint32_t)r;
            waited = 0;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN && !waited) {
            waited = 1;
            if (wait_writable(cx, fd))
                continue;
        }
        if (errno == EAGAIN)
            break;
        /* The first remaining message was refused.  A coalesced run (EIO: device without
         * checksum offload; EINVAL/EMSGSIZE: a path MTU below the segment size) is sent again
         * one datagram at a time, and EIO stops coalescing for good; a single datagram
         * (ENETUNREACH, EPERM from a firewall...) is dropped.  Then go on with the rest. */
        if (pkts[done] > 1) {
            if (errno == EIO)
                cx->udp_gso = 0;
            struct msghdr *h = &msgs[done].msg_hdr;
            for (uint32_t k = first[done]; k < first[done] + pkts[done]; k++) {
                if (send_one_iov(cx, fd, &iov[dg[k].iov0], dg[k].niov, h->msg_name) == 0) {
                    st->tx_packets++;
                    st->tx_bytes += dg[k].len;
                } else {
                    failed++;
                }
            }
        } else {
            failed++;
        }
        done++;
    }
    while (done < n)
        failed += pkts[done++];
    return failed;
}

static int same_hop(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
    return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* The inner flow of a queued IPv4 packet (validated by fp_egress): addresses, protocol and,
 * for TCP/UDP packets that are not fragments, the port word.  A GSO message holds one flow
 * only, so the receiver's steering (fp_reuseport_steer), which sees a merged message's first
 * packet, cannot send part of a flow to another queue. */
static int same_flow(const struct iovec *a, const struct iovec *b)
{
    const uint8_t *p = a->iov_base, *q = b->iov_base;
    if (memcmp(p + IP_OFF_PROTO, q + IP_OFF_PROTO, 1) || memcmp(p + IP_OFF_SRC, q + IP_OFF_SRC, 8))
        return 0;
    if (p[IP_OFF_PROTO] != 6 && p[IP_OFF_PROTO] != 17)
        return 1;
    uint32_t ha = (p[0] & 0xfu) * 4, hb = (q[0] & 0xfu) * 4;
    int frag_a = (rd16(p + IP_OFF_FRAG) & IP_FRAG_BITS) != 0, frag_b = (rd16(q + IP_OFF_FRAG) & IP_FRAG_BITS) != 0;
    if (frag_a || frag_b)
        return frag_a == frag_b;
    if (a->iov_len < ha + 4 || b->iov_len < hb + 4)
        return a->iov_len < ha + 4 && b->iov_len < hb + 4;
    return memcmp(p + ha, q + hb, 4) == 0;
}

/* Turn the nsend queued datagrams into messages: one each, or with udp_gso one per run of
 * consecutive datagrams of one inner flow to one peer, all of one size but a shorter last.
 * Message k carries pkts[k] datagrams from dg[first[k]]. */
static uint32_t build_msgs(fp_ctx *cx, struct iovec *iov, const dgram_t *dg,
                           struct sockaddr_in *to, uint32_t nsend, struct mmsghdr *msgs,
                           uint32_t *pkts, uint32_t *first, ctrl_t *ctrl)
{
    uint32_t nmsg = 0;
    for (uint32_t i = 0; i < nsend;) {
        uint32_t j = i + 1;
        size_t seg = dg[i].len, bytes = seg;
        if (cx->udp_gso) {
            while (j < nsend && j - i < FP_GSO_MAX_SEGS && same_hop(&to[j], &to[i])
                   && same_flow(&iov[dg[j].iov0], &iov[dg[i].iov0]) && dg[j].len <= seg
                   && bytes + dg[j].len <= FP_UDP_MAX_PAYLOAD) {
                bytes += dg[j].len;
                if (dg[j++].len < seg)
                    break;
            }
        }
        struct msghdr *h = &msgs[nmsg].msg_hdr;
        memset(&msgs[nmsg], 0, sizeof(msgs[nmsg]));
        h->msg_iov = &iov[dg[i].iov0];
        h->msg_iovlen = dg[j - 1].iov0 + dg[j - 1].niov - dg[i].iov0;
        h->msg_name = &to[i];
        h->msg_namelen = sizeof(to[i]);
        if (j - i > 1) {
            h->msg_control = ctrl[nmsg].buf;
            h->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t gso = (uint16_t)seg;
            memcpy(CMSG_DATA(c), &gso, sizeof(gso));
        }
        first[nmsg] = i;
        pkts[nmsg++] = j - i;
        i = j;
    }
    return nmsg;
}

/* The send queue of the egress vnet path: datagrams cut from frames read one after another
 * into the arena (payloads left there, in arena[0:roff]) and built in b->aux (aux[0:used]),
 * sent together by txq_flush.  Datagram k is dg[k].niov iovecs from iov[dg[k].iov0]. */
typedef struct {
    struct mmsghdr msgs[FP_MAX_QUEUE];
    struct iovec iov[2 * FP_MAX_QUEUE];
    dgram_t dg[FP_MAX_QUEUE];
    struct sockaddr_in to[FP_MAX_QUEUE];
    uint32_t pkts[FP_MAX_QUEUE], first[FP_MAX_QUEUE];
    ctrl_t ctrl[FP_MAX_QUEUE];
    uint32_t nq, niov;           /* datagrams and iovecs queued */
    uint32_t used;               /* bytes of b->aux holding queued bytes, <= aux_size */
    uint32_t roff;               /* bytes of the arena holding queued frames, <= its size */
    uint32_t taken;              /* packets taken in since the last flush: one batch */
} txq_t;

static void txq_reset(txq_t *q) { q->nq = q->niov = q->used = q->roff = q->taken = 0; }

/* Queue one datagram to hop: the head_len bytes at head, then (pay != NULL) the pay_len bytes
 * at pay.  The first piece holds the IPv4 header and the L4 port word (same_flow). */
static void txq_push(txq_t *q, const fp_hop *hop, uint8_t *head, uint32_t head_len,
                     uint8_t *pay, uint32_t pay_len)
{
    dgram_t *d = &q->dg[q->nq];
    d->iov0 = q->niov;
    d->niov = pay ? 2 : 1;
    d->len = head_len + (pay ? pay_len : 0);
    q->iov[q->niov++] = (struct iovec){ .iov_base = head, .iov_len = head_len };
    if (pay)
        q->iov[q->niov++] = (struct iovec){ .iov_base = pay, .iov_len = pay_len };
    set_addr(&q->to[q->nq++], hop->ip, hop->port);
}

/* Send everything queued (one sendmmsg, UDP_SEGMENT runs with udp_gso), count the batch, and
 * empty the queue; arena and aux are free again but for arena[0:keep] (a frame being cut). */
static void txq_flush(fp_ctx *cx, txq_t *q, int udp_fd, uint32_t keep)
{
    fp_dir_stats *st = &cx->stats.egress;
    if (q->nq) {
        uint32_t nmsg = build_msgs(cx, q->iov, q->dg, q->to, q->nq, q->msgs, q->pkts, q->first,
                                   q->ctrl);
        st->drops[FP_DROP_TX_ERROR] +=
            send_batch(cx, udp_fd, q->msgs, q->pkts, q->first, q->dg, q->iov, nmsg, st);
    }
    if (q->taken)
        count_batch(st, q->taken);
    txq_reset(q);
    q->roff = keep;
}

/* Room for the next frame without a flush: the largest frame behind the queued ones in the
 * arena; in aux a whole packet (the general path copies) and ROOM_SEGS segment headers;
 * ROOM_SEGS queue entries. */
static int txq_room(const txq_t *q, const fp_batch *b)
{
    return q->roff <= b->nslots * b->slot_size - FRAME_MAX
           && b->aux_size - q->used >= FP_IP_MAX_LEN + ROOM_SEGS * FP_SEG_HDR_MAX
           && FP_MAX_QUEUE - q->nq >= ROOM_SEGS;
}

/* The general egress vnet path for the frame at frame[0:len] (ending at fend in the arena):
 * fp_gso_split into aux, then fp_egress on each segment, as on a TUN without vnet headers -
 * forward (queued), reply (ICMP into the TUN), drop; a frame that cannot be cut is one drop.
 * Returns the packets taken in. */
static uint32_t egress_each(fp_ctx *cx, const fp_routes *rt, txq_t *q, fp_batch *b,
                            const uint8_t *frame, uint32_t len, uint32_t fend, int tun_fd,
                            int udp_fd)
{
    fp_dir_stats *st = &cx->stats.egress;
    uint32_t seg_lens[FP_MAX_QUEUE];
    uint8_t reply[FP_REPLY_MAX];
    int n = fp_gso_split(frame, len, cx->mtu, b->aux + q->used, b->aux_size - q->used, seg_lens,
                         FP_MAX_QUEUE - q->nq);
    if (n == -ENOSPC && q->nq) {
        txq_flush(cx, q, udp_fd, fend);
        n = fp_gso_split(frame, len, cx->mtu, b->aux, b->aux_size, seg_lens, FP_MAX_QUEUE);
    }
    if (n < 0) {
        st->rx_packets++;
        st->rx_bytes += len > FP_VNET_HDR_LEN ? len - FP_VNET_HDR_LEN : 0;
        st->drops[n == -EMSGSIZE ? FP_DROP_OVERSIZE : FP_DROP_BAD_OFFLOAD]++;
        /* A super-packet cut into segments over the mtu (a TUN MTU above the path's): the
         * sender learns the mtu from fragmentation needed, as for a plain packet. */
        uint32_t rlen = 0;
        if (n == -EMSGSIZE
            && fp_egress_too_big(cx, frame + FP_VNET_HDR_LEN, len - FP_VNET_HDR_LEN, now_ns(),
                                 reply, &rlen) == FP_REPLY
            && tun_write(cx, tun_fd, reply, rlen, 0) < 0)
            st->drops[FP_DROP_TX_ERROR]++;
        return 1;
    }
    if (frame[1] != FP_VNET_GSO_NONE)
        cx->stats.tso_reads++;
    uint64_t now = now_ns();
    for (int k = 0; k < n; k++) {
        uint8_t *seg = b->aux + q->used;
        uint32_t slen = seg_lens[k], rlen = 0;
        fp_hop hop;
        q->used += seg_lens[k];
        st->rx_packets++;
        st->rx_bytes += slen;
        int v = fp_egress(cx, rt, seg, &slen, now, &hop, reply, &rlen);
        if (v == FP_FORWARD)
            txq_push(q, &hop, seg, slen, NULL, 0);
        else if (v == FP_REPLY && tun_write(cx, tun_fd, reply, rlen, 0) < 0)
            st->drops[FP_DROP_TX_ERROR]++;
    }
    return (uint32_t)n;
}

/* Egress with vnet headers: one read per (super-)packet into the arena, one after another;
 * queued across reads and sent together (see fastpath.h).  A super-packet that fp_egress_super
 * forwards whole is split without copying: each segment is sent as its own headers (built in
 * b->aux) plus its payload where the read put it.  Anything else takes egress_each, so drops,
 * ICMP errors and their counters are fp_egress's either way. */
static int tun_to_udp_vnet(fp_ctx *cx, const fp_routes *rt, fp_batch *b, int tun_fd, int udp_fd,
                           int budget)
{
    fp_dir_stats *st = &cx->stats.egress;
    txq_t q;
    uint32_t pay_off[FP_MAX_QUEUE], pay_len[FP_MAX_QUEUE];
    const uint32_t rbuf = b->nslots * b->slot_size; /* >= FRAME_MAX (check_batch) */
    int total = 0, rerr = 0;
    txq_reset(&q);

    while (total < budget) {
        if (!txq_room(&q, b))
            txq_flush(cx, &q, udp_fd, 0);
        uint8_t *frame = b->arena + q.roff;
        ssize_t r = tun_read(cx, tun_fd, frame, rbuf - q.roff, &rerr);
        if (r < 0)
            break;
        const uint32_t len = (uint32_t)r;
        /* The frame stays put until the next flush; the next one is read 8-aligned behind it,
         * never past the arena's end (then txq_room sees no room).  A flush while the frame is
         * being cut (its segments did not fit) keeps arena[0:fend]. */
        uint32_t fend = q.roff + ((len + 7u) & ~7u);
        q.roff = fend = fend < rbuf ? fend : rbuf;
        fp_hop hop;
        uint32_t hl = 0;
        int n = fp_egress_super(cx, rt, frame, len, b->aux + q.used, b->aux_size - q.used, &hl,
                                pay_off, pay_len, FP_MAX_QUEUE - q.nq, &hop);
        if (n == -ENOSPC && q.nq) {
            txq_flush(cx, &q, udp_fd, fend);
            n = fp_egress_super(cx, rt, frame, len, b->aux, b->aux_size, &hl, pay_off, pay_len,
                                FP_MAX_QUEUE, &hop);
        }
        if (n > 0) {
            cx->stats.tso_reads++;
            for (int k = 0; k < n; k++) {
                st->rx_packets++;
                st->rx_bytes += hl + pay_len[k];
                txq_push(&q, &hop, b->aux + q.used, hl, frame + pay_off[k], pay_len[k]);
                q.used += hl;
            }
        } else {
            n = (int)egress_each(cx, rt, &q, b, frame, len, fend, tun_fd, udp_fd);
        }
        total += n;
        q.taken += (uint32_t)n;
    }
    txq_flush(cx, &q, udp_fd, 0);
    return total ? total : rerr;
}

int fp_tun_to_udp(fp_ctx *cx, const fp_routes *rt, fp_batch *b, int tun_fd, int udp_fd, int budget)
{
    int err = check_batch(cx, b, 0);
    if (err)
        return err;
    if (cx->vnet && !cx->per_packet)
        return tun_to_udp_vnet(cx, rt, b, tun_fd, udp_fd, budget);
    fp_dir_stats *st = &cx->stats.egress;
    struct mmsghdr msgs[FP_MAX_BATCH];
    struct iovec iov[FP_MAX_BATCH];
    struct sockaddr_in to[FP_MAX_BATCH];
    uint32_t pkts[FP_MAX_BATCH];
    ctrl_t ctrl[FP_MAX_BATCH];
    uint8_t reply[FP_REPLY_MAX];
    uint32_t want_max = cx->per_packet ? 1 : b->nslots;
    int total = 0;

    while (total < budget) {
        uint32_t want = (uint32_t)(budget - total) < want_max ? (uint32_t)(budget - total) : want_max;
        uint32_t n = 0, nsend = 0;
        int rerr = 0;
        uint64_t now = now_ns(); /* one clock read per round: only the ICMP bucket uses it */
        while (n < want) {
            uint8_t *slot = b->arena + (size_t)n * b->slot_size;
            ssize_t r = tun_read(cx, tun_fd, slot, b->slot_size, &rerr);
            if (r < 0)
                break;
            uint32_t len = (uint32_t)r;
            st->rx_packets++;
            st->rx_bytes += len;
            uint32_t rlen = 0;
            fp_hop hop;
            int v = fp_egress(cx, rt, slot, &len, now, &hop, reply, &rlen);
            if (v == FP_FORWARD) {
                iov[nsend].iov_base = slot;
                iov[nsend].iov_len = len;
                set_addr(&to[nsend], hop.ip, hop.port);
                nsend++;
            } else if (v == FP_REPLY) {
                if (tun_write(cx, tun_fd, reply, rlen, 0) < 0)
                    st->drops[FP_DROP_TX_ERROR]++;
            }
            n++;
        }
        if (n == 0)
            return total ? total : rerr;
        count_batch(st, n);
        if (cx->per_packet) {
            for (uint32_t i = 0; i < nsend; i++) {
                if (send_one(cx, udp_fd, iov[i].iov_base, (uint32_t)iov[i].iov_len, &to[i]) == 0) {
                    st->tx_packets++;
                    st->tx_bytes += iov[i].iov_len;
                } else {
                    st->drops[FP_DROP_TX_ERROR]++;
                }
            }
        } else if (nsend) {
            dgram_t dg[FP_MAX_BATCH];
            uint32_t first[FP_MAX_BATCH];
            for (uint32_t i = 0; i < nsend; i++)
                dg[i] = (dgram_t){ .iov0 = i, .niov = 1, .len = (uint32_t)iov[i].iov_len };
            uint32_t nmsg = build_msgs(cx, iov, dg, to, nsend, msgs, pkts, first, ctrl);
            st->drops[FP_DROP_TX_ERROR] +=
                send_batch(cx, udp_fd, msgs, pkts, first, dg, iov, nmsg, st);
        }
        total += (int)n;
        if (n < want || rerr)
            break;
    }
    return total;
}

/* Forwarded packets of an ingress round waiting to be merged (vnet only). */
typedef struct {
    uint8_t *p[FP_MAX_QUEUE];
    uint32_t len[FP_MAX_QUEUE];
    uint32_t n;
} gro_queue;

/* Merge the queued packets and write them into the TUN, one writev per run: the run's headers
 * from b->aux, the payloads where recvmmsg put them (fp_gro_coalesce_spans). */
static void gro_flush(fp_ctx *cx, fp_dir_stats *st, gro_queue *q, fp_batch *b, int tun_fd)
{
    uint32_t span0[FP_MAX_QUEUE], nspans[FP_MAX_QUEUE], out_segs[FP_MAX_QUEUE];
    fp_span spans[2 * FP_MAX_QUEUE];
    struct iovec v[1 + FP_GSO_MAX_SEGS];
    if (!q->n)
        return;
    int m = fp_gro_coalesce_spans(q->p, q->len, q->n, b->aux, b->aux_size, spans,
                                  2 * FP_MAX_QUEUE, span0, nspans, out_segs, FP_MAX_QUEUE);
    if (m < 0) { /* cannot happen: at most FP_MAX_QUEUE packets, aux >= FP_AUX_MIN */
        st->drops[FP_DROP_TX_ERROR] += q->n;
        q->n = 0;
        return;
    }
    for (int k = 0; k < m; k++) {
        uint64_t bytes = 0;
        for (uint32_t x = 0; x < nspans[k]; x++) {
            v[x].iov_base = (void *)spans[span0[k] + x].base;
            v[x].iov_len = spans[span0[k] + x].len;
            bytes += spans[span0[k] + x].len;
        }
        if (tun_writev(cx, tun_fd, v, (int)nspans[k]) == 0) {
            st->tx_packets += out_segs[k];
            /* what the segments carried: the merged length plus the repeated headers (the
             * virtio-net header's hdr_len, little-endian at offset 2) */
            const uint8_t *vh = v[0].iov_base;
            st->tx_bytes += bytes - FP_VNET_HDR_LEN + (uint64_t)(out_segs[k] - 1) * le16(vh + 2);
            if (out_segs[k] > 1)
                cx->stats.tun_gro_writes++;
        } else {
            st->drops[FP_DROP_TX_ERROR] += out_segs[k];
        }
    }
    q->n = 0;
}

/* One datagram received over UDP: decide (its sender's address checked against rt's peer
 * table), then into the TUN (or the merge queue) or a reply to its sender. */
static void ingress_one(fp_ctx *cx, const fp_routes *rt, fp_dir_stats *st, uint8_t *pkt,
                        uint32_t len, uint64_t now, const struct sockaddr_in *from, int udp_fd,
                        int tun_fd, gro_queue *q, fp_batch *b)
{
    uint8_t reply[FP_REPLY_MAX];
    uint32_t rlen = 0;
    st->rx_packets++;
    st->rx_bytes += len;
    int v = fp_ingress(cx, rt, pkt, &len, ntohl(from->sin_addr.s_addr), now, reply, &rlen);
    if (v == FP_FORWARD && q) {
        if (q->n == FP_MAX_QUEUE) /* aux holds only headers: FP_SPAN_HDR_MAX bytes a packet */
            gro_flush(cx, st, q, b, tun_fd);
        q->p[q->n] = pkt;
        q->len[q->n++] = len;
    } else if (v == FP_FORWARD) {
        if (tun_write(cx, tun_fd, pkt, len, 0) == 0) {
            st->tx_packets++;
            st->tx_bytes += len;
        } else {
            st->drops[FP_DROP_TX_ERROR]++;
        }
    } else if (v == FP_REPLY) {
        if (send_one(cx, udp_fd, reply, rlen, from) < 0)
            st->drops[FP_DROP_TX_ERROR]++;
    }
}

static uint32_t gro_size(struct msghdr *h)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            int v;
            memcpy(&v, CMSG_DATA(c), sizeof(v));
            return v > 0 ? (uint32_t)v : 0;
        }
    }
    return 0;
}

int fp_udp_to_tun(fp_ctx *cx, const fp_routes *rt, fp_batch *b, int udp_fd, int tun_fd,
                  int budget)
{
    int err = check_batch(cx, b, 1);
    if (err)
        return err;
    fp_dir_stats *st = &cx->stats.ingress;
    struct mmsghdr msgs[FP_MAX_BATCH];
    struct iovec iov[FP_MAX_BATCH];
    struct sockaddr_in from[FP_MAX_BATCH];
    ctrl_t ctrl[FP_MAX_BATCH];
    uint32_t want_max = cx->per_packet ? 1 : b->nslots;
    int total = 0;
    gro_queue gq_store, *gq = NULL;
    if (cx->vnet && !cx->per_packet) {
        gq = &gq_store;
        gq->n = 0;
    }

    while (total < budget) {
        uint32_t want = (uint32_t)(budget - total) < want_max ? (uint32_t)(budget - total) : want_max;
        int n;
        if (cx->per_packet) {
            socklen_t alen = sizeof(from[0]);
            ssize_t r;
            do {
                cx->stats.syscalls[FP_SYS_RECVFROM]++;
                r = recvfrom(udp_fd, b->arena, b->slot_size, MSG_DONTWAIT | MSG_TRUNC,
                             (struct sockaddr *)&from[0], &alen);
            } while (r < 0 && errno == EINTR);
            n = r < 0 ? -1 : 1;
            if (r >= 0) {
                memset(&msgs[0], 0, sizeof(msgs[0]));
                msgs[0].msg_len = (unsigned)r;
            }
        } else {
            for (uint32_t i = 0; i < want; i++) {
                iov[i].iov_base = b->arena + (size_t)i * b->slot_size;
                iov[i].iov_len = b->slot_size;
                memset(&msgs[i], 0, sizeof(msgs[i]));
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_hdr.msg_name = &from[i];
                msgs[i].msg_hdr.msg_namelen = sizeof(from[i]);
                if (cx->udp_gro) {
                    msgs[i].msg_hdr.msg_control = ctrl[i].buf;
                    msgs[i].msg_hdr.msg_controllen = sizeof(ctrl[i].buf);
                }
            }
            do {
                cx->stats.syscalls[FP_SYS_RECVMMSG]++;
                /* MSG_TRUNC: msg_len is a datagram's real length, also when it was cut */
                n = recvmmsg(udp_fd, msgs, want, MSG_DONTWAIT | MSG_TRUNC, NULL);
            } while (n < 0 && errno == EINTR);
        }
        if (n < 0) {
            if (errno == EAGAIN)
                break;
            int err = -errno;
            if (gq)
                gro_flush(cx, st, gq, b, tun_fd);
            return total ? total : err;
        }
        if (n == 0)
            break;
        uint64_t now = now_ns();
        uint32_t taken = 0;
        for (int i = 0; i < n; i++) {
            uint8_t *slot = b->arena + (size_t)i * b->slot_size;
            uint32_t len = msgs[i].msg_len;
            /* A slot is at least mtu + 1 bytes, and with udp_gro at least FP_UDP_MAX_PAYLOAD
             * (check_batch): a message cut by the kernel (MSG_TRUNC; recvfrom and recvmmsg
             * report the real length, counted as rx_bytes) is one datagram over the MTU, never
             * written; from a stranger it is counted as such first, as fp_ingress would. */
            if (len > b->slot_size || (msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
                int why = fp_ingress_outer(cx, rt, ntohl(from[i].sin_addr.s_addr));
                st->rx_packets++;
                st->rx_bytes += len;
                st->drops[why >= 0 ? why : FP_DROP_OVERSIZE]++;
                taken++;
                continue;
            }
            uint32_t seg = cx->udp_gro ? gro_size(&msgs[i].msg_hdr) : 0;
            if (seg == 0 || seg >= len) {
                ingress_one(cx, rt, st, slot, len, now, &from[i], udp_fd, tun_fd, gq, b);
                taken++;
                continue;
            }
            cx->stats.gro_receives++;
            for (uint32_t off = 0; off < len; off += seg) {
                uint32_t l = len - off < seg ? len - off : seg;
                ingress_one(cx, rt, st, slot + off, l, now, &from[i], udp_fd, tun_fd, gq, b);
                taken++;
            }
        }
        if (gq)
            gro_flush(cx, st, gq, b, tun_fd); /* the slots are reused by the next receive */
        count_batch(st, taken);
        total += (int)taken;
        if ((uint32_t)n < want)
            break;
    }
    return total;
}

int fp_run(fp_ctx *cx, const fp_routes *rt, fp_batch *egress, fp_batch *ingress, int tun_fd,
           int udp_fd, int stop_fd, int budget)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        return -errno;
    int fds[3] = { tun_fd, udp_fd, stop_fd };
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fds[i] };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int err = -errno;
            close(ep);
            return err;
        }
    }
    int rc = 0;
    for (;;) {
        struct epoll_event evs[3];
        int n = epoll_wait(ep, evs, 3, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        int stop = 0;
        for (int i = 0; i < n && rc >= 0; i++) {
            int fd = evs[i].data.fd;
            if (fd == stop_fd)
                stop = 1;
            else if (fd == tun_fd)
                rc = fp_tun_to_udp(cx, rt, egress, tun_fd, udp_fd, budget);
            else
                rc = fp_udp_to_tun(cx, rt, ingress, udp_fd, tun_fd, budget);
        }
        if (stop || rc < 0)
            break;
        rc = 0;
    }
    close(ep);
    return rc < 0 ? rc : 0;
}

int fp_serve(fp_ctx *cx, const fp_routes *rt, fp_batch *egress, fp_batch *ingress, int tun_fd,
             int udp_fd, int ep_fd, int ctl_fd, int budget, int linger_ms)
{
    int64_t total = 0;
    int want_udp = 1, want_tun = 1;
    for (;;) {
        if (want_udp) {
            int n = fp_udp_to_tun(cx, rt, ingress, udp_fd, tun_fd, budget);
            if (n < 0)
                return n;
            total += n;
            want_tun |= n > 0; /* what was written may have been answered already */
        }
        if (want_tun) {
            int n = fp_tun_to_udp(cx, rt, egress, tun_fd, udp_fd, budget);
            if (n < 0)
                return n;
            total += n;
        }
        struct epoll_event evs[3];
        int n;
        do /* level-triggered: at once when an fd is readable, so no 0 ms poll first */
            n = epoll_wait(ep_fd, evs, 3, linger_ms);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return -errno;
        if (n == 0)
            break;
        want_udp = want_tun = 0;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ctl_fd)
                return total > INT32_MAX ? INT32_MAX : (int)total;
            want_udp |= fd == udp_fd;
            want_tun |= fd == tun_fd;
        }
    }
    return total > INT32_MAX ? INT32_MAX : (int)total;
}
