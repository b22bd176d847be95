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

static inline int hist_bucket(uint32_t n)
{
    int b = 0;
    while (n > 1 && b < FP_HIST_BUCKETS - 1) { n >>= 1; b++; }
    return b;
}

#endif
