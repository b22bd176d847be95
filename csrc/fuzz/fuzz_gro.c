/* fuzz_gro.c - libFuzzer harness for the GRO merge: fp_gro_coalesce and fp_gro_coalesce_spans
 * on lists of up to 150 packets - runs of one TCP flow with one field of one segment changed
 * (sizes, flags, sequence numbers, options, TTL, TOS, DF, addresses, ports, checksums), other
 * packets between them, raw bytes - each packet a malloc of exactly its length.  Held to:
 *   - -ENOSPC only when out_cap / max_out / hdrs_cap / max_spans are short of what the inputs
 *     need (generous caps never fail), and never a byte written past them;
 *   - the writes carry every input once, in order (out_segs add up to n);
 *   - a lone packet is a zero virtio-net header + the packet, byte for byte;
 *   - a merged write (2..FP_GSO_MAX_SEGS segments, <= 65535 bytes) has a TCPV4 / NEEDS_CSUM
 *     header (hdr_len, gso_size = the first segment's payload, csum_start 20, csum_offset 16),
 *     a valid IPv4 header checksum, a TCP checksum that verifies once completed as a kernel
 *     completes NEEDS_CSUM, and split again by fp_gso_split gives back exactly the packets it
 *     merged (but for the IP id and the urgent pointer, which a merge does not keep);
 *   - every merged input met fastpath.h's rules (checked on the inputs themselves);
 *   - the spans variant joins to the same bytes, each span inside hdrs or inside its packet. */
#include "fuzz.h"

#define MAX_PKTS 150

static uint8_t *pk[MAX_PKTS];
static uint32_t pl[MAX_PKTS];

/* Change one thing of segment p (the fuzz input says what), fixing checksums unless told. */
static void tweak(fz_in *in, uint8_t *p, uint32_t len)
{
    uint8_t what = in_u8(in), v = in_u8(in);
    switch (what % 16) {
    case 0: p[33] ^= (uint8_t)(1u << (v % 8)); break;      /* a TCP flag */
    case 1: s32(p + 24, g32(p + 24) + (v % 3) - 1); break;   /* seq off by one */
    case 2: p[8] ^= 1; break;                                /* TTL */
    case 3: p[1] ^= v | 1; break;                            /* TOS / ECN */
    case 4: p[6] ^= 0x40; break;                             /* DF */
    case 5: p[6] ^= 0x80; break;                             /* the reserved bit */
    case 6: p[6] ^= 0x20; break;                             /* MF */
    case 7: p[15] ^= v | 1; break;                           /* source address */
    case 8: p[21] ^= v | 1; break;                           /* source port */
    case 9: p[30] ^= v | 1; break;                           /* ack */
    case 10: p[35] ^= v | 1; break;                          /* window */
    case 11: if (len > 44 && (p[32] >> 4) > 5) p[44] ^= v | 1; break; /* an option byte */
    case 12: s16(p + 38, v); break;                          /* urgent pointer */
    case 13: p[len - 1] ^= v | 1; return;                    /* payload, checksum left stale */
    case 14: p[36] ^= v | 1; return;                         /* TCP checksum itself */
    default: s16(p + 4, v); break;                           /* IP id */
    }
    set_l4_csum(p, len, 0);
    set_ip_csum(p, len);
}

static int span_inside(const fp_span *s, const uint8_t *base, uint64_t size)
{
    return s->base >= base && (uint64_t)(s->base - base) + s->len <= size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    uint32_t n = 0;
    uint8_t caps = in_u8(&in);     /* room for the outputs: plenty, or tight */
    uint16_t cut = in_u16(&in);
    uint8_t cut2 = in_u8(&in), cut3 = in_u8(&in);
    /* the list: flow runs, other packets, raw bytes */
    while (in.n && n < MAX_PKTS) {
        uint8_t kind = in_u8(&in);
        if (kind % 4 <= 1) { /* a run of k segments of one flow */
            uint32_t k = 1 + in_u8(&in) % 80, mss = 1 + in_u16(&in) % 1460;
            if (in_u8(&in) & 1)
                mss = 1448;
            uint32_t optw = kind & 0x10 ? 3 : kind & 0x20 ? in_u8(&in) % 11 : 0;
            uint32_t seq = in_u32(&in), last = mss - in_u16(&in) % (mss + 1);
            uint8_t flags = T_ACK | (kind & 0x40 ? T_PSH : 0);
            uint32_t added = 0; /* the list may fill up before k: tweak only this run's */
            for (uint32_t i = 0; i < k && n < MAX_PKTS; i++, added++) {
                uint32_t pay = i == k - 1 ? last : mss;
                if (20 + 20 + optw * 4 + pay > 65535)
                    pay = 1000;
                pk[n] = fz_tcp_segment(pay, seq, i == k - 1 ? flags : T_ACK, (uint16_t)(100 + i), optw,
                                       (uint8_t)i, A_SRC, A_ROUTED, &pl[n]);
                seq += pay;
                n++;
            }
            for (uint32_t t = in_u8(&in) % 4; t && added; t--) { /* change something */
                uint32_t at = n - 1 - in_u8(&in) % added;
                tweak(&in, pk[at], pl[at]);
            }
        } else if (kind % 4 == 2) {
            fz_geom g = { .mtu = 1500, .slot_size = 1501, .proto = -1, .max_len = 65535 };
            fz_pkt p = fz_build_ip(&in, &g);
            pk[n] = p.buf;
            pl[n++] = p.len;
        } else { /* the jumbo case: one long segment, or 64 KiB merged */
            uint32_t pay = 65535 - 40 - in_u16(&in) % 64;
            pk[n] = fz_tcp_segment(pay, in_u32(&in), T_ACK, 1, 0, 0, A_SRC, A_ROUTED, &pl[n]);
            n++;
        }
    }

    uint64_t need = 0;
    for (uint32_t i = 0; i < n; i++)
        need += pl[i] + FP_VNET_HDR_LEN;
    int tight = caps & 1;
    uint32_t out_cap = tight ? (uint32_t)(need - cut % (need + 1)) : (uint32_t)need;
    uint32_t max_out = tight && (caps & 2) ? cut2 % (n + 1) : n;
    uint8_t *out = xmalloc(out_cap);
    uint32_t *out_lens = xmalloc(max_out * sizeof(uint32_t)), *out_segs = xmalloc(max_out * sizeof(uint32_t));
    int m = fp_gro_coalesce(pk, pl, n, out, out_cap, out_lens, out_segs, max_out);
    if (!tight)
        CHECK(m >= 0, "fp_gro_coalesce with room for everything: %d", m);
    CHECK(m >= -ENOSPC && m != -1, "fp_gro_coalesce returned %d", m);

    uint32_t hcap = n * FP_SPAN_HDR_MAX, nsp = 2 * n, mo2 = n;
    if (tight && (caps & 4)) {
        hcap -= cut % (hcap + 1);
        nsp -= cut3 % (nsp + 1);
    }
    uint8_t *hdrs = xmalloc(hcap);
    fp_span *spans = xmalloc(nsp * sizeof(fp_span));
    uint32_t *s0 = xmalloc(mo2 * sizeof(uint32_t)), *ns = xmalloc(mo2 * sizeof(uint32_t));
    uint32_t *ss = xmalloc(mo2 * sizeof(uint32_t));
    int m2 = fp_gro_coalesce_spans(pk, pl, n, hdrs, hcap, spans, nsp, s0, ns, ss, mo2);
    if (!(tight && (caps & 4)))
        CHECK(m2 >= 0, "fp_gro_coalesce_spans with room for everything: %d", m2);

    if (m >= 0) {
        uint32_t at = 0, k = 0;
        for (int o = 0; o < m; o++) {
            const uint8_t *w = out + at;
            uint32_t wl = out_lens[o], c = out_segs[o];
            CHECK(c >= 1 && c <= FP_GSO_MAX_SEGS && k + c <= n, "write %d carries %u", o, c);
            CHECK((uint64_t)at + wl <= out_cap, "write %d past out_cap", o);
            if (m2 >= 0) {
                CHECK(m2 == m && ss[o] == c, "spans: write %d carries %u, coalesce %u", o, ss[o], c);
                for (uint32_t x = 0; x < ns[o]; x++) {
                    const fp_span *sp = &spans[s0[o] + x];
                    CHECK(span_inside(sp, hdrs, hcap) || (x >= 1 && span_inside(sp, pk[k + x - 1], pl[k + x - 1])),
                          "write %d: span %u points outside hdrs and its packet", o, x);
                }
                check_spans_join(w, wl, &spans[s0[o]], ns[o], o);
            }
            if (c == 1) {
                check_lone_write(w, wl, pk[k], pl[k], o);
            } else {
                const uint8_t *ip = w + FP_VNET_HDR_LEN;
                uint32_t il = wl - FP_VNET_HDR_LEN, thl = (uint32_t)(pk[k][32] >> 4) * 4;
                CHECK(il <= 65535 && g16(ip + 2) == il && ref_ip_ok(ip, il), "write %d: IPv4 header", o);
                CHECK(w[0] == FP_VNET_F_NEEDS_CSUM && w[1] == FP_VNET_GSO_TCPV4
                          && gle16(w + 2) == 20 + thl && gle16(w + 4) == pl[k] - 20 - thl
                          && gle16(w + 6) == 20 && gle16(w + 8) == 16,
                      "write %d: virtio-net header", o);
                for (uint32_t x = 0; x < c; x++)
                    CHECK(ref_gro_candidate(pk[k + x], pl[k + x]), "write %d merged packet %u, which may not merge", o, k + x);
                /* completed as the kernel does NEEDS_CSUM: the TCP checksum verifies */
                uint8_t *done = dup_exact(ip, il);
                s16(done + 36, (uint16_t)~ref_sum(0, done + 20, il - 20));
                CHECK(ref_l4_ok(done, il), "write %d: TCP checksum does not verify once completed", o);
                free(done);
                /* split again: the packets it merged, but for IP id and urgent pointer */
                uint8_t *frame = dup_exact(w, wl);
                uint32_t cap = wl + c * FP_SEG_HDR_MAX;
                uint8_t *again = xmalloc(cap);
                uint32_t *alens = xmalloc(c * sizeof(uint32_t));
                int r = fp_gso_split(frame, wl, 65535, again, cap, alens, c);
                CHECK(r == (int)c, "write %d (%u segments) splits into %d", o, c, r);
                uint32_t ap = 0;
                for (uint32_t x = 0; x < c; x++) {
                    uint8_t *a = again + ap, *q = dup_exact(pk[k + x], pl[k + x]);
                    CHECK(alens[x] == pl[k + x], "write %d: segment %u is %u bytes, was %u", o, x, alens[x], pl[k + x]);
                    memcpy(q + 4, a + 4, 2);   /* the id: a split numbers them */
                    memcpy(q + 38, a + 38, 2); /* urgent pointer: meaningless without URG */
                    set_l4_csum(q, pl[k + x], 0);
                    set_ip_csum(q, pl[k + x]);
                    CHECK_SAME(a, q, alens[x],
                               "write %d: packet %u merged and split again is not the packet", o, k + x);
                    free(q);
                    ap += alens[x];
                }
                free(frame);
                free(again);
                free(alens);
            }
            k += c;
            at += wl;
        }
        CHECK(k == n, "the writes carry %u of %u packets", k, n);
    }
    for (uint32_t i = 0; i < n; i++)
        free(pk[i]);
    free(out); free(out_lens); free(out_segs); free(hdrs); free(spans); free(s0); free(ns); free(ss);
    return 0;
}
