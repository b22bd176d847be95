/* packet.c - the sans-IO core: IPv4 validation, TTL decrement (RFC 1624), ICMP errors,
 * the ICMP token bucket, the ingress source check (who may write into the TUN), the
 * per-packet verdicts fp_egress / fp_ingress, and fp_egress_super, fp_egress's verdict made
 * once for all segments of a super-packet (the egress vnet path).
 * No syscalls, no globals, no allocation: everything works on caller-owned bytes. */
#include "internal.h"

#define NS_PER_SEC 1000000000ULL

int fp_ctx_init(fp_ctx *cx, uint32_t local_ip, uint32_t mtu, uint32_t per_packet,
                uint32_t icmp_rate, uint32_t icmp_burst, uint32_t local_net,
                uint32_t local_plen, uint32_t peer_check)
{
    if (mtu < 68 || mtu > 65535 || local_plen > 32 || peer_check > FP_PEER_CHECK_STRICT)
        return -EINVAL;
    uint32_t mask = local_plen ? 0xffffffffu << (32 - local_plen) : 0;
    if (local_net & ~mask)
        return -EINVAL;
    memset(cx, 0, sizeof(*cx));
    cx->local_ip = local_ip;
    cx->local_net = local_net;
    cx->local_mask = mask;
    cx->peer_check = peer_check;
    cx->mtu = mtu;
    cx->per_packet = per_packet ? 1 : 0;
    cx->icmp_rate = icmp_rate;
    cx->icmp_burst = icmp_burst;
    cx->icmp_tokens = icmp_burst;
    return 0;
}

uint16_t fp_checksum(const uint8_t *buf, uint32_t len)
{
    return (uint16_t)~csum_fold(csum_add(0, buf, len));
}

/* Returns a FP_DROP_* reason, or -1 when the header is fine; trims *len to the total length. */
static int validate(const fp_ctx *cx, const uint8_t *pkt, uint32_t *len)
{
    uint32_t n = *len;
    if (n < 20)
        return FP_DROP_TOO_SHORT;
    if ((pkt[0] >> 4) != 4)
        return FP_DROP_NOT_IPV4;
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
    if (ihl < 20 || ihl > n)
        return FP_DROP_BAD_HEADER;
    uint32_t tot = rd16(pkt + IP_OFF_TOTLEN);
    if (tot < ihl)
        return FP_DROP_BAD_HEADER;
    if (tot > n)
        return FP_DROP_TRUNCATED;
    *len = tot;
    if (tot > cx->mtu)
        return FP_DROP_OVERSIZE;
    if (fp_checksum(pkt, ihl) != 0)
        return FP_DROP_BAD_CHECKSUM;
    return -1;
}

static int take_token(fp_ctx *cx, uint64_t now_ns)
{
    if (cx->icmp_rate == 0)
        return 0;
    uint64_t elapsed = now_ns > cx->icmp_last_ns ? now_ns - cx->icmp_last_ns : 0;
    if (elapsed >= NS_PER_SEC) {
        cx->icmp_tokens = cx->icmp_burst;
        cx->icmp_last_ns = now_ns;
    } else {
        uint64_t add = elapsed * cx->icmp_rate / NS_PER_SEC;
        if (add > 0) {
            uint64_t t = (uint64_t)cx->icmp_tokens + add;
            cx->icmp_tokens = (uint32_t)(t < cx->icmp_burst ? t : cx->icmp_burst);
            cx->icmp_last_ns += add * NS_PER_SEC / cx->icmp_rate;
        }
    }
    if (cx->icmp_tokens == 0)
        return 0;
    cx->icmp_tokens--;
    return 1;
}

/* RFC 792 / RFC 1812 4.3.2.7: no ICMP error about an ICMP error, a non-first fragment,
 * or a packet from/to an address that does not name a single host. */
static int may_answer(const uint8_t *pkt, uint32_t len)
{
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
    if (pkt[IP_OFF_PROTO] == IPPROTO_ICMP_) {
        if (ihl + 1 > len)
            return 0;
        uint8_t type = pkt[ihl];
        if (type == 3 || type == 4 || type == 5 || type == 11 || type == 12)
            return 0;
    }
    if ((rd16(pkt + IP_OFF_FRAG) & 0x1fff) != 0)
        return 0;
    uint32_t src = rd32(pkt + IP_OFF_SRC), dst = rd32(pkt + IP_OFF_DST);
    if (src == 0 || src >= 0xe0000000u || dst >= 0xe0000000u)
        return 0;
    return 1;
}

/* next_mtu: the Next-Hop MTU field of a fragmentation-needed error (RFC 1191), else 0. */
static uint32_t build_icmp_error(const fp_ctx *cx, const uint8_t *pkt, uint32_t len,
                                 uint8_t type, uint8_t code, uint16_t next_mtu, uint8_t *reply)
{
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
    uint32_t quote = ihl + 8 < len ? ihl + 8 : len;
    uint32_t total = 20 + 8 + quote;
    uint8_t *ip = reply, *icmp = reply + 20;

    memset(reply, 0, 28);
    ip[0] = 0x45;
    wr16(ip + IP_OFF_TOTLEN, (uint16_t)total);
    ip[IP_OFF_TTL] = FP_ICMP_TTL;
    ip[IP_OFF_PROTO] = IPPROTO_ICMP_;
    wr32(ip + IP_OFF_SRC, cx->local_ip);
    memcpy(ip + IP_OFF_DST, pkt + IP_OFF_SRC, 4);
    wr16(ip + IP_OFF_CSUM, fp_checksum(ip, 20));

    icmp[0] = type;
    icmp[1] = code;
    wr16(icmp + 6, next_mtu);
    memcpy(icmp + 8, pkt, quote);
    wr16(icmp + 2, fp_checksum(icmp, 8 + quote));
    return total;
}

/* The ICMP decision shared by every error (time exceeded, unreachable, fragmentation
 * needed): type/code, and for 3/4 the next-hop MTU.  Returns a verdict. */
static int answer(fp_ctx *cx, const uint8_t *pkt, uint32_t len, uint64_t now_ns,
                  uint8_t type, uint8_t code, uint8_t *reply, uint32_t *reply_len)
{
    if (!may_answer(pkt, len))
        return FP_DROP;
    if (!take_token(cx, now_ns)) {
        cx->stats.icmp_ratelimited++;
        return FP_DROP;
    }
    *reply_len = build_icmp_error(cx, pkt, len, type, code,
                                  type == 3 && code == 4 ? (uint16_t)cx->mtu : 0, reply);
    if (type == 3)
        cx->stats.icmp_unreachable++;
    else
        cx->stats.icmp_time_exceeded++;
    return FP_REPLY;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), m the 16-bit word holding TTL and protocol. */
static void decrement_ttl(uint8_t *pkt)
{
    uint32_t old_word = rd16(pkt + IP_OFF_TTL);
    pkt[IP_OFF_TTL]--;
    uint32_t new_word = rd16(pkt + IP_OFF_TTL);
    uint32_t sum = (uint16_t)~rd16(pkt + IP_OFF_CSUM);
    sum += (uint16_t)~old_word;
    sum += new_word;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    wr16(pkt + IP_OFF_CSUM, (uint16_t)~sum);
}

/* RFC 1191: a DF packet over the mtu is answered with fragmentation needed - so that a TUN
 * MTU set above the path's is found out by PMTU discovery, not blackholed.  Only a header
 * whose checksum verifies is answered (validate stopped before checking it). */
int fp_egress_too_big(fp_ctx *cx, const uint8_t *pkt, uint32_t len, uint64_t now_ns,
                      uint8_t *reply, uint32_t *reply_len)
{
    if (len < 20 || (pkt[0] >> 4) != 4)
        return FP_DROP;
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
    if (ihl < 20 || ihl > len || !(rd16(pkt + IP_OFF_FRAG) & IP_DF) || fp_checksum(pkt, ihl) != 0)
        return FP_DROP;
    uint32_t tot = rd16(pkt + IP_OFF_TOTLEN);
    return answer(cx, pkt, tot >= ihl && tot < len ? tot : len, now_ns, 3, 4, reply, reply_len);
}

/* Step 1, counted in st: the drop reason, or -1 for a valid header. */
static int valid(fp_ctx *cx, fp_dir_stats *st, uint8_t *pkt, uint32_t *len)
{
    int why = validate(cx, pkt, len);
    if (why >= 0)
        st->drops[why]++;
    return why;
}

static int ttl_expired(fp_ctx *cx, fp_dir_stats *st, const uint8_t *pkt, uint32_t len,
                       uint64_t now_ns, uint8_t *reply, uint32_t *reply_len)
{
    if (pkt[IP_OFF_TTL] > 1)
        return -1;
    st->drops[FP_DROP_TTL_EXCEEDED]++;
    return answer(cx, pkt, len, now_ns, 11, 0, reply, reply_len);
}

int fp_egress(fp_ctx *cx, const fp_routes *rt, uint8_t *pkt, uint32_t *len, uint64_t now_ns,
              fp_hop *hop, uint8_t *reply, uint32_t *reply_len)
{
    int why = valid(cx, &cx->stats.egress, pkt, len);
    if (why >= 0) /* a DF packet over the mtu is answered, as a router would */
        return why == FP_DROP_OVERSIZE ? fp_egress_too_big(cx, pkt, *len, now_ns, reply, reply_len)
                                       : FP_DROP;
    int v = ttl_expired(cx, &cx->stats.egress, pkt, *len, now_ns, reply, reply_len);
    if (v >= 0)
        return v;
    if (fp_routes_lookup(rt, rd32(pkt + IP_OFF_DST), hop) < 0) {
        cx->stats.egress.drops[FP_DROP_NO_ROUTE]++;
        return answer(cx, pkt, *len, now_ns, 3, 0, reply, reply_len);
    }
    decrement_ttl(pkt);
    return FP_FORWARD;
}

int fp_egress_super(const fp_ctx *cx, const fp_routes *rt, uint8_t *frame, uint32_t len,
                    uint8_t *hdrs, uint32_t hdrs_cap, uint32_t *hdr_len, uint32_t *pay_off,
                    uint32_t *pay_len, uint32_t max_segs, fp_hop *hop)
{
    if (len < FP_VNET_HDR_LEN + 20 || (frame[1] & (uint8_t)~FP_VNET_GSO_ECN) == FP_VNET_GSO_NONE)
        return 0;
    const uint8_t *ip = frame + FP_VNET_HDR_LEN;
    /* fp_egress's verdict for each segment: they share version, TTL and destination.  The
     * other checks (lengths, header checksum) hold for segments the split builds. */
    if ((ip[0] >> 4) != 4 || ip[IP_OFF_TTL] <= 1
        || fp_routes_lookup(rt, rd32(ip + IP_OFF_DST), hop) < 0)
        return 0;
    int n = fp_gso_split_hdrs(frame, len, cx->mtu, hdrs, hdrs_cap, hdr_len, pay_off, pay_len,
                              max_segs);
    for (int i = 0; i < n; i++)
        decrement_ttl(hdrs + (size_t)i * *hdr_len);
    return n;
}

int fp_ingress_outer(const fp_ctx *cx, const fp_routes *rt, uint32_t src_ip)
{
    if (cx->peer_check == FP_PEER_CHECK_OFF || fp_routes_peer(rt, src_ip, 0) >= 0)
        return -1;
    return FP_DROP_UNKNOWN_PEER;
}

/* Step 1b, strict only: the inner addresses of a valid header against who sent it; from is
 * fp_routes_peer's answer for the sender and the inner source. */
static int inner_check(const fp_ctx *cx, const uint8_t *pkt, int from)
{
    if (cx->peer_check != FP_PEER_CHECK_STRICT)
        return -1;
    if (from != 1)
        return FP_DROP_SPOOFED_SOURCE;
    uint32_t dst = rd32(pkt + IP_OFF_DST);
    if ((dst & cx->local_mask) != cx->local_net && dst != cx->local_ip)
        return FP_DROP_NOT_LOCAL;
    return -1;
}

int fp_ingress(fp_ctx *cx, const fp_routes *rt, uint8_t *pkt, uint32_t *len, uint32_t src_ip,
               uint64_t now_ns, uint8_t *reply, uint32_t *reply_len)
{
    fp_dir_stats *st = &cx->stats.ingress;
    /* One peer-table lookup answers steps 0 and 1b: the inner source is read before the header
     * is validated (validation changes no byte), and used only once it has been. */
    int from = 1, why = -1;
    if (cx->peer_check != FP_PEER_CHECK_OFF) {
        from = fp_routes_peer(rt, src_ip, *len >= 20 ? rd32(pkt + IP_OFF_SRC) : 0);
        if (from < 0)
            why = FP_DROP_UNKNOWN_PEER;
    }
    if (why < 0) {
        if (valid(cx, st, pkt, len) >= 0)
            return FP_DROP;
        why = inner_check(cx, pkt, from);
    }
    if (why >= 0) {
        st->drops[why]++;
        return FP_DROP;
    }
    int v = ttl_expired(cx, st, pkt, *len, now_ns, reply, reply_len);
    if (v >= 0)
        return v;
    decrement_ttl(pkt);
    return FP_FORWARD;
}
