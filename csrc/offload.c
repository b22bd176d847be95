/* offload.c - the virtio-net offload transforms of a TUN opened with IFF_VNET_HDR, as pure
 * functions: fp_gso_split cuts a TSO/USO super-packet into MTU-sized IPv4 packets with
 * correct checksums; fp_gro_coalesce merges consecutive segments of one TCP flow into one
 * super-packet with a virtio-net header.  No syscalls, no globals, no allocation. */
#include "internal.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_ECE 0x40
#define TCP_CWR 0x80
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

/* Pseudo-header sum for TCP/UDP over IPv4 (RFC 793 / RFC 768), not folded. */
static inline uint64_t pseudo_sum(const uint8_t *ip, uint8_t proto, uint32_t l4_len)
{
    return (uint64_t)rd16(ip + IP_OFF_SRC) + rd16(ip + IP_OFF_SRC + 2) + rd16(ip + IP_OFF_DST)
           + rd16(ip + IP_OFF_DST + 2) + proto + l4_len;
}

static inline void ip_fix(uint8_t *ip, uint32_t ihl, uint32_t total, uint16_t id)
{
    wr16(ip + IP_OFF_TOTLEN, (uint16_t)total);
    wr16(ip + 4, id);
    wr16(ip + IP_OFF_CSUM, 0);
    wr16(ip + IP_OFF_CSUM, (uint16_t)~csum_fold(csum_add(0, ip, ihl)));
}

/* Full L4 checksum of a segment whose IPv4 header (ihl bytes) and L4 header (l4h bytes) are
 * at ip and whose l4 payload of pay_len bytes is at pay (right behind the header, or not). */
static inline void l4_fix(uint8_t *ip, uint32_t ihl, uint32_t l4h, const uint8_t *pay,
                          uint32_t pay_len, uint8_t proto, uint32_t off)
{
    uint8_t *l4 = ip + ihl;
    wr16(l4 + off, 0);
    uint64_t sum = csum_add(pseudo_sum(ip, proto, l4h + pay_len), l4, l4h); /* l4h is even */
    uint16_t c = (uint16_t)~csum_fold(csum_add(sum, pay, pay_len));
    if (proto == IPPROTO_UDP_ && c == 0)
        c = 0xffff; /* RFC 768: a computed zero is sent as all ones */
    wr16(l4 + off, c);
}

/* A super-packet read from a vnet TUN, checked and measured by parse_super. */
typedef struct {
    const uint8_t *pkt;  /* the IPv4 packet (behind the virtio-net header) */
    uint32_t plen;       /* its total length */
    uint32_t ihl, l4h, hl, gso, pay, nseg;
    uint8_t proto, flags, gso_type;
    uint16_t csum_start, csum_off;
} super_t;

/* Validate buf[0:len] (virtio-net header + IPv4 packet) and fill *sp; 0 or the errors of
 * fp_gso_split (-EINVAL, -EMSGSIZE).  A GSO_NONE packet is one segment of hl = plen. */
static int parse_super(const uint8_t *buf, uint32_t len, uint32_t mtu, super_t *sp)
{
    if (len < FP_VNET_HDR_LEN + 20)
        return -EINVAL;
    sp->flags = buf[0];
    sp->gso_type = buf[1] & (uint8_t)~FP_VNET_GSO_ECN;
    sp->gso = le16(buf + 4);
    sp->csum_start = le16(buf + 6);
    sp->csum_off = le16(buf + 8);
    const uint8_t *pkt = sp->pkt = buf + FP_VNET_HDR_LEN;
    uint32_t plen = len - FP_VNET_HDR_LEN;
    if ((pkt[0] >> 4) != 4)
        return -EINVAL;
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4, tot = rd16(pkt + IP_OFF_TOTLEN);
    if (ihl < 20 || ihl > plen || tot > plen || tot < ihl)
        return -EINVAL;
    sp->plen = plen = tot; /* bytes past the IPv4 total length are not part of the packet */
    sp->ihl = ihl;
    sp->proto = pkt[IP_OFF_PROTO];
    if (sp->gso_type == FP_VNET_GSO_NONE) {
        if ((sp->flags & FP_VNET_F_NEEDS_CSUM)
            && (sp->csum_start < ihl || (uint32_t)sp->csum_start + sp->csum_off + 2 > plen))
            return -EINVAL;
        sp->l4h = 0;
        sp->hl = plen;
        sp->pay = 0;
        sp->nseg = 1;
        return 0;
    }
    if (sp->gso_type == FP_VNET_GSO_TCPV4 && sp->proto == IPPROTO_TCP_) {
        if (ihl + 20 > plen)
            return -EINVAL;
        sp->l4h = (uint32_t)(pkt[ihl + 12] >> 4) * 4;
        if (sp->l4h < 20)
            return -EINVAL;
    } else if (sp->gso_type == FP_VNET_GSO_UDP_L4 && sp->proto == IPPROTO_UDP_) {
        sp->l4h = 8;
    } else {
        return -EINVAL;
    }
    /* hdr_len from the kernel is not trusted (it may cover the whole first packet on the
     * forwarding path): the header length comes from the headers themselves. */
    uint32_t hl = sp->hl = ihl + sp->l4h;
    if (hl > plen || sp->gso == 0 || (rd16(pkt + IP_OFF_FRAG) & IP_FRAG_BITS) != 0)
        return -EINVAL;
    uint32_t pay = sp->pay = plen - hl;
    if (hl + (pay < sp->gso ? pay : sp->gso) > mtu)
        return -EMSGSIZE;
    sp->nseg = pay ? (pay + sp->gso - 1) / sp->gso : 1;
    return 0;
}

/* Segment i's headers, written at o (sp->hl bytes): the super-packet's, with IP length, id
 * and checksum, TCP sequence number and flags or UDP length set, and the full L4 checksum
 * taken over these headers and the payload at pay (chunk bytes). */
static void seg_headers(uint8_t *o, const super_t *sp, uint32_t i, const uint8_t *pay,
                        uint32_t chunk)
{
    uint32_t ihl = sp->ihl;
    memcpy(o, sp->pkt, sp->hl);
    ip_fix(o, ihl, sp->hl + chunk, (uint16_t)(rd16(sp->pkt + 4) + i));
    uint8_t *l4 = o + ihl;
    if (sp->proto == IPPROTO_TCP_) {
        wr32(l4 + 4, rd32(sp->pkt + ihl + 4) + i * sp->gso);
        if (i != sp->nseg - 1)
            l4[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (i != 0)
            l4[13] &= (uint8_t)~TCP_CWR;
        l4_fix(o, ihl, sp->l4h, pay, chunk, IPPROTO_TCP_, 16);
    } else {
        wr16(l4 + 4, (uint16_t)(8 + chunk));
        l4_fix(o, ihl, 8, pay, chunk, IPPROTO_UDP_, 6);
    }
}

/* The L4 checksum of a GSO_NONE packet with NEEDS_CSUM, completed in place at p: the field
 * holds the pseudo-header sum, the sum from csum_start on completes it. */
static void complete_csum(uint8_t *p, const super_t *sp)
{
    if (!(sp->flags & FP_VNET_F_NEEDS_CSUM))
        return;
    uint16_t c = (uint16_t)~csum_fold(csum_add(0, p + sp->csum_start, sp->plen - sp->csum_start));
    if (c == 0 && p[IP_OFF_PROTO] == IPPROTO_UDP_)
        c = 0xffff;
    wr16(p + sp->csum_start + sp->csum_off, c);
}

static inline uint32_t chunk_of(const super_t *sp, uint32_t i)
{
    uint32_t left = sp->pay - i * sp->gso;
    return left < sp->gso ? left : sp->gso;
}

/* The checks both splits start with, in fp_gso_split's documented order. */
static int split_prologue(const uint8_t *buf, uint32_t len, uint32_t mtu, uint32_t max_segs,
                          super_t *sp)
{
    if (len < FP_VNET_HDR_LEN + 20)
        return -EINVAL;
    if (max_segs < 1)
        return -ENOSPC;
    int err = parse_super(buf, len, mtu, sp);
    if (err)
        return err;
    return sp->nseg > max_segs ? -ENOSPC : 0;
}

int fp_gso_split(const uint8_t *buf, uint32_t len, uint32_t mtu, uint8_t *out, uint32_t out_cap,
                 uint32_t *seg_lens, uint32_t max_segs)
{
    super_t sp;
    int err = split_prologue(buf, len, mtu, max_segs, &sp);
    if (err)
        return err;
    if ((uint64_t)sp.nseg * sp.hl + sp.pay > out_cap)
        return -ENOSPC;
    if (sp.gso_type == FP_VNET_GSO_NONE) {
        memcpy(out, sp.pkt, sp.plen);
        complete_csum(out, &sp);
        seg_lens[0] = sp.plen;
        return 1;
    }
    uint8_t *o = out;
    for (uint32_t i = 0; i < sp.nseg; i++) {
        uint32_t chunk = chunk_of(&sp, i);
        memcpy(o + sp.hl, sp.pkt + sp.hl + i * sp.gso, chunk);
        seg_headers(o, &sp, i, o + sp.hl, chunk);
        seg_lens[i] = sp.hl + chunk;
        o += seg_lens[i];
    }
    return (int)sp.nseg;
}

int fp_gso_split_hdrs(uint8_t *buf, uint32_t len, uint32_t mtu, uint8_t *hdrs, uint32_t hdrs_cap,
                      uint32_t *hdr_len, uint32_t *pay_off, uint32_t *pay_len, uint32_t max_segs)
{
    super_t sp;
    int err = split_prologue(buf, len, mtu, max_segs, &sp);
    if (err)
        return err;
    if (sp.gso_type == FP_VNET_GSO_NONE) {
        complete_csum(buf + FP_VNET_HDR_LEN, &sp);
        *hdr_len = 0;
        pay_off[0] = FP_VNET_HDR_LEN;
        pay_len[0] = sp.plen;
        return 1;
    }
    if ((uint64_t)sp.nseg * sp.hl > hdrs_cap)
        return -ENOSPC;
    *hdr_len = sp.hl;
    for (uint32_t i = 0; i < sp.nseg; i++) {
        uint32_t chunk = chunk_of(&sp, i), off = FP_VNET_HDR_LEN + sp.hl + i * sp.gso;
        seg_headers(hdrs + (size_t)i * sp.hl, &sp, i, buf + off, chunk);
        pay_off[i] = off;
        pay_len[i] = chunk;
    }
    return (int)sp.nseg;
}

/* A TCP segment that may take part in coalescing: option-less IPv4, not a fragment and no
 * IP flag but DF (a merged run carries its first segment's flags, so the reserved bit of one
 * would be given to, or taken from, the others: Linux's inet_gro_receive does not merge
 * either), data, ACK set and none of SYN/FIN/RST/URG/ECE/CWR, checksum valid (merging must not
 * hide a corrupted segment behind the NEEDS_CSUM of the super-packet).  Returns the TCP header
 * length, or 0. */
static uint32_t gro_candidate(const uint8_t *p, uint32_t len)
{
    if (len < 40 || p[0] != 0x45 || p[IP_OFF_PROTO] != IPPROTO_TCP_
        || (rd16(p + IP_OFF_FRAG) & IP_NOT_DF) != 0 || rd16(p + IP_OFF_TOTLEN) != len)
        return 0;
    const uint8_t *t = p + 20;
    uint32_t thl = (uint32_t)(t[12] >> 4) * 4;
    if (thl < 20 || 20 + thl >= len)
        return 0;
    uint8_t fl = t[13];
    if (!(fl & TCP_ACK) || (fl & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR)))
        return 0;
    if (csum_fold(csum_add(pseudo_sum(p, IPPROTO_TCP_, len - 20), t, len - 20)) != 0xffff)
        return 0;
    return thl;
}

/* May cur follow prev (a run started by first, with gso bytes of payload per segment)? */
static int gro_follows(const uint8_t *first, const uint8_t *prev, uint32_t prev_len,
                       const uint8_t *cur, uint32_t cur_len, uint32_t thl, uint32_t gso)
{
    const uint8_t *ft = first + 20, *pt = prev + 20, *ct = cur + 20;
    if (prev_len - 20 - thl != gso || (pt[13] & TCP_PSH))
        return 0; /* prev was short or pushed: it ended the run */
    if (cur_len - 20 - thl > gso)
        return 0;
    /* same TOS, DF, TTL, addresses; same ports, ack, header length, flags but PSH, window
     * and options; next sequence number */
    if (first[1] != cur[1] || (first[6] & 0x40) != (cur[6] & 0x40) || first[8] != cur[8]
        || memcmp(first + 12, cur + 12, 8) != 0)
        return 0;
    if (memcmp(ft, ct, 4) != 0 || memcmp(ft + 8, ct + 8, 4) != 0 || ft[12] != ct[12]
        || (ft[13] | TCP_PSH) != (ct[13] | TCP_PSH) || memcmp(ft + 14, ct + 14, 2) != 0
        || memcmp(ft + 20, ct + 20, thl - 20) != 0)
        return 0;
    return rd32(ct + 4) == rd32(pt + 4) + gso;
}

/* The run of segments that may merge starting at pkts[i]: returns j (the run is pkts[i:j])
 * and sets *thl (TCP header length, 0 when pkts[i] merges with nothing), *gso and *total (the
 * merged packet's length). */
static uint32_t gro_run(uint8_t **pkts, const uint32_t *lens, uint32_t n, uint32_t i,
                        uint32_t *thl, uint32_t *gso, uint32_t *total)
{
    uint32_t j = i + 1, t = gro_candidate(pkts[i], lens[i]);
    uint32_t g = t ? lens[i] - 20 - t : 0, tot = lens[i];
    while (t && j < n && j - i < FP_GSO_MAX_SEGS && gro_candidate(pkts[j], lens[j]) == t
           && tot + lens[j] - 20 - t <= FP_IP_MAX_LEN
           && gro_follows(pkts[i], pkts[j - 1], lens[j - 1], pkts[j], lens[j], t, g)) {
        tot += lens[j] - 20 - t;
        j++;
    }
    *thl = t;
    *gso = g;
    *total = tot;
    return j;
}

/* What a TUN write of pkts[i:j] starts with, written at v: the virtio-net header (zero for
 * a lone packet), and for a merged run the merged packet's IPv4 and TCP headers (IP length,
 * checksum, PSH of the last segment, the pseudo-header sum for CHECKSUM_PARTIAL).  Returns
 * the bytes written; the payloads follow. */
static uint32_t gro_head(uint8_t *v, uint8_t **pkts, uint32_t i, uint32_t j, uint32_t thl,
                         uint32_t gso, uint32_t total)
{
    memset(v, 0, FP_VNET_HDR_LEN);
    if (j - i == 1)
        return FP_VNET_HDR_LEN;
    uint32_t hl = 20 + thl;
    uint8_t *p = v + FP_VNET_HDR_LEN;
    v[0] = FP_VNET_F_NEEDS_CSUM;
    v[1] = FP_VNET_GSO_TCPV4;
    wle16(v + 2, (uint16_t)hl);
    wle16(v + 4, (uint16_t)gso);
    wle16(v + 6, 20);
    wle16(v + 8, 16);
    memcpy(p, pkts[i], hl);
    p[20 + 13] |= pkts[j - 1][20 + 13] & TCP_PSH;
    ip_fix(p, 20, total, rd16(pkts[i] + 4));
    /* CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel completes it
     * from csum_start (RFC 1071 linearity). */
    wr16(p + 20 + 16, csum_fold(pseudo_sum(p, IPPROTO_TCP_, total - 20)));
    return FP_VNET_HDR_LEN + hl;
}

int fp_gro_coalesce(uint8_t **pkts, const uint32_t *lens, uint32_t n, uint8_t *out,
                    uint32_t out_cap, uint32_t *out_lens, uint32_t *out_segs, uint32_t max_out)
{
    uint32_t m = 0, used = 0, i = 0;
    while (i < n) {
        uint32_t thl, gso, total, j = gro_run(pkts, lens, n, i, &thl, &gso, &total);
        if (m >= max_out || used + FP_VNET_HDR_LEN + total > out_cap)
            return -ENOSPC;
        uint8_t *o = out + used;
        uint32_t at = gro_head(o, pkts, i, j, thl, gso, total);
        uint32_t skip = j - i == 1 ? 0 : 20 + thl; /* a lone packet goes whole */
        for (uint32_t k = i; k < j; k++) {
            memcpy(o + at, pkts[k] + skip, lens[k] - skip);
            at += lens[k] - skip;
        }
        out_lens[m] = at;
        out_segs[m] = j - i;
        used += at;
        m++;
        i = j;
    }
    return (int)m;
}

int fp_gro_coalesce_spans(uint8_t **pkts, const uint32_t *lens, uint32_t n, uint8_t *hdrs,
                          uint32_t hdrs_cap, fp_span *spans, uint32_t max_spans,
                          uint32_t *out_span0, uint32_t *out_nspans, uint32_t *out_segs,
                          uint32_t max_out)
{
    uint32_t m = 0, used = 0, ns = 0, i = 0;
    while (i < n) {
        uint32_t thl, gso, total, j = gro_run(pkts, lens, n, i, &thl, &gso, &total);
        if (m >= max_out || used + FP_VNET_HDR_LEN + 20 + thl > hdrs_cap
            || ns + 1 + (j - i) > max_spans)
            return -ENOSPC;
        uint32_t head = gro_head(hdrs + used, pkts, i, j, thl, gso, total);
        uint32_t skip = j - i == 1 ? 0 : 20 + thl;
        out_span0[m] = ns;
        spans[ns++] = (fp_span){ .base = hdrs + used, .len = head };
        for (uint32_t k = i; k < j; k++)
            spans[ns++] = (fp_span){ .base = pkts[k] + skip, .len = lens[k] - skip };
        out_nspans[m] = 1 + (j - i);
        out_segs[m] = j - i;
        used += head;
        m++;
        i = j;
    }
    return (int)m;
}
