# The pure-Python twin of csrc/ (fastpath.h): route table, packet decisions, ICMP errors and a
# one-packet-per-syscall Pump, with the same names, semantics and counters as the C fast path.
# It is the spec the C is tested against and the fallback under UDPBACKEND_NO_EXTENSIONS=1.
# Only the stdlib may be imported here: nothing from udpbackend, no cffi, no event loop.
"""Pure-Python reference implementation of the udpbackend fast path."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Callable
from time import monotonic_ns
from typing import NamedTuple

__all__ = [
    "DEFAULT_PORT",
    "DROP",
    "DROP_REASONS",
    "FORWARD",
    "HIST_BUCKETS",
    "ICMP_TTL",
    "MAX_BATCH",
    "MAX_SLOT",
    "PEER_CHECKS",
    "REPLY",
    "REPLY_MAX",
    "SYSCALL_KINDS",
    "VNET_HDR_LEN",
    "Context",
    "Decision",
    "Pump",
    "Routes",
    "check_subnet",
    "checksum",
    "egress",
    "gro_coalesce",
    "gso_split",
    "ingress",
    "steer_index",
]

FORWARD, REPLY, DROP = 0, 1, 2
DROP_REASONS = (
    "too_short",
    "not_ipv4",
    "bad_header",
    "truncated",
    "oversize",
    "bad_checksum",
    "ttl_exceeded",
    "no_route",
    "tx_error",
    "bad_offload",
    "unknown_peer",
    "spoofed_source",
    "not_local",
)
# The ingress source check (--peer-check), index = FP_PEER_CHECK_*: off is flannel's behaviour
# (any datagram from anywhere is written into the TUN); peer-only: the datagram's source
# address must be a route's next hop; strict: and the inner source inside that peer's
# subnet(s), the inner destination inside this node's subnet (or the TUN address).
PEER_CHECKS = ("off", "peer-only", "strict")
SYSCALL_KINDS = ("read", "write", "sendmmsg", "recvmmsg", "sendto", "recvfrom", "poll")
HIST_BUCKETS = 8
MAX_BATCH = 64
MAX_SLOT = 65536
REPLY_MAX = 96
ICMP_TTL = 8
DEFAULT_PORT = 8285
STEER_MAX_SOCKS = 256  # FP_STEER_MAX_SOCKS
GSO_MAX_SEGS = 64  # FP_GSO_MAX_SEGS: also the most segments one TUN write may merge
IP_MAX_LEN = 65535  # FP_IP_MAX_LEN: also the most bytes one TUN write may merge into
# TUN offloads (IFF_VNET_HDR): the 10-byte little-endian virtio-net header of fastpath.h.
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP_L4 = 5
VNET_GSO_ECN = 0x80

(
    _TOO_SHORT,
    _NOT_IPV4,
    _BAD_HEADER,
    _TRUNCATED,
    _OVERSIZE,
    _BAD_CHECKSUM,
    _TTL_EXCEEDED,
    _NO_ROUTE,
    _TX_ERROR,
    _BAD_OFFLOAD,
    _UNKNOWN_PEER,
    _SPOOFED_SOURCE,
    _NOT_LOCAL,
) = range(len(DROP_REASONS))
_CHECK_OFF, _CHECK_PEER_ONLY, _CHECK_STRICT = range(len(PEER_CHECKS))
_SYS_READ, _SYS_WRITE, _SYS_SENDMMSG, _SYS_RECVMMSG, _SYS_SENDTO, _SYS_RECVFROM, _SYS_POLL = range(
    len(SYSCALL_KINDS)
)

_NS = 1_000_000_000
_MULTICAST = 0xE0000000  # 224.0.0.0: sources and destinations from here up get no ICMP error
_ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))  # RFC 792/1122: never answer an error
_ICMP_DEST_UNREACH = 3
_ICMP_FRAG_NEEDED = 4  # the code of dest-unreachable "fragmentation needed and DF set"
_ICMP_TIME_EXCEEDED = 11
_IP_DF = 0x4000  # IP_DF, IP_FRAG_BITS, IP_NOT_DF: the flags/fragment word's masks
_IP_FRAG_BITS = 0x3FFF
_IP_NOT_DF = 0xBFFF
_SEND_WAIT_MS = 5  # how long a full socket may stay full before the packet is dropped


class Decision(NamedTuple):
    """What egress()/ingress() decided about one packet.

    verdict: FORWARD, REPLY or DROP.  length: bytes of pkt to pass on (the IPv4 total length
    once the header validated, else the length given).  hop: (peer_ip, peer_port) of a forwarded
    egress packet, else None.  reply: the ICMP error to deliver when verdict is REPLY, else None.
    """

    verdict: int
    length: int
    hop: tuple[int, int] | None
    reply: bytes | None


def _mask(prefix_len: int) -> int:
    return (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF


def _check_net(net: int, prefix_len: int) -> None:
    if not 0 <= prefix_len <= 32:
        raise ValueError(f"prefix_len must be 0..32, not {prefix_len}")
    if not 0 <= net <= 0xFFFFFFFF:
        raise ValueError(f"net must be a 32-bit address, not {net}")
    if net & ~_mask(prefix_len) & 0xFFFFFFFF:
        raise ValueError(f"host bits set in net {net:#010x}/{prefix_len}")


def check_subnet(local_ip: int, subnet: tuple[int, int] | None, peer_check: str) -> tuple[int, int]:
    """A Context's subnet and peer check, validated: (net, prefix_len), local_ip/32 for None."""
    if peer_check not in PEER_CHECKS:
        raise ValueError(f"peer_check must be one of {', '.join(PEER_CHECKS)}, not {peer_check!r}")
    if subnet is None:
        subnet = (local_ip, 32)
    net, plen = subnet
    _check_net(net, plen)
    return net, plen


class Routes:
    """Longest-prefix match of IPv4 destinations (host-order ints) to (peer_ip, peer_port),
    and beside it the peer-address table: each public IP that is some route's next hop, with
    the subnets of the routes naming it (what the ingress source check reads).

    One dict per prefix length in use, so a lookup costs one probe per length in use (one in a
    flannel network), whatever the number of routes; one dict probe for a peer.
    """

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, tuple[int, int]]] = {}
        self._lengths: list[int] = []  # prefix lengths in use, longest first
        self._count = 0
        self._peers: dict[int, dict[tuple[int, int], int]] = {}  # ip -> {(net, plen): mask}

    def set(self, net: int, prefix_len: int, peer_ip: int, peer_port: int) -> bool:
        """Add or replace net/prefix_len; True if it replaced an existing route."""
        _check_net(net, prefix_len)
        if not 0 <= peer_ip <= 0xFFFFFFFF:
            raise ValueError(f"peer_ip must be a 32-bit address, not {peer_ip}")
        if not 0 <= peer_port <= 0xFFFF:
            raise ValueError(f"peer_port must be 0..65535, not {peer_port}")
        table = self._tables.get(prefix_len)
        if table is None:
            table = self._tables[prefix_len] = {}
            self._lengths = sorted(self._tables, reverse=True)
        old = table.get(net)
        table[net] = (peer_ip, peer_port)
        if old is None:
            self._count += 1
        if old is None or old[0] != peer_ip:
            if old is not None:
                self._peer_remove(old[0], net, prefix_len)
            self._peers.setdefault(peer_ip, {})[(net, prefix_len)] = _mask(prefix_len)
        return old is not None

    def _peer_remove(self, peer_ip: int, net: int, prefix_len: int) -> None:
        subs = self._peers[peer_ip]
        del subs[(net, prefix_len)]
        if not subs:
            del self._peers[peer_ip]

    def delete(self, net: int, prefix_len: int) -> None:
        """Remove net/prefix_len; KeyError if there is no such route."""
        _check_net(net, prefix_len)
        table = self._tables.get(prefix_len)
        if table is None or net not in table:
            raise KeyError((net, prefix_len))
        self._peer_remove(table.pop(net)[0], net, prefix_len)
        self._count -= 1
        if not table:
            del self._tables[prefix_len]
            self._lengths = sorted(self._tables, reverse=True)

    def lookup(self, addr: int) -> tuple[int, tuple[int, int]] | None:
        """(prefix_len, (peer_ip, peer_port)) of the longest route holding addr, or None."""
        for plen in self._lengths:
            hop = self._tables[plen].get(addr & _mask(plen))
            if hop is not None:
                return plen, hop
        return None

    def __len__(self) -> int:
        return self._count

    def peer(self, peer_ip: int) -> list[tuple[int, int]] | None:
        """The subnets (net, prefix_len) of the routes naming peer_ip, sorted; None when it is
        no route's next hop."""
        subs = self._peers.get(peer_ip)
        return None if subs is None else sorted(subs)

    def from_peer(self, peer_ip: int, addr: int) -> bool | None:
        """None when peer_ip is no route's next hop, else whether addr lies in one of the
        subnets of the routes naming it (fp_routes_peer)."""
        subs = self._peers.get(peer_ip)
        if subs is None:
            return None
        return any(addr & mask == net for (net, _), mask in subs.items())

    def peer_count(self) -> int:
        """Distinct public IPs in the peer-address table."""
        return len(self._peers)


class _DirStats:
    __slots__ = (
        "batch_hist",
        "batches",
        "drops",
        "rx_bytes",
        "rx_packets",
        "tx_bytes",
        "tx_packets",
    )

    def __init__(self) -> None:
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.drops = [0] * len(DROP_REASONS)
        self.batches = 0
        self.batch_hist = [0] * HIST_BUCKETS

    def batch(self, n: int) -> None:
        self.batches += 1
        self.batch_hist[min(n.bit_length() - 1, HIST_BUCKETS - 1)] += 1

    def as_dict(self) -> dict:
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": dict(zip(DROP_REASONS, self.drops, strict=True)),
            "batches": self.batches,
            "batch_hist": list(self.batch_hist),
        }


class Context:
    """Forwarding context: configuration, the ICMP token bucket and the counters (fp_ctx).

    subnet: this node's subnet (net, prefix_len): under the strict peer check, ingress writes
    only packets for it (or for local_ip) into the TUN; None: local_ip alone.  peer_check: one
    of PEER_CHECKS, the ingress source check (default strict).
    """

    def __init__(
        self,
        local_ip: int,
        mtu: int,
        per_packet: bool = False,
        icmp_rate: int = 1000,
        icmp_burst: int = 100,
        subnet: tuple[int, int] | None = None,
        peer_check: str = "strict",
    ) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535, not {mtu}")
        for name, value in (("local_ip", local_ip), ("icmp_rate", icmp_rate)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be a uint32, not {value}")
        if not 0 <= icmp_burst <= 0xFFFFFFFF:
            raise ValueError(f"icmp_burst must be a uint32, not {icmp_burst}")
        net, plen = check_subnet(local_ip, subnet, peer_check)
        self.local_ip = local_ip
        self.subnet = (net, plen)
        self.local_net, self.local_mask = net, _mask(plen)
        self.peer_check = peer_check
        self._check = PEER_CHECKS.index(peer_check)
        self.mtu = mtu
        self.per_packet = bool(per_packet)
        self.icmp_rate = icmp_rate
        self.icmp_burst = icmp_burst
        self.icmp_tokens = icmp_burst
        self.icmp_last_ns = 0
        self.egress = _DirStats()
        self.ingress = _DirStats()
        self.icmp_unreachable = 0
        self.icmp_time_exceeded = 0
        self.icmp_ratelimited = 0
        self.syscalls = [0] * len(SYSCALL_KINDS)

    def stats(self) -> dict:
        """A snapshot of the counters in the canonical (C-identical) shape."""
        return {
            "egress": self.egress.as_dict(),
            "ingress": self.ingress.as_dict(),
            "icmp_unreachable": self.icmp_unreachable,
            "icmp_time_exceeded": self.icmp_time_exceeded,
            "icmp_ratelimited": self.icmp_ratelimited,
            "gso_sends": 0,  # UDP GSO/GRO are C-only (batched mode): always 0 here
            "gro_receives": 0,
            "tso_reads": 0,  # TUN offloads (vnet headers) are C-only too
            "tun_gro_writes": 0,
            "syscalls": dict(zip(SYSCALL_KINDS, self.syscalls, strict=True)),
        }

    def _take_token(self, now_ns: int) -> bool:
        # Integer arithmetic only, step for step as in C, so both buckets stay bit-identical.
        if self.icmp_rate == 0:
            return False
        elapsed = now_ns - self.icmp_last_ns if now_ns > self.icmp_last_ns else 0
        if elapsed >= _NS:
            self.icmp_tokens = self.icmp_burst
            self.icmp_last_ns = now_ns
        else:
            add = elapsed * self.icmp_rate // _NS
            if add > 0:
                self.icmp_tokens = min(self.icmp_burst, self.icmp_tokens + add)
                self.icmp_last_ns += add * _NS // self.icmp_rate
        if self.icmp_tokens > 0:
            self.icmp_tokens -= 1
            return True
        return False


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) of data: folded and complemented, 0 over a valid header.

    Odd lengths are padded with a zero byte.  The result is the value of the big-endian 16-bit
    checksum field (struct.pack(">H", checksum(...)) puts it on the wire).
    """
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    # 2**16 == 1 (mod 0xffff), so the one's-complement sum of the 16-bit words is the whole
    # buffer read as one big integer, mod 0xffff; a nonzero sum folds to 0xffff, never to 0.
    n = int.from_bytes(b, "big")
    folded = 0 if n == 0 else (n % 0xFFFF or 0xFFFF)
    return ~folded & 0xFFFF


def _validate(cx: Context, st: _DirStats, pkt: bytearray, n: int) -> tuple[int, int]:
    """(-1, length) after counting a drop (-2 when it was oversize), else (ihl, total
    length)."""
    if n < 20:
        st.drops[_TOO_SHORT] += 1
        return -1, n
    if pkt[0] >> 4 != 4:
        st.drops[_NOT_IPV4] += 1
        return -1, n
    ihl = (pkt[0] & 15) * 4
    if ihl < 20 or ihl > n:
        st.drops[_BAD_HEADER] += 1
        return -1, n
    tot = (pkt[2] << 8) | pkt[3]
    if tot < ihl:
        st.drops[_BAD_HEADER] += 1
        return -1, n
    if tot > n:
        st.drops[_TRUNCATED] += 1
        return -1, n
    if tot > cx.mtu:
        st.drops[_OVERSIZE] += 1
        return -2, tot
    if checksum(memoryview(pkt)[:ihl]) != 0:
        st.drops[_BAD_CHECKSUM] += 1
        return -1, tot
    return ihl, tot


def _icmp_error(
    cx: Context, pkt: bytearray, ihl: int, length: int, icmp_type: int, now_ns: int, code: int = 0
) -> bytes | None:
    """The ICMP error (RFC 792) answering pkt[:length], or None when none may be sent; 3/4
    (fragmentation needed) carries cx.mtu as the next-hop MTU (RFC 1191)."""
    if pkt[9] == 1 and (ihl + 1 > length or pkt[ihl] in _ICMP_ERROR_TYPES):
        return None  # never answer an ICMP error (or an ICMP header cut short)
    if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:
        return None  # only the first fragment carries the header we would quote
    src = int.from_bytes(pkt[12:16], "big")
    dst = int.from_bytes(pkt[16:20], "big")
    if src == 0 or src >= _MULTICAST or dst >= _MULTICAST:
        return None
    if not cx._take_token(now_ns):
        cx.icmp_ratelimited += 1
        return None
    quote = bytes(pkt[: min(length, ihl + 8)])
    next_mtu = cx.mtu if (icmp_type, code) == (_ICMP_DEST_UNREACH, _ICMP_FRAG_NEEDED) else 0
    icmp = bytearray(struct.pack(">BBHHH", icmp_type, code, 0, 0, next_mtu) + quote)
    struct.pack_into(">H", icmp, 2, checksum(icmp))
    hdr = bytearray(
        struct.pack(
            ">BBHHHBBHII",
            0x45,
            0,
            20 + len(icmp),
            0,
            0,
            ICMP_TTL,
            1,
            0,
            cx.local_ip,
            src,
        )
    )
    struct.pack_into(">H", hdr, 10, checksum(hdr))
    if icmp_type == _ICMP_DEST_UNREACH:
        cx.icmp_unreachable += 1
    else:
        cx.icmp_time_exceeded += 1
    return bytes(hdr + icmp)


def _decrement_ttl(pkt: bytearray) -> None:
    # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over the 16-bit word holding TTL|protocol.
    old = (pkt[8] << 8) | pkt[9]
    new = old - 0x100
    s = (~((pkt[10] << 8) | pkt[11]) & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hc = ~s & 0xFFFF
    pkt[8] -= 1
    pkt[10] = hc >> 8
    pkt[11] = hc & 0xFF


def _too_big(cx: Context, pkt: bytearray, length: int, now_ns: int) -> bytes | None:
    """Fragmentation needed for an egress packet over the mtu (fp_egress_too_big): only with
    DF set and a header whose checksum verifies."""
    ihl = (pkt[0] & 15) * 4
    if not (pkt[6] << 8) & _IP_DF or checksum(memoryview(pkt)[:ihl]) != 0:
        return None
    return _icmp_error(cx, pkt, ihl, length, _ICMP_DEST_UNREACH, now_ns, _ICMP_FRAG_NEEDED)


# The ingress source check against flannel's flows (--peer-check strict; tests/test_trust.py):
#   accepted - pod -> pod (source: a pod of the peer's subnet); the peer's host (the kernel's
#     source for "NET dev flannel0", a route without src, is flannel0's address: the peer's
#     subnet network address); whatever --ip-masq rewrites on the peer ("! -s NET -d NET
#     MASQUERADE", and kube-proxy's masquerade of marked traffic, both to that address; pod
#     sources are kept by the RETURN rules); ICMP errors made by the peer's kernel or daemon
#     (from a pod or the peer's flannel0 address); destinations: any address of this node's
#     subnet (broadcast included) or the TUN address.
#   refused - a datagram from an address that is no route's next hop (unknown_peer: also a
#     peer behind NAT, whose datagrams do not come from its lease's PublicIP: it needs off);
#     an inner source outside the sender's own subnets (spoofed_source), which also refuses an
#     ICMP error made by a router outside the overlay and forwarded un-NATed by the peer, and
#     outside traffic a peer routes into the overlay without --ip-masq: with --ip-masq the
#     conntrack that de-NATs replies and their ICMP errors is on the node that masqueraded,
#     so they never cross the overlay; a node that routes outside traffic in un-NATed needs
#     peer-only; an inner destination outside this node's subnet (not_local): no relaying.
#   not detectable - a datagram with a peer's address forged as its source and a packet that
#     peer could have sent: flannel's wire format has no authentication; reverse-path
#     filtering or an underlay that drops spoofed sources must stop it.
def _inner_check(cx: Context, pkt: bytearray, from_peer: bool | None) -> int:
    """Step 1b, strict only (inner_check): the inner addresses of a valid header against who
    sent it; from_peer is Routes.from_peer's answer for the sender and the inner source.  A
    drop reason, or -1."""
    if cx._check != _CHECK_STRICT:
        return -1
    if not from_peer:
        return _SPOOFED_SOURCE
    dst = int.from_bytes(pkt[16:20], "big")
    if dst & cx.local_mask != cx.local_net and dst != cx.local_ip:
        return _NOT_LOCAL
    return -1


def _decide(
    cx: Context,
    st: _DirStats,
    routes: Routes,
    pkt: bytearray,
    n: int,
    now_ns: int,
    src_ip: int | None = None,
) -> Decision:
    """egress when src_ip is None, else ingress of a datagram from src_ip."""
    ingress = src_ip is not None
    from_peer: bool | None = True
    if src_ip is not None and cx._check != _CHECK_OFF:
        # One peer-table lookup answers steps 0 and 1b: the inner source is read before the
        # header is validated (validation changes no byte), and used only once it has been.
        from_peer = routes.from_peer(src_ip, int.from_bytes(pkt[12:16], "big") if n >= 20 else 0)
        if from_peer is None:
            st.drops[_UNKNOWN_PEER] += 1
            return Decision(DROP, n, None, None)
    ihl, length = _validate(cx, st, pkt, n)
    if ihl < 0:
        # -2: oversize (the header's lengths are sound): an egress DF packet gets 3/4
        reply = _too_big(cx, pkt, length, now_ns) if ihl == -2 and not ingress else None
        return Decision(DROP if reply is None else REPLY, length, None, reply)
    if ingress and (why := _inner_check(cx, pkt, from_peer)) >= 0:
        st.drops[why] += 1
        return Decision(DROP, length, None, None)
    if pkt[8] <= 1:
        st.drops[_TTL_EXCEEDED] += 1
        reply = _icmp_error(cx, pkt, ihl, length, _ICMP_TIME_EXCEEDED, now_ns)
        return Decision(DROP if reply is None else REPLY, length, None, reply)
    hop = None
    if not ingress:
        found = routes.lookup(int.from_bytes(pkt[16:20], "big"))
        if found is None:
            st.drops[_NO_ROUTE] += 1
            reply = _icmp_error(cx, pkt, ihl, length, _ICMP_DEST_UNREACH, now_ns)
            return Decision(DROP if reply is None else REPLY, length, None, reply)
        hop = found[1]
    _decrement_ttl(pkt)
    return Decision(FORWARD, length, hop, None)


def egress(cx: Context, routes: Routes, pkt: bytearray, now_ns: int) -> Decision:
    """Decide one packet read from the TUN (fp_egress); TTL and checksum change in place."""
    return _decide(cx, cx.egress, routes, pkt, len(pkt), now_ns)


def ingress(cx: Context, routes: Routes, pkt: bytearray, src_ip: int, now_ns: int) -> Decision:
    """Decide one packet received over UDP from src_ip, the datagram's source address
    (fp_ingress): the source check against the routes' peers first; TTL and checksum change in
    place."""
    if not 0 <= src_ip <= 0xFFFFFFFF:
        raise ValueError("src_ip out of range")
    return _decide(cx, cx.ingress, routes, pkt, len(pkt), now_ns, src_ip)


# --- TUN offloads: the twins of fp_gso_split / fp_gro_coalesce (csrc/offload.c) --------------

_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_PSH = 0x01, 0x02, 0x04, 0x08
_TCP_ACK, _TCP_URG, _TCP_ECE, _TCP_CWR = 0x10, 0x20, 0x40, 0x80
_GRO_NO_MERGE = _TCP_SYN | _TCP_FIN | _TCP_RST | _TCP_URG | _TCP_ECE | _TCP_CWR
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17


def _words(data: bytes | bytearray) -> int:
    """The 16-bit big-endian words of data (odd length: zero-padded), summed modulo 0xffff,
    as one integer that is 0 exactly when every byte is 0 (fold with _fold)."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    return int.from_bytes(b, "big")


def _fold(total: int) -> int:
    """csum_fold: the end-around-carry fold of a one's-complement accumulator (not
    complemented): 0 only for an all-zero sum, else 1..0xffff."""
    return 0 if total == 0 else (total % 0xFFFF or 0xFFFF)


def _pseudo_sum(ip_hdr: bytes | bytearray, proto: int, l4_len: int) -> int:
    """The TCP/UDP pseudo-header sum (RFC 793 / RFC 768), not folded."""
    return (
        ((ip_hdr[12] << 8) | ip_hdr[13])
        + ((ip_hdr[14] << 8) | ip_hdr[15])
        + ((ip_hdr[16] << 8) | ip_hdr[17])
        + ((ip_hdr[18] << 8) | ip_hdr[19])
        + proto
        + l4_len
    )


def _ip_fix(seg: bytearray, ihl: int, total: int, ident: int) -> None:
    """Total length, id and a fresh header checksum (offload.c ip_fix)."""
    struct.pack_into(">HH", seg, 2, total & 0xFFFF, ident & 0xFFFF)
    struct.pack_into(">H", seg, 10, 0)
    struct.pack_into(">H", seg, 10, ~_fold(_words(seg[:ihl])) & 0xFFFF)


def _l4_fix(seg: bytearray, ihl: int, l4_len: int, proto: int, off: int) -> None:
    """The full TCP/UDP checksum of seg[ihl:ihl + l4_len] (offload.c l4_fix)."""
    struct.pack_into(">H", seg, ihl + off, 0)
    c = ~_fold(_pseudo_sum(seg, proto, l4_len) + _words(seg[ihl : ihl + l4_len])) & 0xFFFF
    if proto == _IPPROTO_UDP and c == 0:
        c = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    struct.pack_into(">H", seg, ihl + off, c)


def gso_split(buf: bytes | bytearray, mtu: int, max_segs: int = 1024) -> list[bytes]:
    """fp_gso_split: a virtio-net header + IPv4 (super-)packet, as read from a vnet TUN, ->
    IPv4 packets of <= mtu bytes with complete checksums (see fastpath.h).

    Raises ValueError (-EINVAL: a header or packet that cannot be split), OverflowError
    (-EMSGSIZE: a segment would pass mtu) or MemoryError (-ENOSPC: more than max_segs)."""
    b = bytes(buf)
    if len(b) < VNET_HDR_LEN + 20:
        raise ValueError("too short for a virtio-net header and an IPv4 header")
    if max_segs < 1:
        raise MemoryError("no room for a segment")
    flags, gso_type = b[0], b[1] & ~VNET_GSO_ECN & 0xFF
    gso, csum_start, csum_off = struct.unpack_from("<HHH", b, 4)
    pkt = b[VNET_HDR_LEN:]
    plen = len(pkt)
    if pkt[0] >> 4 != 4:
        raise ValueError("not IPv4")
    ihl = (pkt[0] & 15) * 4
    tot = (pkt[2] << 8) | pkt[3]
    if ihl < 20 or ihl > plen or tot > plen or tot < ihl:
        raise ValueError("bad IPv4 header or truncated packet")
    pkt, plen = pkt[:tot], tot  # bytes past the IPv4 total length are not part of the packet

    if gso_type == VNET_GSO_NONE:
        out = bytearray(pkt)
        if flags & VNET_F_NEEDS_CSUM:
            # The field holds the pseudo-header sum; the sum from csum_start on completes it.
            if csum_start < ihl or csum_start + csum_off + 2 > plen:
                raise ValueError("checksum start/offset outside the packet")
            c = ~_fold(_words(out[csum_start:])) & 0xFFFF
            if c == 0 and out[9] == _IPPROTO_UDP:
                c = 0xFFFF
            struct.pack_into(">H", out, csum_start + csum_off, c)
        return [bytes(out)]

    proto = pkt[9]
    if gso_type == VNET_GSO_TCPV4 and proto == _IPPROTO_TCP:
        if ihl + 20 > plen:
            raise ValueError("TCP header cut short")
        l4h = (pkt[ihl + 12] >> 4) * 4
        if l4h < 20:
            raise ValueError("TCP data offset < 5")
    elif gso_type == VNET_GSO_UDP_L4 and proto == _IPPROTO_UDP:
        l4h = 8
    else:
        raise ValueError(f"gso_type {b[1]:#x} does not fit protocol {proto}")
    # hdr_len is not trusted: the header length comes from the headers themselves.
    hl = ihl + l4h
    if hl > plen or gso == 0 or ((pkt[6] << 8) | pkt[7]) & _IP_FRAG_BITS:
        raise ValueError("headers cut short, gso_size 0 or a fragment")
    pay = plen - hl
    if hl + min(pay, gso) > mtu:
        raise OverflowError(f"segments of {hl + min(pay, gso)} bytes would pass the mtu {mtu}")
    nseg = -(-pay // gso) if pay else 1
    if nseg > max_segs:
        raise MemoryError(f"{nseg} segments, room for {max_segs}")

    ident0 = (pkt[4] << 8) | pkt[5]
    seq0 = 0 if proto == _IPPROTO_UDP else int.from_bytes(pkt[ihl + 4 : ihl + 8], "big")
    hdr = pkt[:hl]
    segs = []
    for i in range(nseg):
        chunk = pkt[hl + i * gso : hl + min((i + 1) * gso, pay)]
        seg = bytearray(hdr + chunk)
        _ip_fix(seg, ihl, len(seg), ident0 + i)
        if proto == _IPPROTO_TCP:
            struct.pack_into(">I", seg, ihl + 4, (seq0 + i * gso) & 0xFFFFFFFF)
            if i != nseg - 1:
                seg[ihl + 13] &= ~(_TCP_FIN | _TCP_PSH) & 0xFF
            if i != 0:
                seg[ihl + 13] &= ~_TCP_CWR & 0xFF
            _l4_fix(seg, ihl, l4h + len(chunk), _IPPROTO_TCP, 16)
        else:
            struct.pack_into(">H", seg, ihl + 4, (8 + len(chunk)) & 0xFFFF)
            _l4_fix(seg, ihl, 8 + len(chunk), _IPPROTO_UDP, 6)
        segs.append(bytes(seg))
    return segs


def _gro_candidate(p: bytes) -> int:
    """The TCP header length of a segment that may be merged (option-less IPv4, not a
    fragment and no IP flag but DF, payload, ACK and none of SYN/FIN/RST/URG/ECE/CWR, TCP
    checksum valid), or 0."""
    n = len(p)
    if (
        n < 40
        or p[0] != 0x45
        or p[9] != _IPPROTO_TCP
        or ((p[6] << 8) | p[7]) & _IP_NOT_DF
        or ((p[2] << 8) | p[3]) != n
    ):
        return 0
    thl = (p[32] >> 4) * 4
    if thl < 20 or 20 + thl >= n:
        return 0
    fl = p[33]
    if not fl & _TCP_ACK or fl & _GRO_NO_MERGE:
        return 0
    if _fold(_pseudo_sum(p, _IPPROTO_TCP, n - 20) + _words(p[20:])) != 0xFFFF:
        return 0
    return thl


def _gro_follows(first: bytes, prev: bytes, cur: bytes, thl: int, gso: int) -> bool:
    """May cur follow prev in a run started by first, of gso payload bytes per segment?"""
    if len(prev) - 20 - thl != gso or prev[33] & _TCP_PSH:
        return False  # prev was short or pushed: it ended the run
    if len(cur) - 20 - thl > gso:
        return False
    # same TOS, DF, TTL, addresses; same ports, ack, data offset, flags but PSH, window and
    # options; the next sequence number
    if (
        first[1] != cur[1]
        or first[6] & 0x40 != cur[6] & 0x40
        or first[8] != cur[8]
        or first[12:20] != cur[12:20]
    ):
        return False
    ft, ct = first[20:], cur[20:]
    if (
        ft[0:4] != ct[0:4]
        or ft[8:12] != ct[8:12]
        or ft[12] != ct[12]
        or ft[13] | _TCP_PSH != ct[13] | _TCP_PSH
        or ft[14:16] != ct[14:16]
        or ft[20:thl] != ct[20:thl]
    ):
        return False
    prev_seq = int.from_bytes(prev[24:28], "big")
    return int.from_bytes(ct[4:8], "big") == (prev_seq + gso) & 0xFFFFFFFF


def gro_coalesce(pkts: list[bytes]) -> list[tuple[bytes, int]]:
    """fp_gro_coalesce: IPv4 packets (in order) -> TUN writes, each a virtio-net header and a
    packet, with the number of input packets it carries.  Each run of consecutive segments of
    one TCP flow (see fastpath.h) becomes one super-packet behind a TCPV4/NEEDS_CSUM header
    whose checksum field holds the folded pseudo-header sum; anything else passes alone behind
    a zero header.  Order is kept."""
    ps = [bytes(p) for p in pkts]
    n = len(ps)
    out: list[tuple[bytes, int]] = []
    i = 0
    while i < n:
        first = ps[i]
        j, thl = i + 1, _gro_candidate(first)
        gso = len(first) - 20 - thl if thl else 0
        total = len(first)
        while (
            thl
            and j < n
            and j - i < GSO_MAX_SEGS
            and _gro_candidate(ps[j]) == thl
            and total + len(ps[j]) - 20 - thl <= IP_MAX_LEN
            and _gro_follows(first, ps[j - 1], ps[j], thl, gso)
        ):
            total += len(ps[j]) - 20 - thl
            j += 1
        if j - i == 1:
            out.append((bytes(VNET_HDR_LEN) + first, 1))
        else:
            hl = 20 + thl
            vnet = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, hl, gso, 20, 16)
            p = bytearray(first[:hl])
            for k in range(i, j):
                p += ps[k][hl:]
            p[33] |= ps[j - 1][33] & _TCP_PSH
            _ip_fix(p, 20, total, (first[4] << 8) | first[5])
            # CHECKSUM_PARTIAL: the folded pseudo-header sum; the kernel completes it.
            struct.pack_into(">H", p, 36, _fold(_pseudo_sum(p, _IPPROTO_TCP, total - 20)))
            out.append((vnet + bytes(p), j - i))
        i = j
    return out


def steer_index(pkt: bytes | bytearray, nsocks: int) -> int:
    """The queue fp_reuseport_steer's classic-BPF program picks for a datagram carrying
    ``pkt``: src ^ dst (^ the port word of a TCP/UDP non-fragment), folded, multiplied by
    the golden ratio (top 16 of 32 bits kept), modulo nsocks; 0
    when a load would pass the end (classic BPF then returns 0)."""
    if not 1 <= nsocks <= STEER_MAX_SOCKS:
        raise ValueError(f"nsocks must be 1..{STEER_MAX_SOCKS}")
    if len(pkt) < 20:
        return 0
    h = int.from_bytes(pkt[12:16], "big") ^ int.from_bytes(pkt[16:20], "big")
    frag = int.from_bytes(pkt[6:8], "big") & _IP_FRAG_BITS
    if pkt[9] in (_IPPROTO_TCP, _IPPROTO_UDP) and not frag:
        at = (pkt[0] & 0xF) * 4
        if len(pkt) < at + 4:
            return 0
        h ^= int.from_bytes(pkt[at : at + 4], "big")
    h ^= h >> 16
    return (((h * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % nsocks


def _addr(ip: int) -> str:
    return socket.inet_ntoa(ip.to_bytes(4, "big"))


class Pump:
    """The fd-level data plane in pure Python: one packet per syscall (flannel's loop).

    tun_fd and udp_sock must be non-blocking.  Each pump call takes in at most `budget`
    packets and stops early at EAGAIN; it returns the number taken in, and raises OSError for
    an fd-level failure only when none were taken.  (The C pump with UDP GRO may pass the
    budget by the datagrams of its last receive, see fastpath.h; one datagram per receive
    here never does.)  Counters go to cx as in fp_tun_to_udp /
    fp_udp_to_tun with per_packet set.  `batch` and `offload` are accepted for API parity with
    the C Pump; one packet per syscall means no batches and no UDP GSO/GRO here.
    """

    def __init__(
        self,
        cx: Context,
        routes: Routes,
        tun_fd: int,
        udp_sock: socket.socket,
        batch: int = MAX_BATCH,
        offload: bool = False,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}, not {batch}")
        self.offloads = {"udp_gso": False, "udp_gro": False}
        self.cx = cx
        self.routes = routes
        self.tun_fd = tun_fd
        self.udp_sock = udp_sock
        self.batch = batch
        self._buf = bytearray(MAX_SLOT)

    @property
    def gso_active(self) -> bool:
        """Always False: the Python pump never coalesces sends."""
        return False

    def _out(self, st: _DirStats, kind: int, fd: int, send: Callable[[], object]) -> bool:
        """Run one send/write; a full fd gets one wait of up to 5 ms and one retry.  A packet
        that is refused or stays blocked costs a tx_error drop in st."""
        cx = self.cx
        for attempt in range(2):
            cx.syscalls[kind] += 1
            try:
                send()
                return True
            except BlockingIOError:
                if attempt:
                    break
                cx.syscalls[_SYS_POLL] += 1
                p = select.poll()
                p.register(fd, select.POLLOUT)
                if not p.poll(_SEND_WAIT_MS):
                    break
            except OSError:
                break
        st.drops[_TX_ERROR] += 1
        return False

    def _sendto(self, st: _DirStats, data: bytes | memoryview, addr: tuple[str, int]) -> bool:
        sock = self.udp_sock
        return self._out(st, _SYS_SENDTO, sock.fileno(), lambda: sock.sendto(data, addr))

    def _write_tun(self, st: _DirStats, data: bytes | memoryview) -> bool:
        fd = self.tun_fd
        return self._out(st, _SYS_WRITE, fd, lambda: os.write(fd, data))

    def tun_to_udp(self, budget: int) -> int:
        """Egress: read packets from the TUN and send each to its peer (fp_tun_to_udp)."""
        cx, st, buf = self.cx, self.cx.egress, self._buf
        taken = 0
        while taken < budget:
            cx.syscalls[_SYS_READ] += 1
            try:
                n = os.readv(self.tun_fd, [buf])
            except BlockingIOError:
                break
            except OSError:
                if taken:
                    break
                raise
            taken += 1
            st.rx_packets += 1
            st.rx_bytes += n
            st.batch(1)
            pkt = buf[:n]
            d = _decide(cx, st, self.routes, pkt, n, monotonic_ns())
            if d.verdict == FORWARD:
                assert d.hop is not None
                if self._sendto(st, memoryview(pkt)[: d.length], (_addr(d.hop[0]), d.hop[1])):
                    st.tx_packets += 1
                    st.tx_bytes += d.length
            elif d.verdict == REPLY:
                assert d.reply is not None
                self._write_tun(st, d.reply)
        return taken

    def udp_to_tun(self, budget: int) -> int:
        """Ingress: receive datagrams and write each into the TUN (fp_udp_to_tun)."""
        cx, st, buf = self.cx, self.cx.ingress, self._buf
        taken = 0
        while taken < budget:
            cx.syscalls[_SYS_RECVFROM] += 1
            try:
                n, src = self.udp_sock.recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError:
                if taken:
                    break
                raise
            taken += 1
            st.rx_packets += 1
            st.rx_bytes += n
            st.batch(1)
            pkt = buf[:n]
            src_ip = int.from_bytes(socket.inet_aton(src[0]), "big")
            d = _decide(cx, st, self.routes, pkt, n, monotonic_ns(), src_ip)
            if d.verdict == FORWARD:
                if self._write_tun(st, memoryview(pkt)[: d.length]):
                    st.tx_packets += 1
                    st.tx_bytes += d.length
            elif d.verdict == REPLY:
                assert d.reply is not None
                self._sendto(st, d.reply, src)
        return taken
