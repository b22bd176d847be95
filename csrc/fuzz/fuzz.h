/* fuzz.h - what the libFuzzer harnesses of csrc/fuzz/ share: reading a fuzz input as a recipe,
 * building IPv4 packets and virtio-net frames from it (valid by construction, then mutated),
 * reference checksums written independently of internal.h, and CHECK, which aborts (libFuzzer
 * then saves the input as a crash) on any broken property.
 *
 * Test code, not part of the cffi build.  Every buffer handed to the fast path is a malloc of
 * exactly its length, so AddressSanitizer sees a one-byte overread or overwrite.
 *
 * Input conventions: a recipe is read byte by byte from the fuzz input; once the input runs
 * out every further byte reads as 0, and 0 always picks the plain, valid choice (a TCP packet
 * with correct checksums, routed, TTL 64).  So a short input is a valid packet, and mutations
 * of single bytes move one field at a time. */
#ifndef FUZZ_H
#define FUZZ_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h" /* fastpath.h (no include guard: it is a cdef), fp_egress_super */

/* ---------------------------------------------------------------------------------------------
 * Checks
 * ------------------------------------------------------------------------------------------ */
/* A harness may set this to say what it was doing when a CHECK fails. */
static void (*fz_context)(void);

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "\nPROPERTY VIOLATED at %s:%d: %s\n  ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fputc('\n', stderr);                                                              \
            if (fz_context)                                                                   \
                fz_context();                                                                 \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

/* CHECK that a[0:n] == b[0:n], reporting the first byte that differs. */
#define CHECK_SAME(a, b, n, ...)                                                              \
    do {                                                                                      \
        const uint8_t *a_ = (const uint8_t *)(a), *b_ = (const uint8_t *)(b);                 \
        size_t n_ = (n), i_ = 0;                                                              \
        while (i_ < n_ && a_[i_] == b_[i_])                                                   \
            i_++;                                                                             \
        if (i_ < n_)                                                                          \
            fprintf(stderr, "\nfirst difference at byte %zu of %zu: %02x, want %02x", i_, n_,  \
                    a_[i_], b_[i_]);                                                          \
        CHECK(i_ == n_, __VA_ARGS__);                                                         \
    } while (0)

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        abort();
    }
    return p;
}

/* A buffer of exactly n bytes holding a copy of src[0:n] (malloc(0) is still a distinct
 * allocation: any access to it is an overflow for ASan). */
static inline uint8_t *dup_exact(const uint8_t *src, size_t n)
{
    uint8_t *p = malloc(n);
    if (!p && n) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        abort();
    }
    if (n)
        memcpy(p, src, n);
    return p;
}

/* b[from:to] := a byte pattern (not instrumented: the harness's own buffers, a hot loop). */
__attribute__((no_sanitize("address", "undefined")))
static inline void fill_pattern(uint8_t *b, size_t from, size_t to, uint8_t seed)
{
    for (size_t i = from; i < to; i++)
        b[i] = (uint8_t)(seed + i * 131 + (i >> 8));
}

/* ---------------------------------------------------------------------------------------------
 * Reading the fuzz input
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *p;
    size_t n;
} fz_in;

static inline uint8_t in_u8(fz_in *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}
static inline uint16_t in_u16(fz_in *in) { uint16_t a = in_u8(in); return (uint16_t)(a | in_u8(in) << 8); }
static inline uint32_t in_u32(fz_in *in) { uint32_t a = in_u16(in); return a | (uint32_t)in_u16(in) << 16; }
static inline uint64_t in_u64(fz_in *in) { uint64_t a = in_u32(in); return a | (uint64_t)in_u32(in) << 32; }
/* One of n choices; 0 (an exhausted input) is the first. */
static inline uint32_t in_pick(fz_in *in, uint32_t n) { return in_u8(in) % n; }

/* ---------------------------------------------------------------------------------------------
 * Byte order and reference checksums (naive RFC 1071, independent of internal.h's csum_add)
 * ------------------------------------------------------------------------------------------ */
static inline uint16_t g16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t g32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void s16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void s32(uint8_t *p, uint32_t v) { s16(p, (uint16_t)(v >> 16)); s16(p + 2, (uint16_t)v); }
static inline uint16_t gle16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void sle16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* One's-complement sum of the big-endian words of b[0:n] (odd tail padded), folded, plus s.
 * Not instrumented: it reads only the harness's own copies, and it is the hot loop here. */
__attribute__((no_sanitize("address", "undefined")))
static inline uint32_t ref_sum(uint32_t s, const uint8_t *b, size_t n)
{
    uint64_t t = s;
    size_t i = 0;
    for (; i + 1 < n; i += 2)
        t += (uint32_t)b[i] << 8 | b[i + 1];
    if (i < n)
        t += (uint32_t)b[i] << 8;
    while (t >> 16)
        t = (t & 0xffff) + (t >> 16);
    return (uint32_t)t;
}
static inline uint16_t ref_csum(const uint8_t *b, size_t n) { return (uint16_t)~ref_sum(0, b, n); }

static inline uint32_t ref_pseudo(const uint8_t *ip, uint8_t proto, uint32_t l4_len)
{
    uint32_t s = ref_sum(0, ip + 12, 8);
    s += proto;
    s += l4_len;
    s = (s & 0xffff) + (s >> 16);
    return (s & 0xffff) + (s >> 16);
}

#define P_ICMP 1
#define P_TCP 6
#define P_UDP 17
#define T_FIN 0x01
#define T_SYN 0x02
#define T_RST 0x04
#define T_PSH 0x08
#define T_ACK 0x10
#define T_URG 0x20
#define T_ECE 0x40
#define T_CWR 0x80

/* The IPv4 header of pkt[0:len] is complete and its checksum verifies. */
static inline int ref_ip_ok(const uint8_t *pkt, size_t len)
{
    if (len < 20 || pkt[0] >> 4 != 4)
        return 0;
    size_t ihl = (size_t)(pkt[0] & 15) * 4;
    return ihl >= 20 && ihl <= len && ref_csum(pkt, ihl) == 0;
}

/* Offset of the L4 checksum field inside the L4 header, or -1 (no such protocol). */
static inline int l4_csum_off(uint8_t proto)
{
    return proto == P_TCP ? 16 : proto == P_UDP ? 6 : proto == P_ICMP ? 2 : -1;
}

/* The L4 checksum of the IPv4 packet pkt (its total length, header complete) verifies: TCP
 * and UDP over the pseudo-header (UDP: and is not 0, "no checksum"), ICMP over the message.
 * 1 for any other protocol (nothing to check), 0 when the L4 header is cut short. */
static inline int ref_l4_ok(const uint8_t *pkt, size_t len)
{
    size_t ihl = (size_t)(pkt[0] & 15) * 4;
    uint8_t proto = pkt[9];
    int off = l4_csum_off(proto);
    if (off < 0)
        return 1;
    if ((g16(pkt + 6) & 0x3fff) != 0)
        return 1; /* a fragment: the checksum covers the reassembled datagram */
    if (len < ihl + (size_t)off + 2)
        return 0;
    const uint8_t *l4 = pkt + ihl;
    uint32_t l4_len = (uint32_t)(len - ihl);
    if (proto == P_ICMP)
        return ref_sum(0, l4, l4_len) == 0xffff;
    if (proto == P_UDP && g16(l4 + 6) == 0)
        return 0;
    return ref_sum(ref_pseudo(pkt, proto, l4_len), l4, l4_len) == 0xffff;
}

/* Write the checksum field of the L4 header of pkt[0:len]: mode 0 full, 1 partial (the folded
 * pseudo-header sum, as a TUN hands CHECKSUM_PARTIAL over), 2 zero, 3 leave as it is. */
static inline void set_l4_csum(uint8_t *pkt, size_t len, int mode)
{
    size_t ihl = (size_t)(pkt[0] & 15) * 4;
    int off = l4_csum_off(pkt[9]);
    if (off < 0 || mode == 3 || len < ihl + (size_t)off + 2)
        return;
    uint8_t *l4 = pkt + ihl, proto = pkt[9];
    uint32_t l4_len = (uint32_t)(len - ihl);
    s16(l4 + off, 0);
    if (mode == 2)
        return;
    uint16_t c;
    if (proto == P_ICMP)
        c = mode == 0 ? ref_csum(l4, l4_len) : 0;
    else if (mode == 1)
        c = (uint16_t)ref_pseudo(pkt, proto, l4_len);
    else {
        c = (uint16_t)~ref_sum(ref_pseudo(pkt, proto, l4_len), l4, l4_len);
        if (proto == P_UDP && c == 0)
            c = 0xffff;
    }
    s16(l4 + off, c);
}

static inline void set_ip_csum(uint8_t *pkt, size_t len)
{
    size_t ihl = (size_t)(pkt[0] & 15) * 4;
    if (len < 20 || ihl < 20 || ihl > len)
        return;
    s16(pkt + 10, 0);
    s16(pkt + 10, ref_csum(pkt, ihl));
}

/* ---------------------------------------------------------------------------------------------
 * Addresses (host order): the harnesses' route tables all know these
 * ------------------------------------------------------------------------------------------ */
#define A_LOCAL 0xc6120001u     /* 198.18.0.1: the TUN's address */
#define A_SRC 0xc6120505u       /* 198.18.5.5: a pod here */
#define A_ROUTED 0xc6130105u    /* 198.19.1.5: in 198.19.0.0/16, routed to the peer */
#define A_BLACKHOLE 0xc6130205u /* 198.19.2.5: in 198.19.2.0/24, routed to port 0 (send fails) */
#define A_UNROUTED 0xc6120909u  /* 198.18.9.9: no route */
#define A_HOST32 0xc6138001u    /* 198.19.128.1: a /32 route of its own */

static inline uint32_t pick_addr(fz_in *in)
{
    static const uint32_t pool[] = {
        A_ROUTED, A_SRC, A_UNROUTED, A_BLACKHOLE, A_HOST32, A_LOCAL, 0, 0xe0000005u,
        0xffffffffu, 0xdfffffffu, 0xc613ffffu, 0x7f000001u,
    };
    uint8_t s = in_u8(in);
    if (s >= 0xf0)
        return in_u32(in);
    return pool[s % (sizeof(pool) / sizeof(pool[0]))];
}

/* ---------------------------------------------------------------------------------------------
 * Building packets from a recipe
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    uint32_t mtu;       /* boundary sizes are taken around these */
    uint32_t slot_size;
    int proto;          /* >= 0: force this L4 protocol (the frame builder's TCPV4/UDP_L4) */
    uint32_t max_len;   /* largest packet to build (<= FP_IP_MAX_LEN) */
} fz_geom;

typedef struct {
    uint8_t *buf;       /* malloc of exactly len bytes */
    uint32_t len;
    uint32_t hl;        /* IPv4 + L4 header bytes as built (0 for raw bytes) */
    int valid;          /* built valid: lengths, IPv4 header checksum, whole L4 header, not a
                         * fragment, not mutated after */
    int l4;             /* its L4 checksum: 0 full, 1 partial (the pseudo-header sum, as a TUN
                         * hands CHECKSUM_PARTIAL over), 2 zero, 3 garbage */
} fz_pkt;

/* A total length around the boundaries that matter: 0, 1, 19, 20, 21, ihl +- 1, hl, mtu +- 1,
 * 65535, slot_size +- 1, or anything. */
static inline uint32_t pick_total(fz_in *in, const fz_geom *g, uint32_t ihl, uint32_t hl,
                                  uint32_t dflt)
{
    uint8_t s = in_u8(in);
    uint32_t v;
    switch (s % 32) {
    case 0: case 1: case 2: case 3: case 4: case 5: case 24: case 25: case 26: case 27: case 28:
    case 29: case 30: v = dflt; break;
    case 6: v = 0; break;
    case 7: v = 1; break;
    case 8: v = 19; break;
    case 9: v = 20; break;
    case 10: v = 21; break;
    case 11: v = ihl - 1; break;
    case 12: v = ihl + 1; break;
    case 13: v = hl; break;
    case 14: v = hl + 1; break;
    case 15: v = g->mtu - 1; break;
    case 16: v = g->mtu; break;
    case 17: v = g->mtu + 1; break;
    case 18: v = 65535; break;
    case 19: v = g->slot_size - 1; break;
    case 20: v = g->slot_size; break;
    case 21: v = g->slot_size + 1; break;
    case 22: v = hl + in_u8(in); break;
    case 23: v = in_u16(in); break;
    default: v = in_u16(in) % 4096; break;
    }
    return v > g->max_len ? g->max_len : v;
}

/* Recipe flags (one byte). */
#define R_BAD_IPCSUM 0x01   /* leave the header checksum as built before the last changes */
#define R_FIX_TOTLEN 0x02   /* a cut or padded packet gets its total length (and checksums) redone */
#define R_FLIPS 0x04        /* then flip a few bytes (after every fix-up) */
#define R_TRAILER 0x08      /* bytes on the wire past the total length, or fewer bytes */
#define R_L4_SHIFT 4        /* 2 bits: L4 checksum full / partial / zero / garbage */

/* An IPv4 packet from the recipe at in: TCP (with options), UDP, ICMP echo or error, another
 * protocol, or raw input bytes; IP options; lengths at the boundaries; checksums right (or
 * not, as the recipe says); then mutated.  Returned in a malloc of exactly its length. */
static inline fz_pkt fz_build_ip(fz_in *in, const fz_geom *g)
{
    fz_pkt r = { 0 };
    uint8_t kind = in_u8(in), flags = in_u8(in);
    int proto;
    if (g->proto >= 0)
        proto = g->proto;
    else {
        switch (kind % 8) {
        case 0: case 1: proto = P_TCP; break;
        case 2: case 3: proto = P_UDP; break;
        case 4: case 5: proto = P_ICMP; break;
        case 6: proto = in_u8(in); break;
        default: proto = -1; break; /* raw */
        }
    }
    if (proto < 0) {
        uint32_t n = in_u16(in);
        if (n > in->n)
            n = (uint32_t)in->n;
        if (n > g->max_len)
            n = g->max_len;
        r.buf = dup_exact(in->p, n);
        r.len = n;
        in->p += n;
        in->n -= n;
        return r;
    }
    uint8_t optw = in_u8(in);
    uint32_t ihl = 20 + (optw >= 0xc0 ? (optw % 11) * 4 : 0);
    uint32_t l4h;
    uint8_t tcp_doff = 5;
    if (proto == P_TCP) {
        uint8_t d = in_u8(in);
        tcp_doff = (uint8_t)(d < 0x80 ? 5 : d < 0xc0 ? 8 : 5 + d % 11);
        l4h = tcp_doff * 4u;
    } else if (proto == P_UDP || proto == P_ICMP) {
        l4h = 8;
    } else {
        l4h = 0;
    }
    uint32_t hl = ihl + l4h;
    uint32_t dflt = hl + 16 + in_u8(in);
    uint32_t total = pick_total(in, g, ihl, hl, dflt);
    size_t n = total < hl ? hl : total; /* built whole, then cut */
    uint8_t *p = calloc(1, n ? n : 1);
    if (!p)
        abort();

    /* IPv4 header */
    p[0] = (uint8_t)(0x40 | ihl / 4);
    p[1] = in_u8(in);
    s16(p + 4, in_u16(in));
    static const uint16_t frags[] = { 0, 0x4000, 0x4000, 0x2000, 0x0001, 0x8000, 0x6000, 0x4010 };
    uint8_t fs = in_u8(in);
    s16(p + 6, fs >= 0xf8 ? in_u16(in) : frags[fs % 8]);
    static const uint8_t ttls[] = { 64, 64, 64, 1, 0, 2, 255, 3 };
    uint8_t ts = in_u8(in);
    p[8] = ts >= 0xf8 ? in_u8(in) : ttls[ts % 8];
    p[9] = (uint8_t)proto;
    s32(p + 12, pick_addr(in));
    s32(p + 16, pick_addr(in));
    for (uint32_t i = 20; i < ihl; i++)
        p[i] = i == 20 ? 1 : (uint8_t)in_u8(in); /* NOP, then anything */

    /* L4 header */
    uint8_t *l4 = p + ihl;
    if (proto == P_TCP || proto == P_UDP) {
        s16(l4, (uint16_t)(40000 + in_u8(in)));
        s16(l4 + 2, (uint16_t)(5201 + in_u8(in)));
    }
    if (proto == P_TCP) {
        s32(l4 + 4, in_u32(in));
        s32(l4 + 8, in_u32(in));
        l4[12] = (uint8_t)(tcp_doff << 4);
        uint8_t f = in_u8(in);
        l4[13] = f < 0x80 ? (uint8_t)(T_ACK | (f & 1 ? T_PSH : 0)) : f;
        s16(l4 + 14, (uint16_t)(502 + in_u8(in)));
        s16(l4 + 18, in_u8(in) >= 0xf0 ? in_u16(in) : 0);
        for (uint32_t i = 20; i < l4h; i++)
            p[ihl + i] = i < 24 ? (uint8_t[]){ 1, 1, 8, 10 }[i - 20] : (uint8_t)(i * 7);
    } else if (proto == P_UDP) {
        s16(l4 + 4, (uint16_t)(n - ihl));
    } else if (proto == P_ICMP) {
        static const uint8_t types[] = { 8, 0, 8, 3, 11, 4, 5, 12, 13 };
        uint8_t t = in_u8(in);
        l4[0] = t >= 0xf0 ? in_u8(in) : types[t % 9];
        l4[1] = in_u8(in) & 15;
        s32(l4 + 4, in_u32(in));
    }
    /* payload: a pattern from one seed byte */
    fill_pattern(p, hl, n, in_u8(in));

    /* lengths and checksums */
    s16(p + 2, (uint16_t)n);
    if (proto == P_UDP && n >= ihl + 8)
        s16(l4 + 4, (uint16_t)(n - ihl));
    int l4mode = (flags >> R_L4_SHIFT) & 3;
    set_l4_csum(p, n, l4mode == 3 ? 0 : l4mode);
    if (l4mode == 3 && proto >= 0 && l4_csum_off((uint8_t)proto) >= 0
        && n >= ihl + (size_t)l4_csum_off((uint8_t)proto) + 2)
        p[ihl + l4_csum_off((uint8_t)proto)] ^= (uint8_t)(1 + in_u8(in));
    set_ip_csum(p, n);
    r.valid = total >= hl && !(g16(p + 6) & 0x3fff);
    r.l4 = l4mode;
    r.hl = hl;

    /* wire length: the total length, or cut / padded past it */
    size_t wire = total < n ? total : n;
    if (flags & R_TRAILER) {
        uint8_t t = in_u8(in);
        if (t & 1)
            wire = wire > (size_t)(t >> 1) ? wire - (t >> 1) : 0;
        else
            wire += (size_t)(t >> 1) + 1;
        if (wire > g->max_len)
            wire = g->max_len;
    }
    uint8_t *w = xmalloc(wire);
    memcpy(w, p, wire < n ? wire : n);
    if (wire > n)
        fill_pattern(w, n, wire, 0xa5);
    free(p);
    if (wire != n) {
        r.valid = 0;
        if ((flags & R_FIX_TOTLEN) && wire >= 20 && wire <= 65535) {
            /* the cut (or longer) packet made consistent again: lengths and checksums */
            s16(w + 2, (uint16_t)wire);
            if (proto == P_UDP && wire >= ihl + 8)
                s16(w + ihl + 4, (uint16_t)(wire - ihl));
            set_l4_csum(w, wire, l4mode == 3 ? 0 : l4mode);
            set_ip_csum(w, wire);
            r.valid = wire >= hl && !(g16(w + 6) & 0x3fff);
        }
    }
    if ((flags & R_BAD_IPCSUM) && wire >= 12) {
        w[10] ^= (uint8_t)(1 + in_u8(in));
        r.valid = 0;
    }
    if ((flags & R_FLIPS) && wire) {
        uint32_t k = 1 + in_u8(in) % 4;
        for (uint32_t i = 0; i < k; i++) {
            uint32_t at = in_u16(in) % (uint32_t)wire;
            w[at] ^= in_u8(in) | 1;
        }
        r.valid = 0;
    }
    r.buf = w;
    r.len = (uint32_t)wire;
    return r;
}

/* A virtio-net frame: header (plausible, as a TUN sets it, or anything) + an IPv4 packet. */
typedef struct {
    uint8_t *buf;       /* malloc of exactly len bytes */
    uint32_t len;
    int plausible;      /* header fields as a kernel sets them for the packet built */
    int l4_good;        /* the packet was built valid and, once split or completed as the
                         * header says, every segment's L4 checksum must verify */
} fz_frame;

static inline uint16_t pick_gso(fz_in *in, uint32_t mtu, uint32_t hl, uint32_t pay)
{
    uint8_t s = in_u8(in);
    uint32_t fit = mtu > hl ? mtu - hl : 1;
    uint32_t v;
    switch (s % 16) {
    case 0: case 1: case 2: case 3: v = fit; break;
    case 4: v = fit + 1; break;
    case 5: v = fit - 1; break;
    case 6: v = 0; break;
    case 7: v = 1; break;
    case 8: v = pay; break;
    case 9: v = pay + 1; break;
    case 10: v = pay ? pay - 1 : 0; break;
    case 11: v = (pay + 63) / 64; break;          /* 64 segments */
    case 12: v = pay / 65 ? pay / 65 : 1; break;  /* more than 64 */
    case 13: v = 536; break;
    case 14: v = 65535; break;
    default: v = in_u16(in); break;
    }
    return (uint16_t)(v > 65535 ? 65535 : v);
}

/* A frame as read from a vnet TUN: GSO_NONE, TCPV4, UDP_L4 (with or without ECN), UFO,
 * TCPV6 or any type; a super-packet often many MTUs long; header fields plausible (hdr_len,
 * csum_start, csum_offset as the kernel sets them, gso_size around mtu - headers) or near
 * or anything.  At most max_frame bytes, in a malloc of exactly its length. */
static inline fz_frame fz_build_frame(fz_in *in, uint32_t mtu, uint32_t max_frame)
{
    fz_frame f = { 0 };
    uint8_t vs = in_u8(in), vflags = in_u8(in);
    static const uint8_t gso_types[] = {
        FP_VNET_GSO_NONE, FP_VNET_GSO_TCPV4, FP_VNET_GSO_TCPV4, FP_VNET_GSO_UDP_L4,
        FP_VNET_GSO_NONE, FP_VNET_GSO_TCPV4 | FP_VNET_GSO_ECN, FP_VNET_GSO_UDP_L4 | FP_VNET_GSO_ECN,
        3 /* UFO */, 4 /* TCPV6 */,
    };
    uint8_t gt = vs >= 0xf0 ? in_u8(in) : gso_types[vs % 9];
    uint8_t base = gt & (uint8_t)~FP_VNET_GSO_ECN;
    fz_geom g = { .mtu = mtu, .slot_size = mtu + 1, .proto = -1,
                  .max_len = max_frame - FP_VNET_HDR_LEN };
    int mismatch = (vflags & 0x80) != 0; /* a TCPV4 header on a UDP packet, and so on */
    int super = base == FP_VNET_GSO_TCPV4 || base == FP_VNET_GSO_UDP_L4;
    if (base == FP_VNET_GSO_TCPV4 && !mismatch)
        g.proto = P_TCP;
    else if (base == FP_VNET_GSO_UDP_L4 && !mismatch)
        g.proto = P_UDP;
    fz_pkt p = fz_build_ip(in, &g);
    if (super && p.valid && in_u8(in) < 0xc0) {
        /* longer: the packet's own headers, then a patterned payload of 1..48 MTUs */
        uint32_t room = mtu > p.hl ? mtu - p.hl : 1;
        uint32_t want = p.hl + room * (1 + in_u8(in) % 48) + in_u8(in) % 3;
        if (in_u8(in) >= 0xe0)
            want = 65535;
        if (want > g.max_len)
            want = g.max_len;
        if (want > p.len) {
            uint8_t *q = xmalloc(want);
            uint32_t ihl = (uint32_t)(p.buf[0] & 15) * 4;
            memcpy(q, p.buf, p.hl);
            fill_pattern(q, p.hl, want, in_u8(in));
            s16(q + 2, (uint16_t)want);
            if (q[9] == P_UDP)
                s16(q + ihl + 4, (uint16_t)(want - ihl));
            set_l4_csum(q, want, p.l4 == 3 ? 0 : p.l4);
            set_ip_csum(q, want);
            free(p.buf);
            p.buf = q;
            p.len = want;
        }
    }
    uint32_t ihl = p.len >= 1 ? (uint32_t)(p.buf[0] & 15) * 4 : 20;
    uint32_t hl = p.hl ? p.hl : ihl;
    uint32_t pay = p.len > hl ? p.len - hl : 0;
    uint8_t proto = p.len >= 10 ? p.buf[9] : 0;
    uint16_t csoff = proto == P_TCP ? 16 : proto == P_UDP ? 6 : 2;
    int partial = p.l4 == 1;
    uint8_t hdr[FP_VNET_HDR_LEN];
    int plausible = (vflags & 0x60) == 0;
    hdr[0] = (partial || super) ? FP_VNET_F_NEEDS_CSUM : 0;
    hdr[1] = gt;
    sle16(hdr + 2, (uint16_t)hl);
    sle16(hdr + 4, super ? pick_gso(in, mtu, hl, pay) : 0);
    sle16(hdr + 6, (uint16_t)ihl);
    sle16(hdr + 8, csoff);
    if (!plausible) {
        if (vflags & 0x10) { /* anything */
            hdr[0] = in_u8(in);
            sle16(hdr + 2, in_u16(in));
            if (!super || (vflags & 8))
                sle16(hdr + 4, in_u16(in));
            sle16(hdr + 6, in_u16(in));
            sle16(hdr + 8, in_u16(in));
        } else { /* near: csum_start / csum_offset a little off, hdr_len anything */
            sle16(hdr + 2, (uint16_t)(hl + in_u8(in) % 9 - 4));
            sle16(hdr + 6, (uint16_t)(ihl + in_u8(in) % 5 - 2));
            sle16(hdr + 8, (uint16_t)(csoff + in_u8(in) % 5 - 2));
            if (vflags & 8)
                hdr[0] ^= FP_VNET_F_NEEDS_CSUM;
        }
    }
    f.len = FP_VNET_HDR_LEN + p.len;
    if (f.len > max_frame)
        f.len = max_frame;
    f.buf = xmalloc(f.len);
    memcpy(f.buf, hdr, FP_VNET_HDR_LEN);
    memcpy(f.buf + FP_VNET_HDR_LEN, p.buf, f.len - FP_VNET_HDR_LEN);
    f.plausible = plausible && !mismatch && p.hl && p.len >= hl;
    /* GSO_NONE: completed per NEEDS_CSUM (a partial field) or already full; a super-packet's
     * segments get full checksums whatever the field held */
    f.l4_good = p.valid && f.plausible && f.len == FP_VNET_HDR_LEN + p.len
                && (super || (base == FP_VNET_GSO_NONE && (partial || p.l4 == 0)));
    free(p.buf);
    return f;
}

/* One segment of a TCP flow, src:40000 -> dst:5201: n payload bytes, seq, flags, IP id, optw
 * option words (timestamps first), valid checksums, DF, TTL 64.  In a malloc of exactly *len
 * bytes. */
static inline uint8_t *fz_tcp_segment(uint32_t n, uint32_t seq, uint8_t flags, uint16_t id,
                                      uint32_t optw, uint8_t seed, uint32_t src, uint32_t dst,
                                      uint32_t *len)
{
    uint32_t thl = 20 + optw * 4, l = 20 + thl + n;
    uint8_t *p = xmalloc(l);
    memset(p, 0, 20 + thl);
    p[0] = 0x45;
    s16(p + 2, (uint16_t)l);
    s16(p + 4, id);
    s16(p + 6, 0x4000);
    p[8] = 64;
    p[9] = P_TCP;
    s32(p + 12, src);
    s32(p + 16, dst);
    uint8_t *t = p + 20;
    s16(t, 40000);
    s16(t + 2, 5201);
    s32(t + 4, seq);
    s32(t + 8, 77777);
    t[12] = (uint8_t)((thl / 4) << 4);
    t[13] = flags;
    s16(t + 14, 502);
    for (uint32_t i = 20; i < thl; i++)
        t[i] = i < 24 ? (uint8_t[]){ 1, 1, 8, 10 }[i - 20] : (uint8_t)(i * 3);
    fill_pattern(p, 20 + thl, l, seed);
    set_l4_csum(p, l, 0);
    set_ip_csum(p, l);
    *len = l;
    return p;
}

/* A TCP segment fp_gro_coalesce may merge, by fastpath.h's rules for one packet (option-less
 * IPv4, no IP flag but DF, data, ACK and none of SYN/FIN/RST/URG/ECE/CWR, checksums valid),
 * written apart from offload.c's. */
static inline int ref_gro_candidate(const uint8_t *p, uint32_t len)
{
    if (len < 40 || p[0] != 0x45 || p[9] != P_TCP || (g16(p + 6) & 0xbfff) || g16(p + 2) != len)
        return 0;
    uint32_t thl = (uint32_t)(p[32] >> 4) * 4;
    uint8_t f = p[33];
    if (thl < 20 || 20 + thl >= len || !(f & T_ACK)
        || (f & (T_SYN | T_FIN | T_RST | T_URG | T_ECE | T_CWR)))
        return 0;
    return ref_l4_ok(p, len);
}

/* ---------------------------------------------------------------------------------------------
 * fp_ctx_init with the source check off and no local subnet
 * ------------------------------------------------------------------------------------------ */
static inline int fz_ctx_init(fp_ctx *cx, uint32_t local_ip, uint32_t mtu, uint32_t per_packet,
                              uint32_t rate, uint32_t burst)
{
    return fp_ctx_init(cx, local_ip, mtu, per_packet, rate, burst, 0, 0, FP_PEER_CHECK_OFF);
}

/* ---------------------------------------------------------------------------------------------
 * What a merged TUN write must hold (fuzz_gro, fuzz_split)
 * ------------------------------------------------------------------------------------------ */
/* CHECK that the spans sp[0:n] joined are exactly write o's bytes w[0:wl]: what
 * fp_gro_coalesce_spans hands to writev is what fp_gro_coalesce copies. */
static inline void check_spans_join(const uint8_t *w, uint32_t wl, const fp_span *sp,
                                    uint32_t n, int o)
{
    uint32_t pos = 0;
    for (uint32_t x = 0; x < n; x++) {
        CHECK(pos + sp[x].len <= wl && memcmp(w + pos, sp[x].base, sp[x].len) == 0,
              "write %d: span %u differs from fp_gro_coalesce's bytes", o, x);
        pos += sp[x].len;
    }
    CHECK(pos == wl, "write %d: spans hold %u bytes, coalesce %u", o, pos, wl);
}

/* CHECK that write o, carrying one packet, is a zero virtio-net header and pkt[0:len]. */
static inline void check_lone_write(const uint8_t *w, uint32_t wl, const uint8_t *pkt,
                                    uint32_t len, int o)
{
    static const uint8_t zero[FP_VNET_HDR_LEN];
    CHECK(wl == FP_VNET_HDR_LEN + len && memcmp(w, zero, FP_VNET_HDR_LEN) == 0
              && memcmp(w + FP_VNET_HDR_LEN, pkt, len) == 0,
          "write %d: a lone packet is not a zero header + the packet", o);
}

#endif
