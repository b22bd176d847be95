/* internal.h - helpers shared by the .c files of the fast path; not part of the contract.
 * Byte access at fixed IPv4 offsets and the route-table layout.  No syscalls here. */
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

/* IPv4 header offsets (RFC 791). */
#define IP_OFF_TOTLEN 2
#define IP_OFF_FRAG 6
#define IP_OFF_TTL 8
#define IP_OFF_PROTO 9
#define IP_OFF_CSUM 10
#define IP_OFF_SRC 12
#define IP_OFF_DST 16
#define IPPROTO_ICMP_ 1

/* One's-complement sum (RFC 1071) of buf[0:len] added to sum, not folded: 32-bit big-endian
 * words into a 64-bit accumulator (the carries are folded in csum_fold). */
static inline uint64_t csum_add(uint64_t sum, const uint8_t *buf, uint32_t len)
{
    uint32_t i = 0;
    for (; i + 4 <= len; i += 4)
        sum += rd32(buf + i);
    if (i + 2 <= len) {
        sum += rd16(buf + i);
        i += 2;
    }
    if (i < len)
        sum += (uint32_t)buf[i] << 8;
    return sum;
}

/* Fold a 64-bit one's-complement accumulator to 16 bits (not complemented). */
static inline uint16_t csum_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

static inline int hist_bucket(uint32_t n)
{
    int b = 0;
    while (n > 1 && b < FP_HIST_BUCKETS - 1) { n >>= 1; b++; }
    return b;
}

#endif
