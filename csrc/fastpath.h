/* fastpath.h - THE contract between udpbackend's Python side and its C fast path.
 * This file is fed verbatim to cffi's cdef(), so it holds only plain integer #defines,
 * typedefs and prototypes: no #include, no macros with arguments, no inline code.
 * udpbackend/dataplane/packet.py is the pure-Python twin of everything declared here, with
 * the same names (FP_ dropped) and the same semantics; tests hold the two to each other.
 *
 * Rules for every function below:
 *   - no globals, no malloc per packet (the route table allocates on set only), no logging;
 *   - integers are in HOST byte order (an IPv4 address is the uint32 ipaddress gives);
 *   - return >= 0 on success or -errno; per-packet problems are never errors, they are
 *     counted in fp_stats and the packet is dropped;
 *   - the caller owns every buffer; C borrows pointers only for the duration of a call.
 *
 * Wire format (flannel's UDP backend): the UDP payload is exactly one raw IPv4 packet,
 * nothing before it.  Both directions decrement the TTL (RFC 1624 checksum update).
 */

#define FP_DEFAULT_PORT 8285
#define FP_MAX_BATCH 64          /* packets per batch syscall, upper bound of fp_batch.nslots */
#define FP_MAX_SLOT 65536        /* largest useful slot: an IPv4 packet is <= 65535 bytes */
#define FP_REPLY_MAX 96          /* largest ICMP error we build: 20 + 8 + 60 (hdr) + 8 */
#define FP_ICMP_TTL 8            /* TTL of generated ICMP errors (flannel uses 8) */
#define FP_GSO_MAX_SEGS 64       /* datagrams per UDP_SEGMENT message (the kernel's limit before 6.11) */
#define FP_IP_MAX_LEN 65535      /* largest IPv4 packet: its total length field */
#define FP_UDP_MAX_PAYLOAD 65507 /* FP_IP_MAX_LEN - 20 (IPv4) - 8 (UDP): the most one UDP message
                                  * holds, one datagram or a UDP_SEGMENT send or a UDP_GRO receive */
#define FP_SEG_HDR_MAX 120       /* largest IPv4 + L4 header of a segment: 60 + 60 (TCP options) */
#define FP_SPAN_HDR_MAX 130      /* largest header block of one TUN write on the ingress vnet path:
                                  * FP_VNET_HDR_LEN + FP_SEG_HDR_MAX */

/* Verdicts of fp_egress / fp_ingress. */
#define FP_FORWARD 0             /* pass pkt[0:*len] on (to hop / into the TUN) */
#define FP_REPLY 1               /* pkt dropped; reply[0:*reply_len] is an ICMP error to deliver */
#define FP_DROP 2                /* pkt dropped; the reason was counted */

/* Drop reasons: indexes into fp_dir_stats.drops.  Checked in this order, but for the source
 * check of ingress (fp_ingress): UNKNOWN_PEER before everything, SPOOFED_SOURCE and NOT_LOCAL
 * right after BAD_CHECKSUM. */
#define FP_DROP_TOO_SHORT 0      /* fewer than 20 bytes */
#define FP_DROP_NOT_IPV4 1       /* version nibble is not 4 (e.g. IPv6 noise on the TUN) */
#define FP_DROP_BAD_HEADER 2     /* IHL < 5, IHL*4 > bytes received, or total length < IHL*4 */
#define FP_DROP_TRUNCATED 3      /* total length > bytes received */
#define FP_DROP_OVERSIZE 4       /* total length > mtu */
#define FP_DROP_BAD_CHECKSUM 5   /* IPv4 header checksum does not verify */
#define FP_DROP_TTL_EXCEEDED 6   /* TTL <= 1: would reach 0 here */
#define FP_DROP_NO_ROUTE 7       /* egress only: no route for the destination */
#define FP_DROP_TX_ERROR 8       /* sendmmsg/sendto/write refused the packet, or the socket stayed full */
#define FP_DROP_BAD_OFFLOAD 9    /* egress with vnet: a virtio-net header or super-packet we cannot split */
#define FP_DROP_UNKNOWN_PEER 10  /* ingress: the datagram's source address is no route's next hop */
#define FP_DROP_SPOOFED_SOURCE 11 /* ingress, strict: inner source outside the sending peer's subnets */
#define FP_DROP_NOT_LOCAL 12     /* ingress, strict: inner destination outside this node's subnet */
#define FP_DROP_REASONS 13

/* Ingress source check (fp_ctx.peer_check), the --peer-check flag. */
#define FP_PEER_CHECK_OFF 0      /* flannel's behaviour: any datagram from anywhere is written */
#define FP_PEER_CHECK_PEER_ONLY 1 /* the datagram's source address must be a known peer's */
#define FP_PEER_CHECK_STRICT 2   /* ...and the inner source inside that peer's subnet(s), the
                                  * inner destination inside this node's subnet (or local_ip) */

/* Syscall kinds: indexes into fp_stats.syscalls.  Calls that return EAGAIN count too. */
#define FP_SYS_READ 0
#define FP_SYS_WRITE 1
#define FP_SYS_SENDMMSG 2
#define FP_SYS_RECVMMSG 3
#define FP_SYS_SENDTO 4
#define FP_SYS_RECVFROM 5
#define FP_SYS_POLL 6
#define FP_SYS_KINDS 7

/* Batch-size histogram: bucket k counts batches of size in [2^k, 2^(k+1)), the last bucket
 * also everything larger.  A batch is what one round of a pump took in (n >= 1). */
#define FP_HIST_BUCKETS 8

typedef struct {
    uint64_t rx_packets;         /* taken in: read from the TUN (egress) / received over UDP (ingress) */
    uint64_t rx_bytes;
    uint64_t tx_packets;         /* passed on: sent to a peer (egress) / written into the TUN (ingress) */
    uint64_t tx_bytes;
    uint64_t drops[FP_DROP_REASONS];
    uint64_t batches;
    uint64_t batch_hist[FP_HIST_BUCKETS];
} fp_dir_stats;

typedef struct {
    fp_dir_stats egress;         /* TUN -> UDP */
    fp_dir_stats ingress;        /* UDP -> TUN */
    uint64_t icmp_unreachable;   /* ICMP dest-unreachable (3/0) replies built */
    uint64_t icmp_time_exceeded; /* ICMP time-exceeded (11/0) replies built */
    uint64_t icmp_ratelimited;   /* replies suppressed by the token bucket */
    uint64_t gso_sends;          /* egress: messages that carried several datagrams (UDP_SEGMENT) */
    uint64_t gro_receives;       /* ingress: receives that held several datagrams (UDP_GRO) */
    uint64_t tso_reads;          /* egress with vnet: TUN reads that were super-packets (split here) */
    uint64_t tun_gro_writes;     /* ingress with vnet: TUN writes that merged several segments */
    uint64_t syscalls[FP_SYS_KINDS];
} fp_stats;

/* One forwarding context: configuration, ICMP token bucket and counters.
 * Allocated by the caller (ffi.new), set up with fp_ctx_init, then only read by the caller.
 * Not shared between threads. */
typedef struct {
    uint32_t local_ip;           /* the TUN's address: source of generated ICMP errors */
    uint32_t local_net;          /* this node's subnet (its lease): where ingress may deliver */
    uint32_t local_mask;         /* ...as a netmask (from the prefix length) */
    uint32_t peer_check;         /* FP_PEER_CHECK_*: the ingress source check */
    uint32_t mtu;                /* largest packet accepted in either direction */
    uint32_t per_packet;         /* 1: one read + one sendto per packet (flannel's loop); 0: batched */
    uint32_t udp_gso;            /* batched: coalesce runs of equal-size packets to one peer into one
                                  * UDP_SEGMENT message (set by fp_udp_offloads; cleared if the
                                  * kernel refuses with EIO) */
    uint32_t udp_gro;            /* batched: the socket has UDP_GRO on, a receive may hold several
                                  * datagrams of one size (set by fp_udp_offloads; ingress slots
                                  * must then hold a GRO receive, see fp_batch) */
    uint32_t vnet;               /* batched: the TUN was opened with IFF_VNET_HDR, so every read and
                                  * write carries a virtio-net header (set by the caller before
                                  * the first pump call; needs fp_batch.aux, see fp_batch) */
    uint32_t icmp_rate;          /* ICMP errors per second refilled into the bucket; 0: never send */
    uint32_t icmp_burst;         /* bucket capacity */
    uint32_t icmp_tokens;        /* state: tokens left */
    uint64_t icmp_last_ns;       /* state: time of the last refill */
    fp_stats stats;
} fp_ctx;

/* Next hop of a forwarded packet. */
typedef struct {
    uint32_t ip;
    uint16_t port;
} fp_hop;

/* A batch arena: nslots slots of slot_size bytes at arena, slot i at arena + i * slot_size.
 * Owned by the caller; 1 <= nslots <= FP_MAX_BATCH, and mtu + 1 <= slot_size <= FP_MAX_SLOT
 * (so that an over-MTU datagram is seen whole, never truncated).  Any such size is valid: the
 * pumps never touch a byte outside arena[0:nslots * slot_size] nor outside aux[0:aux_size].
 * Further rules, else the pump returns -EINVAL before taking anything in:
 *   - fp_udp_to_tun with cx->udp_gro: slot_size >= FP_UDP_MAX_PAYLOAD, so that a GRO receive
 *     (up to FP_UDP_MAX_PAYLOAD bytes of datagrams) is never cut;
 *   - cx->vnet (both pumps): aux set, and nslots * slot_size >= FP_VNET_HDR_LEN +
 *     FP_IP_MAX_LEN, the largest frame a TUN read may return (egress reads frames one after
 *     another into the arena, not slot by slot). */
typedef struct {
    uint8_t *arena;
    uint32_t slot_size;
    uint32_t nslots;
    uint8_t *aux;                /* vnet only, caller-owned, >= FP_AUX_MIN bytes: egress puts the
                                  * headers of split segments here (whole segments on the general
                                  * path), ingress the headers of merged runs */
    uint32_t aux_size;
} fp_batch;

/* Route table: longest-prefix match of IPv4 destinations to next hops.  Exact-match hash per
 * prefix length, so a lookup costs one probe per prefix length in use (one in a flannel
 * network, where every lease has SubnetLen), whatever the number of routes. */
typedef struct fp_routes fp_routes;

/* NULL when out of memory.  Free with fp_routes_free (Python: ffi.gc). */
fp_routes *fp_routes_new(void);
void fp_routes_free(fp_routes *rt);
/* Add or replace net/prefix_len -> (peer_ip, peer_port).  0: added, 1: replaced,
 * -EINVAL: prefix_len > 32 or host bits set in net, -ENOMEM. */
int fp_routes_set(fp_routes *rt, uint32_t net, uint32_t prefix_len, uint32_t peer_ip, uint16_t peer_port);
/* 0: removed, -ENOENT: no such route, -EINVAL: as for set. */
int fp_routes_del(fp_routes *rt, uint32_t net, uint32_t prefix_len);
/* Longest match for addr: returns its prefix length (0..32) and fills *hop, or -ENOENT. */
int fp_routes_lookup(const fp_routes *rt, uint32_t addr, fp_hop *hop);
/* Number of routes held. */
int fp_routes_count(const fp_routes *rt);

/* The peer-address table beside the routes, kept by fp_routes_set / fp_routes_del alone: each
 * public IP that is some route's next hop (the port plays no part), with the subnets of the
 * routes naming it - one in flannel, more while a lease moves or when one address holds
 * several leases.  A lookup is one hash probe and a scan of that peer's own subnets, whatever
 * the number of peers.
 * fp_routes_peer: -ENOENT when peer_ip is no route's next hop, else 1 when addr lies in one of
 * the subnets of the routes naming it, 0 when not. */
int fp_routes_peer(const fp_routes *rt, uint32_t peer_ip, uint32_t addr);
/* The subnets naming peer_ip, in no particular order: the first min(n, max) into
 * nets[] / plens[]; returns n (> 0), or -ENOENT. */
int fp_routes_peer_subnets(const fp_routes *rt, uint32_t peer_ip, uint32_t *nets,
                           uint32_t *plens, uint32_t max);
/* Number of distinct public IPs in the peer table. */
int fp_routes_peer_count(const fp_routes *rt);

/* Set up cx: the given config, a full token bucket, zeroed counters.  local_net/local_plen is
 * this node's subnet.  0 or -EINVAL when mtu < 68 or mtu > 65535, local_plen > 32, host bits
 * are set in local_net, or peer_check is not a FP_PEER_CHECK_*. */
int fp_ctx_init(fp_ctx *cx, uint32_t local_ip, uint32_t mtu, uint32_t per_packet,
                uint32_t icmp_rate, uint32_t icmp_burst, uint32_t local_net,
                uint32_t local_plen, uint32_t peer_check);

/* Probe and switch on UDP segmentation offloads for udp_fd: want is a mask of
 * FP_OFFLOAD_GSO | FP_OFFLOAD_GRO; returns the mask actually enabled (>= 0) and sets
 * cx->udp_gso / cx->udp_gro accordingly.  Never enabled in per_packet mode.  Either way every
 * datagram on the wire still carries exactly one IPv4 packet: GSO segments before the wire,
 * GRO merges after it. */
#define FP_OFFLOAD_GSO 1
#define FP_OFFLOAD_GRO 2
int fp_udp_offloads(fp_ctx *cx, int udp_fd, uint32_t want);

/* TUN offloads (IFF_VNET_HDR): every TUN read and write starts with this 10-byte header,
 * little-endian: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset. */
#define FP_VNET_HDR_LEN 10
#define FP_VNET_F_NEEDS_CSUM 1
#define FP_VNET_GSO_NONE 0
#define FP_VNET_GSO_TCPV4 1
#define FP_VNET_GSO_UDP_L4 5
#define FP_VNET_GSO_ECN 0x80
#define FP_AUX_MIN 262144        /* >= FP_IP_MAX_LEN + FP_MAX_QUEUE * FP_SEG_HDR_MAX (egress) and
                                  * FP_MAX_QUEUE * FP_SPAN_HDR_MAX (ingress) */
#define FP_MAX_QUEUE 512         /* segments queued between two sends on the egress vnet path */

/* Split buf[0:len] (a virtio-net header, then an IPv4 packet as read from the TUN) into
 * IPv4 packets of at most mtu bytes, written one after another into out[0:out_cap] with
 * seg_lens[i] their lengths: GSO_NONE -> the packet itself, its L4 checksum completed if
 * NEEDS_CSUM; TCPV4 / UDP_L4 -> gso_size payload bytes per segment, headers copied, IP
 * length, id (+i) and checksum, TCP sequence number (FIN/PSH only on the last, CWR only on the
 * first) or UDP length, and the full L4 checksum set.  hdr_len is not trusted; bytes past
 * the IPv4 total length are ignored.  Only a cut is held to mtu: a GSO_NONE packet is returned
 * whole whatever its length (the egress pump's fp_egress then drops one over the mtu as
 * oversize, as it does without vnet headers).  Returns the number of segments, -EINVAL for a
 * header or packet that cannot be split, -EMSGSIZE when a segment cut from a TCPV4/UDP_L4
 * super-packet would pass mtu (counted as an oversize drop by the pump), -ENOSPC when out or
 * max_segs is too small (out needs the packet's length plus FP_SEG_HDR_MAX per segment). */
int fp_gso_split(const uint8_t *buf, uint32_t len, uint32_t mtu, uint8_t *out, uint32_t out_cap,
                 uint32_t *seg_lens, uint32_t max_segs);

/* fp_gso_split without copying payloads (the egress pump's path): segment i is the
 * *hdr_len bytes at hdrs + i * *hdr_len (its IPv4 and L4 headers, set as fp_gso_split sets
 * them, checksum included) followed by the pay_len[i] bytes at buf + pay_off[i], left in
 * place.  A GSO_NONE packet is one segment with *hdr_len = 0 and its L4 checksum completed in
 * place in buf (hence not const).  The segments' bytes equal fp_gso_split's.  Same checks and
 * errors as fp_gso_split; -ENOSPC when max_segs or hdrs_cap is too small (FP_SEG_HDR_MAX
 * bytes per segment always suffice). */
int fp_gso_split_hdrs(uint8_t *buf, uint32_t len, uint32_t mtu, uint8_t *hdrs, uint32_t hdrs_cap,
                      uint32_t *hdr_len, uint32_t *pay_off, uint32_t *pay_len, uint32_t max_segs);

/* Merge pkts[0:n] (IPv4 packets, in order) for TUN writes: each run of consecutive segments of
 * one TCP flow (option-less IPv4, ACK and no SYN/FIN/RST/URG/ECE/CWR, valid checksum, same
 * addresses, ports, TOS, DF, TTL, ack, window and options, contiguous sequence numbers, all
 * of one payload size but a shorter or PSH-marked last, <= FP_GSO_MAX_SEGS and 65535 bytes)
 * becomes one super-packet with a TCPV4/NEEDS_CSUM virtio-net header; anything else passes
 * alone behind a zero header.  Output i is out_lens[i] bytes (header included) carrying
 * out_segs[i] input packets, one after another in out.  Order is kept.  Only the TCP checksum
 * is verified here (the pump has checked every IPv4 header before).  Returns the number of
 * outputs or -ENOSPC. */
int fp_gro_coalesce(uint8_t **pkts, const uint32_t *lens, uint32_t n, uint8_t *out,
                    uint32_t out_cap, uint32_t *out_lens, uint32_t *out_segs, uint32_t max_out);

/* A piece of a TUN write: len bytes at base, in memory the caller owns. */
typedef struct {
    const uint8_t *base;
    uint32_t len;
} fp_span;

/* fp_gro_coalesce without copying payloads (the ingress pump's path): output i is the
 * out_nspans[i] spans from spans[out_span0[i]], written with one writev: a header block in
 * hdrs (the virtio-net header, and for a merged run the run's IPv4 and TCP headers as
 * fp_gro_coalesce sets them), then the packets' bytes where they lie (a merged run's
 * payloads only).  Joined, output i is byte for byte fp_gro_coalesce's output i, carrying
 * out_segs[i] input packets.  Returns the number of outputs or -ENOSPC (hdrs_cap, max_spans
 * or max_out too small; n + max_out spans and FP_SPAN_HDR_MAX header bytes per output always
 * suffice). */
int fp_gro_coalesce_spans(uint8_t **pkts, const uint32_t *lens, uint32_t n, uint8_t *hdrs,
                          uint32_t hdrs_cap, fp_span *spans, uint32_t max_spans,
                          uint32_t *out_span0, uint32_t *out_nspans, uint32_t *out_segs,
                          uint32_t max_out);

/* Internet checksum (RFC 1071) of buf[0:len], folded and complemented: 0 over a valid header. */
uint16_t fp_checksum(const uint8_t *buf, uint32_t len);

/* The sans-IO core.  Decide one packet of *len bytes at pkt, pkt having room for at least
 * *len bytes; now_ns is a monotonic clock for the ICMP token bucket.
 *   0. ingress only, peer_check >= PEER_ONLY: src_ip (the datagram's source address) must be
 *      in rt's peer table, else drop (UNKNOWN_PEER) before the packet is even looked at;
 *   1. validate: the FP_DROP_* checks TOO_SHORT..BAD_CHECKSUM in order; bytes beyond the
 *      IPv4 total length are trimmed (*len := total length).  Egress only: a packet over the
 *      mtu with DF set and a valid header checksum gets ICMP fragmentation-needed (type 3,
 *      code 4, the mtu as next-hop MTU, RFC 1191) - still an OVERSIZE drop;
 *   1b. ingress only, peer_check STRICT: the inner source must lie in a subnet of a route
 *      naming src_ip (fp_routes_peer), else drop (SPOOFED_SOURCE); the inner destination must
 *      lie in local_net/local_mask or be local_ip, else drop (NOT_LOCAL).  No ICMP error ever
 *      answers a datagram refused by steps 0 and 1b: the check comes first;
 *   2. TTL <= 1: drop (TTL_EXCEEDED) and build ICMP time-exceeded (type 11, code 0);
 *   3. egress only: longest-prefix lookup of the destination; none: drop (NO_ROUTE) and build
 *      ICMP dest-unreachable (type 3, code 0) - flannel's "net unreachable";
 *   4. TTL - 1 with the RFC 1624 incremental checksum update, in place; FP_FORWARD.
 * An ICMP error is built (FP_REPLY) only when the offender is not itself an ICMP error
 * (types 3, 4, 5, 11, 12, or an ICMP header cut short), is a first fragment (offset 0), has
 * a source that is not 0.0.0.0 nor >= 224.0.0.0, a destination < 224.0.0.0, and the token
 * bucket has a token (else icmp_ratelimited++ and FP_DROP).  The reply goes from
 * cx->local_ip to the offender's source, TTL FP_ICMP_TTL, id 0, and quotes the offender's
 * header plus up to 8 bytes of its payload; reply needs FP_REPLY_MAX bytes.
 * Both functions bump the drop and ICMP counters; rx/tx/syscall counters are the pumps'. */
int fp_egress(fp_ctx *cx, const fp_routes *rt, uint8_t *pkt, uint32_t *len, uint64_t now_ns,
              fp_hop *hop, uint8_t *reply, uint32_t *reply_len);
int fp_ingress(fp_ctx *cx, const fp_routes *rt, uint8_t *pkt, uint32_t *len, uint32_t src_ip,
               uint64_t now_ns, uint8_t *reply, uint32_t *reply_len);

/* The pumps.  Never block for long: fds must be non-blocking.  Each stops taking in packets
 * once `budget` have been taken (so that a caller on an event loop is never starved) and stops
 * early at EAGAIN.  Returns the number of packets taken in, or -errno for an fd-level failure
 * when none were (EAGAIN is not a failure) or for a batch that breaks fp_batch's rules.
 * fp_udp_to_tun with udp_gro may return more than budget: one recvmmsg asks for
 * min(budget - taken, nslots) messages and takes each whole, and a message may hold K
 * datagrams (K = 64 merged from the wire; from a local UDP_SEGMENT sender, the kernel's
 * UDP_MAX_SEGMENTS: 64, or 128 since Linux 6.11), so the return is at most
 * budget + (K - 1) * min(budget, nslots): budget 2 may bring 128 (or 256).  Without udp_gro
 * it is at most budget.
 *
 * fp_tun_to_udp (egress), one round:
 *   1. read up to nslots packets from tun_fd into b's slots (one read each: a TUN has no
 *      batch read without vnet headers);
 *   2. fp_egress on each: FORWARD -> queued with its own next hop; REPLY -> written back
 *      into tun_fd (delivered to the local sender);
 *   3. one sendmmsg for the queued packets (per_packet: one sendto each); with udp_gso, each
 *      run of consecutive packets of one inner flow (addresses, protocol, ports) to one
 *      peer, all of one size but the last (which may be
 *      shorter), is one message with a UDP_SEGMENT control message (at most FP_GSO_MAX_SEGS
 *      datagrams and 65507 bytes); a run the kernel refuses is sent again datagram by
 *      datagram.  A socket that stays full after one wait of 5 ms and one retry, or refuses a
 *      datagram, costs a FP_DROP_TX_ERROR per datagram.
 *   With cx->vnet, step 1 reads one (super-)packet per read, one after another into the
 *   arena, and cuts it: a TSO/USO super-packet whose every segment fp_egress would forward
 *   (TTL > 1, a route) is decided once for all and cut by fp_gso_split_hdrs (headers into
 *   b->aux, each segment sent as headers + payload in place, its TTL decremented as
 *   fp_egress does); anything else by fp_gso_split into b->aux and fp_egress per segment.
 *   Either way the counters, drops, ICMP errors and bytes sent are those of the segments
 *   through fp_egress.  Segments are queued (up to FP_MAX_QUEUE) across reads before step 3.
 *   The budget counts segments and a super-packet is taken whole, so the last read may pass
 *   it by up to its own segments.
 * fp_udp_to_tun (ingress), one round:
 *   1. one recvmmsg of up to nslots datagrams (per_packet: one recvfrom); with udp_gro a
 *      message may hold several datagrams of the size the kernel reports, split here;
 *      A message cut by the kernel (over the slot) is one OVERSIZE drop - or UNKNOWN_PEER when
 *      its sender fails step 0 of fp_ingress;
 *   2. fp_ingress (with rt and the datagram's source address) on each: FORWARD -> one write
 *      into tun_fd each; REPLY (time exceeded) -> sendto the datagram's source address, which
 *      passed the source check (unless peer_check is OFF).  With cx->vnet the forwarded packets of the
 *      round go through fp_gro_coalesce_spans (headers into b->aux, payloads left in the
 *      arena): one writev per merged run. */
int fp_tun_to_udp(fp_ctx *cx, const fp_routes *rt, fp_batch *b, int tun_fd, int udp_fd, int budget);
int fp_udp_to_tun(fp_ctx *cx, const fp_routes *rt, fp_batch *b, int udp_fd, int tun_fd,
                  int budget);

/* The same pumps driven by a tight C loop instead of the Python event loop (a yardstick for
 * what the Python glue costs): epoll on tun_fd, udp_fd and stop_fd, level-triggered; each
 * readable fd gets one pump call with `budget`.  Returns 0 once stop_fd is readable, or
 * -errno.  Blocks: call it without the GIL (cffi releases it) from a thread of its own, and
 * change nothing it reads (routes, cx) until it has returned. */
int fp_run(fp_ctx *cx, const fp_routes *rt, fp_batch *egress, fp_batch *ingress, int tun_fd,
           int udp_fd, int stop_fd, int budget);

/* One wake-up of a queue that its uvloop loop dispatched (forwarder.py): serve both directions
 * for as long as packets keep coming, so the Python loop runs once per burst, not once per
 * packet.  A round calls fp_udp_to_tun for udp_fd and fp_tun_to_udp for tun_fd (each with
 * `budget`; the first round both, later rounds the fds epoll reported, and the TUN again after
 * datagrams were written into it: a reply that lands meanwhile needs no new round of either
 * loop), then waits in epoll_wait(ep_fd) up to linger_ms (no wait when an fd is readable).  ep_fd is the caller's own epoll set watching exactly tun_fd, udp_fd and ctl_fd
 * (EPOLLIN, level-triggered); ctl_fd is the caller's "work for this thread" signal and is not
 * read here.  Returns the packets moved (>= 0, saturating at INT32_MAX) once linger_ms pass
 * without a packet or ctl_fd is readable, or -errno of a failed pump or epoll_wait.  Blocks up
 * to linger_ms after the last packet: call it without the GIL (cffi releases it) on the
 * queue's own thread; nothing it reads (routes, cx) may change until it has returned. */
int fp_serve(fp_ctx *cx, const fp_routes *rt, fp_batch *egress, fp_batch *ingress, int tun_fd,
             int udp_fd, int ep_fd, int ctl_fd, int budget, int linger_ms);

/* Multi-queue ingress steering (steer.c): attach to udp_fd's SO_REUSEPORT group (nsocks
 * sockets, bound in queue order) a classic-BPF program that sends each datagram to socket
 *   ((h * 0x9E3779B1 mod 2^32) >> 16) % nsocks,  h = x ^ (x >> 16),  x = src ^ dst (^ the 32-bit port word at IHL*4 for TCP
 *   and UDP packets that are not fragments),
 * read big-endian from the inner IPv4 packet (the datagram's payload), so that one inner flow
 * always reaches one queue; a datagram too short for a load goes to socket 0.  0 or -errno
 * (-EINVAL: nsocks outside 1..FP_STEER_MAX_SOCKS).  packet.steer_index is the twin. */
#define FP_STEER_MAX_SOCKS 256
int fp_reuseport_steer(int udp_fd, uint32_t nsocks);
