/* fuzz_split.c - libFuzzer harness for the GSO split: fp_gso_split, fp_gso_split_hdrs and
 * packet.c's fp_egress_super, then fp_gro_coalesce / fp_gro_coalesce_spans on what the split
 * made.  Frames are virtio-net headers of every GSO type with plausible or implausible
 * gso_size / hdr_len / csum_start / csum_offset in front of IPv4 packets built by fuzz.h.
 * Held to:
 *   - the return fastpath.h promises (segments, -EINVAL, -EMSGSIZE, -ENOSPC), from a reference
 *     parse of the frame written here, with out / out_cap / seg_lens / max_segs / hdrs_cap at,
 *     just below or well above what the frame needs, each a malloc of exactly its size;
 *   - every segment byte for byte the one built here from scratch: the super-packet's headers
 *     with IP length, id + i and header checksum, TCP seq + i * gso_size (FIN/PSH only on the
 *     last, CWR only on the first) or UDP length, the full L4 checksum, payload chunk i - so IPv4
 *     and L4 checksums verify, lengths are <= mtu and the payloads join to the original; a
 *     GSO_NONE packet whole, its checksum completed as NEEDS_CSUM says;
 *   - fp_gso_split_hdrs's segments (headers + payload in place) equal fp_gso_split's, and buf
 *     unchanged but for a GSO_NONE completion;
 *   - fp_egress_super: 0 exactly when fastpath.h says (GSO_NONE, not IPv4, TTL <= 1, no
 *     route), else fp_gso_split_hdrs's return, each segment what fp_egress makes of
 *     fp_gso_split's, with fp_egress's hop;
 *   - round trip: the TCP segments through fp_gro_coalesce give as many writes as the merge
 *     rules predict, each merged write split again (fp_gso_split) gives back exactly the
 *     segments it carried, a lone one is a zero header + the segment, and the spans variant
 *     joins to the same bytes. */
#include "fuzz.h"


typedef struct {
    int err;          /* 0 or -errno, as fp_gso_split would return before looking at caps */
    uint32_t plen, ihl, l4h, hl, gso, pay, nseg;
    uint8_t gso_type, flags, proto;
    uint16_t cs, co;
} ref_split;

/* fp_gso_split's checks, from fastpath.h and offload.c's documented order. */
static ref_split ref_parse(const uint8_t *buf, uint32_t len, uint32_t mtu)
{
    ref_split r = { 0 };
    if (len < FP_VNET_HDR_LEN + 20) { r.err = -EINVAL; return r; }
    const uint8_t *p = buf + FP_VNET_HDR_LEN;
    uint32_t plen = len - FP_VNET_HDR_LEN;
    r.flags = buf[0];
    r.gso_type = buf[1] & (uint8_t)~FP_VNET_GSO_ECN;
    r.gso = gle16(buf + 4);
    r.cs = gle16(buf + 6);
    r.co = gle16(buf + 8);
    if (p[0] >> 4 != 4) { r.err = -EINVAL; return r; }
    r.ihl = (uint32_t)(p[0] & 15) * 4;
    uint32_t tot = g16(p + 2);
    if (r.ihl < 20 || r.ihl > plen || tot > plen || tot < r.ihl) { r.err = -EINVAL; return r; }
    r.plen = tot;
    r.proto = p[9];
    if (r.gso_type == FP_VNET_GSO_NONE) {
        if ((r.flags & FP_VNET_F_NEEDS_CSUM) && (r.cs < r.ihl || (uint32_t)r.cs + r.co + 2 > tot)) {
            r.err = -EINVAL;
            return r;
        }
        r.hl = tot;
        r.nseg = 1;
        return r;
    }
    if (r.gso_type == FP_VNET_GSO_TCPV4 && r.proto == P_TCP) {
        if (r.ihl + 20 > tot) { r.err = -EINVAL; return r; }
        r.l4h = (uint32_t)(p[r.ihl + 12] >> 4) * 4;
        if (r.l4h < 20) { r.err = -EINVAL; return r; }
    } else if (r.gso_type == FP_VNET_GSO_UDP_L4 && r.proto == P_UDP) {
        r.l4h = 8;
    } else {
        r.err = -EINVAL;
        return r;
    }
    r.hl = r.ihl + r.l4h;
    if (r.hl > tot || r.gso == 0 || (g16(p + 6) & 0x3fff)) { r.err = -EINVAL; return r; }
    r.pay = tot - r.hl;
    if (r.hl + (r.pay < r.gso ? r.pay : r.gso) > mtu) { r.err = -EMSGSIZE; return r; }
    r.nseg = r.pay ? (r.pay + r.gso - 1) / r.gso : 1;
    return r;
}

/* Segment i of the super-packet, built from scratch into out (r->hl + chunk bytes). */
static uint32_t ref_segment(const ref_split *r, const uint8_t *p, uint32_t i, uint8_t *out)
{
    uint32_t off = r->hl + i * r->gso, chunk = r->pay - i * r->gso;
    if (chunk > r->gso)
        chunk = r->gso;
    memcpy(out, p, r->hl);
    memcpy(out + r->hl, p + off, chunk);
    uint32_t n = r->hl + chunk;
    s16(out + 2, (uint16_t)n);
    s16(out + 4, (uint16_t)(g16(p + 4) + i));
    uint8_t *l4 = out + r->ihl;
    if (r->proto == P_TCP) {
        s32(l4 + 4, g32(p + r->ihl + 4) + i * r->gso);
        if (i != r->nseg - 1)
            l4[13] &= (uint8_t)~(T_FIN | T_PSH);
        if (i != 0)
            l4[13] &= (uint8_t)~T_CWR;
    } else {
        s16(l4 + 4, (uint16_t)(8 + chunk));
    }
    set_l4_csum(out, n, 0);
    set_ip_csum(out, n);
    return n;
}

static uint32_t pick_cap(fz_in *in, uint32_t need)
{
    switch (in_u8(in) % 12) {
    case 1: return need ? need - 1 : 0;
    case 2: return need + 1;
    case 3: return 0;
    case 4: return need + FP_SEG_HDR_MAX;
    case 5: return in_u16(in);
    default: return need; /* exactly: an overrun is an ASan report */
    }
}

static uint32_t pick_mtu(fz_in *in)
{
    static const uint32_t mtus[] = { 1400, 1500, 9000, 65535, 68, 576, 1280, 1400, 16384, 200 };
    uint8_t s = in_u8(in);
    return s >= 0xf0 ? 68 + in_u16(in) % (65535 - 67) : mtus[s % 10];
}

/* The segments of one split through both coalesce functions, checked as described above. */
static void round_trip(uint8_t **segs, uint32_t *lens, uint32_t n)
{
    uint32_t expect = 0, run = 0;
    for (uint32_t i = 0; i <= n; i++) {
        if (i < n && ref_gro_candidate(segs[i], lens[i])) {
            run++;
            continue;
        }
        expect += (run + FP_GSO_MAX_SEGS - 1) / FP_GSO_MAX_SEGS + (i < n);
        run = 0;
    }
    uint64_t need = 0;
    for (uint32_t i = 0; i < n; i++)
        need += lens[i] + FP_VNET_HDR_LEN;
    uint8_t *out = xmalloc(need);
    uint32_t *out_lens = xmalloc(n * sizeof(uint32_t)), *out_segs = xmalloc(n * sizeof(uint32_t));
    int m = fp_gro_coalesce(segs, lens, n, out, (uint32_t)need, out_lens, out_segs, n);
    CHECK(m == (int)expect, "coalesce of %u split segments: %d writes, want %u", n, m, expect);

    /* the spans variant, joined, is the same bytes */
    uint32_t hcap = n * FP_SPAN_HDR_MAX, nsp = 2 * n;
    uint8_t *hdrs = xmalloc(hcap);
    fp_span *spans = xmalloc(nsp * sizeof(fp_span));
    uint32_t *s0 = xmalloc(n * sizeof(uint32_t)), *ns = xmalloc(n * sizeof(uint32_t));
    uint32_t *ss = xmalloc(n * sizeof(uint32_t));
    int m2 = fp_gro_coalesce_spans(segs, lens, n, hdrs, hcap, spans, nsp, s0, ns, ss, n);
    CHECK(m2 == m, "coalesce_spans: %d writes, coalesce %d", m2, m);

    uint32_t at = 0, k = 0;
    for (int o = 0; o < m; o++) {
        const uint8_t *w = out + at;
        uint32_t wl = out_lens[o], c = out_segs[o];
        CHECK(c >= 1 && k + c <= n && c == ss[o], "write %d carries %u segments", o, c);
        check_spans_join(w, wl, &spans[s0[o]], ns[o], o);
        if (c == 1) {
            check_lone_write(w, wl, segs[k], lens[k], o);
        } else {
            /* split again, it gives back the segments it carried */
            uint8_t *frame = dup_exact(w, wl);
            uint32_t cap = wl + c * FP_SEG_HDR_MAX;
            uint8_t *again = xmalloc(cap);
            uint32_t *alens = xmalloc(c * sizeof(uint32_t));
            int r = fp_gso_split(frame, wl, 65535, again, cap, alens, c);
            CHECK(r == (int)c, "write %d (%u segments) splits into %d", o, c, r);
            uint32_t ap = 0;
            for (uint32_t x = 0; x < c; x++) {
                CHECK(alens[x] == lens[k + x] && memcmp(again + ap, segs[k + x], alens[x]) == 0,
                      "write %d: segment %u after coalesce + split differs from the split's", o, x);
                ap += alens[x];
            }
            CHECK(ref_ip_ok(w + FP_VNET_HDR_LEN, wl - FP_VNET_HDR_LEN), "merged header checksum");
            free(frame);
            free(again);
            free(alens);
        }
        k += c;
        at += wl;
    }
    CHECK(m < 0 || k == n, "coalesce carried %u of %u segments", k, n);
    free(out); free(out_lens); free(out_segs); free(hdrs); free(spans); free(s0); free(ns); free(ss);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    uint32_t mtu = pick_mtu(&in);
    fz_frame f = fz_build_frame(&in, mtu, FP_VNET_HDR_LEN + FP_IP_MAX_LEN);
    const uint8_t *pkt = f.buf + FP_VNET_HDR_LEN;
    ref_split r = ref_parse(f.buf, f.len, mtu);

    uint32_t max_segs = r.err ? in_u16(&in) % 70 : pick_cap(&in, r.nseg);
    uint32_t need = r.err ? 0 : r.nseg * r.hl + r.pay;
    uint32_t out_cap = r.err ? in_u16(&in) : pick_cap(&in, need);
    int want = r.err;
    if (!want && f.len >= FP_VNET_HDR_LEN + 20 && max_segs < 1)
        want = -ENOSPC;
    else if (!want && (r.nseg > max_segs || need > out_cap))
        want = -ENOSPC;
    if (f.len >= FP_VNET_HDR_LEN + 20 && max_segs < 1)
        want = -ENOSPC; /* max_segs is checked before the frame is parsed */

    uint8_t *out = xmalloc(out_cap);
    uint32_t *seg_lens = xmalloc(max_segs * sizeof(uint32_t));
    uint8_t *copy = dup_exact(f.buf, f.len);
    int n = fp_gso_split(copy, f.len, mtu, out, out_cap, seg_lens, max_segs);
    CHECK(n == (want ? want : (int)r.nseg), "fp_gso_split: %d, want %d (type %u, %u bytes, gso %u)",
          n, want ? want : (int)r.nseg, f.buf[1], f.len, r.gso);
    CHECK(memcmp(copy, f.buf, f.len) == 0, "fp_gso_split changed its const input");

    uint8_t **segs = NULL;
    uint32_t *lens = NULL;
    if (n > 0) {
        segs = xmalloc((size_t)n * sizeof(uint8_t *));
        lens = xmalloc((size_t)n * sizeof(uint32_t));
        uint8_t *o = out, *ref = xmalloc(r.hl + (r.gso > r.pay ? r.gso : r.pay) + 1);
        for (int i = 0; i < n; i++) {
            if (r.gso_type == FP_VNET_GSO_NONE) {
                memcpy(ref, pkt, r.plen);
                if (r.flags & FP_VNET_F_NEEDS_CSUM) {
                    uint16_t c = (uint16_t)~ref_sum(0, pkt + r.cs, r.plen - r.cs);
                    if (c == 0 && r.proto == P_UDP)
                        c = 0xffff;
                    s16(ref + r.cs + r.co, c);
                }
                CHECK(seg_lens[0] == r.plen, "GSO_NONE: %u bytes, want %u", seg_lens[0], r.plen);
            } else {
                uint32_t l = ref_segment(&r, pkt, (uint32_t)i, ref);
                CHECK(seg_lens[i] == l && l <= mtu, "segment %d: %u bytes, want %u (mtu %u)", i,
                      seg_lens[i], l, mtu);
                CHECK(ref_ip_ok(o, l) && ref_l4_ok(o, l), "segment %d: checksums", i);
            }
            CHECK(memcmp(o, ref, seg_lens[i]) == 0, "segment %d differs from the reference", i);
            if (f.l4_good)
                CHECK(ref_l4_ok(o, seg_lens[i]), "segment %d: L4 checksum of a good frame", i);
            segs[i] = dup_exact(o, seg_lens[i]);
            lens[i] = seg_lens[i];
            o += seg_lens[i];
        }
        free(ref);
    }

    /* fp_gso_split_hdrs: the same segments, payloads left in place */
    uint32_t hcap = r.err ? in_u16(&in) : pick_cap(&in, r.gso_type == FP_VNET_GSO_NONE ? 0 : r.nseg * r.hl);
    uint32_t *pay_off = xmalloc(max_segs * sizeof(uint32_t)), *pay_len = xmalloc(max_segs * sizeof(uint32_t));
    uint8_t *hdrs = xmalloc(hcap), *buf = dup_exact(f.buf, f.len);
    uint32_t hl = 0xdead;
    int want_h = want == -ENOSPC && r.nseg <= max_segs && max_segs ? 0 : want;
    if (!want_h && !r.err && r.gso_type != FP_VNET_GSO_NONE && r.nseg * r.hl > hcap)
        want_h = -ENOSPC;
    int nh = fp_gso_split_hdrs(buf, f.len, mtu, hdrs, hcap, &hl, pay_off, pay_len, max_segs);
    CHECK(nh == (want_h ? want_h : (int)r.nseg), "fp_gso_split_hdrs: %d, want %d", nh,
          want_h ? want_h : (int)r.nseg);
    if (nh > 0) {
        CHECK(hl == (r.gso_type == FP_VNET_GSO_NONE ? 0 : r.hl), "hdr_len %u", hl);
        for (int i = 0; i < nh; i++) {
            CHECK(pay_off[i] <= f.len && pay_len[i] <= f.len - pay_off[i], "segment %d: payload %u+%u outside the frame", i, pay_off[i], pay_len[i]);
            if (n > 0)
                CHECK(hl + pay_len[i] == lens[i] && memcmp(hdrs + (size_t)i * hl, segs[i], hl) == 0
                          && memcmp(buf + pay_off[i], segs[i] + hl, pay_len[i]) == 0,
                      "split_hdrs segment %d differs from fp_gso_split's", i);
        }
        if (r.gso_type != FP_VNET_GSO_NONE)
            CHECK(memcmp(buf, f.buf, f.len) == 0, "split_hdrs changed a super-packet's bytes");
    } else {
        CHECK(memcmp(buf, f.buf, f.len) == 0, "a failed split_hdrs changed the frame");
    }

    /* fp_egress_super: fp_egress's verdict once for all segments */
    fp_ctx cx;
    CHECK(fz_ctx_init(&cx, A_LOCAL, mtu, 0, 0, 0) == 0, "fp_ctx_init");
    fp_routes *rt = fp_routes_new();
    fp_routes_set(rt, 0xc6130000u, 16, 0x7f000001u, 8285);
    fp_routes_set(rt, 0xc6130200u, 24, 0x7f000001u, 0);
    uint8_t *fr = dup_exact(f.buf, f.len), *hd = xmalloc(hcap);
    uint32_t shl = 0;
    fp_hop hop = { 0, 0 }, rhop;
    int se = fp_egress_super(&cx, rt, fr, f.len, hd, hcap, &shl, pay_off, pay_len, max_segs, &hop);
    int super_case = f.len >= FP_VNET_HDR_LEN + 20
                     && (f.buf[1] & (uint8_t)~FP_VNET_GSO_ECN) != FP_VNET_GSO_NONE
                     && pkt[0] >> 4 == 4 && pkt[8] > 1 && fp_routes_lookup(rt, g32(pkt + 16), &rhop) >= 0;
    CHECK(se == (super_case ? nh : 0), "fp_egress_super: %d, want %d", se, super_case ? nh : 0);
    CHECK(memcmp(fr, f.buf, f.len) == 0, "fp_egress_super changed the frame");
    if (se > 0) {
        CHECK(hop.ip == rhop.ip && hop.port == rhop.port, "fp_egress_super hop");
        for (int i = 0; i < se && n > 0; i++) {
            uint8_t *seg = dup_exact(segs[i], lens[i]), rep[FP_REPLY_MAX];
            uint32_t l = lens[i], rl = 0;
            fp_hop h2;
            int v = fp_egress(&cx, rt, seg, &l, 0, &h2, rep, &rl);
            CHECK(v == FP_FORWARD && l == lens[i] && shl + pay_len[i] == l
                      && memcmp(hd + (size_t)i * shl, seg, shl) == 0
                      && memcmp(fr + pay_off[i], seg + shl, pay_len[i]) == 0,
                  "fp_egress_super segment %d is not what fp_egress makes of the split's", i);
            CHECK(seg[8] == segs[i][8] - 1, "segment %d: TTL not decremented once", i);
            free(seg);
        }
    }
    fp_routes_free(rt);

    if (n > 0 && r.proto == P_TCP && r.gso_type != FP_VNET_GSO_NONE)
        round_trip(segs, lens, (uint32_t)n);

    for (int i = 0; i < n; i++)
        free(segs[i]);
    free(segs); free(lens); free(out); free(seg_lens); free(copy); free(pay_off); free(pay_len);
    free(hdrs); free(buf); free(fr); free(hd); free(f.buf);
    return 0;
}
