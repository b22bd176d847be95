/* internal.h - helpers shared by the .c files of the fast path; not part of the contract.
 * Byte access (big-endian IPv4, little-endian virtio-net), IPv4 offsets, checksums, and the
 * three cross-file functions that are not in fastpath.h.  No syscalls here. */
#ifndef FP_INTERNAL_H
#define FP_INTERNAL_H

#include <stdint.h>
#include <string.h>
#include <errno.h>

#include "fastpath.h"

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* The virtio-net header is little-endian (a TUN uses the host's order; x86 and arm64 are LE). */
static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline void wle16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* IPv4 header offsets (RFC 791). */
#define IP_OFF_TOTLEN 2
#define IP_OFF_FRAG 6
#define IP_OFF_TTL 8
#define IP_OFF_PROTO 9
#define IP_OFF_CSUM 10
#define IP_OFF_SRC 12
#define IP_OFF_DST 16
/* The 16-bit flags/fragment-offset word at IP_OFF_FRAG. */
#define IP_DF 0x4000u        /* don't fragment */
#define IP_FRAG_BITS 0x3fffu /* MF and the offset: nonzero in every fragment */
#define IP_NOT_DF 0xbfffu    /* the reserved bit and the fragment bits: all but DF */
#define IPPROTO_ICMP_ 1

/* io.c's, shared with its fuzz harness: the largest TUN read with vnet headers, and the UDP
 * offload socket options (Linux 4.18 / 5.0) for C libraries whose headers predate them. */
#define FRAME_MAX (FP_VNET_HDR_LEN + FP_IP_MAX_LEN)
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* One's-complement sum (RFC 1071) of buf[0:len], as 16-bit big-endian words, added to sum;
 * not folded.  RFC 1071 2(B): the sum is byte-order independent, so it is taken in the host's
 * order over 64-bit loads and swapped once at the end. */
static inline uint64_t csum_add(uint64_t sum, const uint8_t *buf, uint32_t len)
{
    /* 64-bit words with end-around carry: 2^64 = 1 modulo 2^16 - 1, so the carries are
     * counted and added back once.  Two accumulators for instruction-level parallelism. */
    uint64_t a = 0, b = 0, ca = 0, cb = 0, s;
    while (len >= 16) {
        uint64_t w[2];
        memcpy(w, buf, 16);
        ca += __builtin_add_overflow(a, w[0], &a);
        cb += __builtin_add_overflow(b, w[1], &b);
        buf += 16;
        len -= 16;
    }
    s = (a & 0xffffffffu) + (a >> 32) + (b & 0xffffffffu) + (b >> 32) + ca + cb;
    while (len >= 4) {
        uint32_t w;
        memcpy(&w, buf, 4);
        s += w;
        buf += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, buf, 2);
        s += w;
        buf += 2;
        len -= 2;
    }
    if (len) {
        uint8_t last[2] = { buf[0], 0 };   /* a trailing byte is the high byte of its word */
        uint16_t w;
        memcpy(&w, last, 2);
        s += w;
    }
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    s = ((s & 0xff) << 8) | (s >> 8);
#endif
    return sum + s;
}

/* Fold a 64-bit one's-complement accumulator to 16 bits (not complemented). */
static inline uint16_t csum_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* packet.c: the egress decision for a TSO/USO super-packet read from a vnet TUN, made once
 * for all of its segments.  frame[0:len] is a virtio-net header and an IPv4 packet as read.
 * When it is a super-packet (gso_type TCPV4 or UDP_L4) whose every segment fp_egress would
 * forward - IPv4, TTL > 1, a route for its destination - it is cut by fp_gso_split_hdrs
 * (segment i: the *hdr_len bytes at hdrs + i * *hdr_len, then the pay_len[i] bytes at
 * frame + pay_off[i]; frame is left as it is) and each segment's TTL is decremented with
 * fp_egress's checksum update, so that every segment is byte for byte what fp_egress makes of
 * it; returns the number of segments, all for *hop.  0: not such a super-packet (GSO_NONE, not
 * IPv4, TTL <= 1, no route) - the caller cuts it with fp_gso_split and decides each segment
 * with fp_egress.  -errno: fp_gso_split_hdrs's (-ENOSPC: hdrs_cap or max_segs too small; the
 * caller may retry with more room, else it takes the general path, where fp_gso_split fails
 * alike and the drop is counted).  Counts nothing: drops and ICMP errors are fp_egress's. */
int fp_egress_super(const fp_ctx *cx, const fp_routes *rt, uint8_t *frame, uint32_t len,
                    uint8_t *hdrs, uint32_t hdrs_cap, uint32_t *hdr_len, uint32_t *pay_off,
                    uint32_t *pay_len, uint32_t max_segs, fp_hop *hop);

/* packet.c: step 0 of fp_ingress alone - FP_DROP_UNKNOWN_PEER when cx's peer check refuses a
 * datagram from src_ip whatever it holds, else -1.  Counts nothing.  For the pump's drops
 * taken before fp_ingress (a message the kernel cut): the check comes first there too. */
int fp_ingress_outer(const fp_ctx *cx, const fp_routes *rt, uint32_t src_ip);

/* packet.c: fragmentation needed (3/4, RFC 1191) for the IPv4 packet at pkt[0:len] that is
 * too big for cx->mtu - when it has DF set, a header that verifies and may be answered, and
 * the token bucket allows: FP_REPLY with reply[0:*reply_len], else FP_DROP.  Counts the ICMP
 * counters only (the caller has counted the OVERSIZE drop). */
int fp_egress_too_big(fp_ctx *cx, const uint8_t *pkt, uint32_t len, uint64_t now_ns,
                      uint8_t *reply, uint32_t *reply_len);

static inline int hist_bucket(uint32_t n)
{
    int b = 0;
    while (n > 1 && b < FP_HIST_BUCKETS - 1) { n >>= 1; b++; }
    return b;
}

#endif
