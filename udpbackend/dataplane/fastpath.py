"""The C fast path, wrapped: the only importer of ``udpbackend.dataplane._fastpath``.

Same API as the pure-Python twin in ``packet.py`` (tests hold the two to each other). This
module validates arguments, owns every buffer it hands to C, and turns ``-errno`` returns into
``OSError``; it knows nothing of event loops, TUN set-up or the control plane.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from ._fastpath import ffi, lib
from .packet import DROP_REASONS, PEER_CHECKS, SYSCALL_KINDS, Decision, check_subnet

FORWARD = lib.FP_FORWARD
REPLY = lib.FP_REPLY
DROP = lib.FP_DROP
MAX_BATCH = lib.FP_MAX_BATCH
MAX_SLOT = lib.FP_MAX_SLOT
REPLY_MAX = lib.FP_REPLY_MAX
HIST_BUCKETS = lib.FP_HIST_BUCKETS
ICMP_TTL = lib.FP_ICMP_TTL
DEFAULT_PORT = lib.FP_DEFAULT_PORT
VNET_HDR_LEN = lib.FP_VNET_HDR_LEN
IP_MAX_LEN = lib.FP_IP_MAX_LEN
UDP_MAX_PAYLOAD = lib.FP_UDP_MAX_PAYLOAD  # with UDP GRO, an ingress slot holds this much
SEG_HDR_MAX = lib.FP_SEG_HDR_MAX  # split: header bytes per segment that always suffice
SPAN_HDR_MAX = lib.FP_SPAN_HDR_MAX  # merge: header bytes per TUN write that always suffice
AUX_SIZE = 4 << 20  # >= FP_AUX_MIN: room for a few dozen split or merged super-packets

__all__ = [
    "DROP",
    "DROP_REASONS",
    "FORWARD",
    "PEER_CHECKS",
    "REPLY",
    "SYSCALL_KINDS",
    "Context",
    "Decision",
    "Pump",
    "Routes",
    "checksum",
    "egress",
    "ingress",
    "reuseport_steer",
]

assert len(DROP_REASONS) == lib.FP_DROP_REASONS and len(SYSCALL_KINDS) == lib.FP_SYS_KINDS
assert PEER_CHECKS.index("strict") == lib.FP_PEER_CHECK_STRICT
assert PEER_CHECKS.index("peer-only") == lib.FP_PEER_CHECK_PEER_ONLY


def _oserror(rc: int) -> OSError:
    return OSError(-rc, os.strerror(-rc))


def _check_prefix(net: int, prefix_len: int) -> None:
    if not 0 <= net <= 0xFFFFFFFF or not 0 <= prefix_len <= 32:
        raise ValueError(f"bad route {net:#x}/{prefix_len}: address or length out of range")


class Routes:
    """Route table (C): IPv4 prefix -> (peer IP, peer UDP port), longest-prefix match.

    Addresses are integers in host order. Change it only from the thread that runs the
    pumps (the event-loop thread): cffi releases the GIL during C calls.
    """

    def __init__(self) -> None:
        rt = lib.fp_routes_new()
        if rt == ffi.NULL:
            raise MemoryError("fp_routes_new")
        self._rt = ffi.gc(rt, lib.fp_routes_free)

    def set(self, net: int, prefix_len: int, peer_ip: int, peer_port: int) -> bool:
        """Add or replace a route; True if it replaced one."""
        if not 0 <= peer_port <= 0xFFFF or not 0 <= peer_ip <= 0xFFFFFFFF:
            raise ValueError("peer address out of range")
        _check_prefix(net, prefix_len)
        rc = lib.fp_routes_set(self._rt, net, prefix_len, peer_ip, peer_port)
        if rc == -errno.EINVAL:
            raise ValueError(f"bad route {net:#x}/{prefix_len}: host bits set")
        if rc < 0:
            raise _oserror(rc)
        return rc == 1

    def delete(self, net: int, prefix_len: int) -> None:
        _check_prefix(net, prefix_len)
        rc = lib.fp_routes_del(self._rt, net, prefix_len)
        if rc == -errno.EINVAL:
            raise ValueError(f"bad route {net:#x}/{prefix_len}: host bits set")
        if rc == -errno.ENOENT:
            raise KeyError((net, prefix_len))
        if rc < 0:
            raise _oserror(rc)

    def lookup(self, addr: int) -> tuple[int, tuple[int, int]] | None:
        if not 0 <= addr <= 0xFFFFFFFF:
            raise ValueError("address out of range")
        hop = ffi.new("fp_hop *")
        rc = lib.fp_routes_lookup(self._rt, addr, hop)
        if rc < 0:
            return None
        return rc, (hop.ip, hop.port)

    def __len__(self) -> int:
        return int(lib.fp_routes_count(self._rt))

    def peer(self, peer_ip: int) -> list[tuple[int, int]] | None:
        """The subnets (net, prefix_len) of the routes naming peer_ip, sorted; None when it is
        no route's next hop (the peer-address table the ingress source check reads)."""
        if not 0 <= peer_ip <= 0xFFFFFFFF:
            raise ValueError("address out of range")
        n = 4
        while True:
            nets, plens = ffi.new("uint32_t[]", n), ffi.new("uint32_t[]", n)
            rc = lib.fp_routes_peer_subnets(self._rt, peer_ip, nets, plens, n)
            if rc < 0:
                return None
            if rc <= n:
                return sorted((nets[i], plens[i]) for i in range(rc))
            n = rc

    def from_peer(self, peer_ip: int, addr: int) -> bool | None:
        """None when peer_ip is no route's next hop, else whether addr lies in one of the
        subnets of the routes naming it (fp_routes_peer)."""
        if not 0 <= peer_ip <= 0xFFFFFFFF or not 0 <= addr <= 0xFFFFFFFF:
            raise ValueError("address out of range")
        rc = lib.fp_routes_peer(self._rt, peer_ip, addr)
        return None if rc < 0 else rc == 1

    def peer_count(self) -> int:
        """Distinct public IPs in the peer-address table."""
        return int(lib.fp_routes_peer_count(self._rt))


def _dir_stats(d: Any) -> dict[str, Any]:
    return {
        "rx_packets": d.rx_packets,
        "rx_bytes": d.rx_bytes,
        "tx_packets": d.tx_packets,
        "tx_bytes": d.tx_bytes,
        "drops": {name: d.drops[i] for i, name in enumerate(DROP_REASONS)},
        "batches": d.batches,
        "batch_hist": [d.batch_hist[i] for i in range(HIST_BUCKETS)],
    }


class Context:
    """Forwarding context (C): configuration, ICMP token bucket and counters.

    subnet: this node's subnet (net, prefix_len), where ingress may deliver under the strict
    peer check; None: local_ip alone.  peer_check: one of PEER_CHECKS (see packet.Context)."""

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
        net, plen = check_subnet(local_ip, subnet, peer_check)
        self._cx = ffi.new("fp_ctx *")
        rc = lib.fp_ctx_init(
            self._cx,
            local_ip,
            mtu,
            int(per_packet),
            icmp_rate,
            icmp_burst,
            net,
            plen,
            PEER_CHECKS.index(peer_check),
        )
        if rc < 0:
            raise ValueError(f"mtu {mtu} outside 68..65535")
        self.local_ip = local_ip
        self.mtu = mtu
        self.per_packet = per_packet
        self.subnet = (net, plen)
        self.peer_check = peer_check

    def stats(self) -> dict[str, Any]:
        s = self._cx.stats
        return {
            "egress": _dir_stats(s.egress),
            "ingress": _dir_stats(s.ingress),
            "icmp_unreachable": s.icmp_unreachable,
            "icmp_time_exceeded": s.icmp_time_exceeded,
            "icmp_ratelimited": s.icmp_ratelimited,
            "gso_sends": s.gso_sends,
            "gro_receives": s.gro_receives,
            "tso_reads": s.tso_reads,
            "tun_gro_writes": s.tun_gro_writes,
            "syscalls": {name: s.syscalls[i] for i, name in enumerate(SYSCALL_KINDS)},
        }


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum, folded and complemented (0 over a valid header)."""
    return int(lib.fp_checksum(ffi.from_buffer(data), len(data)))


def _decide(pkt: bytearray, hop: Any, call: Any) -> Decision:
    """Run call(buf, len_ptr, reply, reply_len_ptr) -> verdict over pkt, in place; hop: the
    fp_hop * the call fills (egress), or None."""
    buf = ffi.from_buffer(pkt, require_writable=True)
    length = ffi.new("uint32_t *", len(pkt))
    reply = ffi.new("uint8_t[]", REPLY_MAX)
    reply_len = ffi.new("uint32_t *", 0)
    v = call(buf, length, reply, reply_len)
    return Decision(
        v,
        length[0],
        (hop.ip, hop.port) if hop is not None and v == FORWARD else None,
        bytes(ffi.buffer(reply, reply_len[0])) if v == REPLY else None,
    )


def egress(cx: Context, routes: Routes, pkt: bytearray, now_ns: int) -> Decision:
    """Decide one packet read from the TUN; modifies ``pkt`` in place (TTL, checksum)."""
    hop = ffi.new("fp_hop *")
    return _decide(
        pkt, hop, lambda b, n, r, rn: lib.fp_egress(cx._cx, routes._rt, b, n, now_ns, hop, r, rn)
    )


def ingress(cx: Context, routes: Routes, pkt: bytearray, src_ip: int, now_ns: int) -> Decision:
    """Decide one packet received over UDP from src_ip (the datagram's source address, checked
    against the routes' peers); modifies ``pkt`` in place (TTL, checksum)."""
    if not 0 <= src_ip <= 0xFFFFFFFF:
        raise ValueError("src_ip out of range")
    return _decide(
        pkt,
        None,
        lambda b, n, r, rn: lib.fp_ingress(cx._cx, routes._rt, b, n, src_ip, now_ns, r, rn),
    )


def gso_split(buf: bytes | bytearray, mtu: int, max_segs: int = 1024) -> list[bytes]:
    """fp_gso_split: a virtio-net header + IPv4 (super-)packet -> IPv4 packets of <= mtu
    bytes. Raises ValueError (EINVAL), OverflowError (EMSGSIZE: over mtu) or MemoryError
    (ENOSPC)."""
    src = ffi.from_buffer(buf)
    cap = len(buf) + max_segs * SEG_HDR_MAX
    out = ffi.new("uint8_t[]", cap)
    lens = ffi.new("uint32_t[]", max_segs)
    n = lib.fp_gso_split(src, len(buf), mtu, out, cap, lens, max_segs)
    if n < 0:
        raise {-errno.EINVAL: ValueError, -errno.EMSGSIZE: OverflowError}.get(n, MemoryError)(
            os.strerror(-n)
        )
    segs, at = [], 0
    for i in range(n):
        segs.append(bytes(ffi.buffer(out + at, lens[i])))
        at += lens[i]
    return segs


def gso_split_hdrs(buf: bytes | bytearray, mtu: int, max_segs: int = 1024) -> list[bytes]:
    """fp_gso_split_hdrs (the pump's zero-copy split), each segment's headers and payload
    joined: the same bytes and errors as gso_split."""
    frame = bytearray(buf)  # a GSO_NONE packet has its checksum completed in place
    src = ffi.from_buffer(frame, require_writable=True)
    hdrs_cap = max(max_segs, 1) * SEG_HDR_MAX
    hdrs = ffi.new("uint8_t[]", hdrs_cap)
    hdr_len = ffi.new("uint32_t *")
    off = ffi.new("uint32_t[]", max(max_segs, 1))
    lens = ffi.new("uint32_t[]", max(max_segs, 1))
    n = lib.fp_gso_split_hdrs(src, len(frame), mtu, hdrs, hdrs_cap, hdr_len, off, lens, max_segs)
    if n < 0:
        raise {-errno.EINVAL: ValueError, -errno.EMSGSIZE: OverflowError}.get(n, MemoryError)(
            os.strerror(-n)
        )
    hl = hdr_len[0]
    return [
        bytes(ffi.buffer(hdrs + i * hl, hl)) + bytes(frame[off[i] : off[i] + lens[i]])
        for i in range(n)
    ]


def gro_coalesce(pkts: list[bytes]) -> list[tuple[bytes, int]]:
    """fp_gro_coalesce: IPv4 packets -> TUN writes (virtio-net header + packet), each with the
    number of input packets it carries."""
    n = len(pkts)
    bufs = [ffi.from_buffer(p) for p in pkts]
    arr = ffi.new("uint8_t *[]", bufs) if n else ffi.new("uint8_t *[]", 1)
    lens = ffi.new("uint32_t[]", [len(p) for p in pkts] or [0])
    cap = sum(len(p) for p in pkts) + VNET_HDR_LEN * max(n, 1)
    out = ffi.new("uint8_t[]", cap)
    out_lens = ffi.new("uint32_t[]", max(n, 1))
    out_segs = ffi.new("uint32_t[]", max(n, 1))
    m = lib.fp_gro_coalesce(arr, lens, n, out, cap, out_lens, out_segs, max(n, 1))
    if m < 0:
        raise MemoryError(os.strerror(-m))
    res, at = [], 0
    for i in range(m):
        res.append((bytes(ffi.buffer(out + at, out_lens[i])), out_segs[i]))
        at += out_lens[i]
    return res


def reuseport_steer(sock: socket.socket, nsocks: int) -> None:
    """Attach fp_reuseport_steer's program to the SO_REUSEPORT group of ``sock`` (``nsocks``
    sockets, bound in queue order): each inner flow reaches one queue. OSError if refused."""
    if not 1 <= nsocks <= lib.FP_STEER_MAX_SOCKS:
        raise ValueError(f"nsocks must be 1..{lib.FP_STEER_MAX_SOCKS}")
    rc = lib.fp_reuseport_steer(sock.fileno(), nsocks)
    if rc < 0:  # EINVAL here: sock is in no SO_REUSEPORT group
        raise _oserror(rc)


def gro_coalesce_spans(pkts: list[bytes]) -> list[tuple[bytes, int]]:
    """fp_gro_coalesce_spans (the pump's zero-copy merge), each output's spans joined: the
    same outputs as gro_coalesce."""
    n = len(pkts)
    bufs = [ffi.from_buffer(p) for p in pkts]
    arr = ffi.new("uint8_t *[]", bufs) if n else ffi.new("uint8_t *[]", 1)
    lens = ffi.new("uint32_t[]", [len(p) for p in pkts] or [0])
    cap = max(n, 1)
    hdrs = ffi.new("uint8_t[]", SPAN_HDR_MAX * cap)
    spans = ffi.new("fp_span[]", 2 * cap)
    span0, nspans, segs = (ffi.new("uint32_t[]", cap) for _ in range(3))
    m = lib.fp_gro_coalesce_spans(
        arr, lens, n, hdrs, SPAN_HDR_MAX * cap, spans, 2 * cap, span0, nspans, segs, cap
    )
    if m < 0:
        raise MemoryError(os.strerror(-m))
    out = []
    for i in range(m):
        parts = spans[span0[i] : span0[i] + nspans[i]]
        out.append((b"".join(bytes(ffi.buffer(sp.base, sp.len)) for sp in parts), segs[i]))
    return out


class Pump:
    """Both directions of the data plane for one TUN fd and one UDP socket (C pumps).

    Owns two batch arenas of ``batch`` slots of ``slot_size`` bytes each, held to fp_batch's
    rules (fastpath.h) here, before C sees them: a slot holds at least mtu + 1 bytes, so a
    datagram over the MTU is seen whole and dropped as ``oversize``, never cut; UDP GRO is
    asked for only when a slot holds a whole GRO receive (``UDP_MAX_PAYLOAD``: the default
    ``MAX_SLOT`` does); with ``vnet`` the arena must hold the largest frame.
    """

    def __init__(
        self,
        cx: Context,
        routes: Routes,
        tun_fd: int,
        udp_sock: socket.socket,
        batch: int = 64,
        offload: bool = False,
        vnet: bool = False,
        slot_size: int = MAX_SLOT,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}")
        if not cx.mtu + 1 <= slot_size <= MAX_SLOT:
            raise ValueError(f"slot_size must be mtu + 1..{MAX_SLOT}, not {slot_size}")
        if vnet and cx.per_packet:
            raise ValueError("vnet headers need batched mode")
        if vnet and batch * slot_size < VNET_HDR_LEN + IP_MAX_LEN:
            raise ValueError(
                f"vnet headers need batch * slot_size >= {VNET_HDR_LEN + IP_MAX_LEN}, "
                "the largest frame (with MAX_SLOT slots: batch >= 2)"
            )
        # UDP GSO/GRO on the socket (batched mode only): what the kernel refused stays off, and
        # GRO stays off when a GRO receive would not fit a slot (fp_udp_to_tun refuses that).
        want = lib.FP_OFFLOAD_GSO | lib.FP_OFFLOAD_GRO if offload else 0
        if slot_size < UDP_MAX_PAYLOAD:
            want &= ~lib.FP_OFFLOAD_GRO
        got = lib.fp_udp_offloads(cx._cx, udp_sock.fileno(), want)
        self.offloads = {
            "udp_gso": bool(got & lib.FP_OFFLOAD_GSO),
            "udp_gro": bool(got & lib.FP_OFFLOAD_GRO),
            "tun_vnet": vnet,
        }
        self.cx = cx
        self.routes = routes
        self.tun_fd = tun_fd
        self.udp_sock = udp_sock
        self._udp_fd = udp_sock.fileno()
        self._arenas = [bytearray(batch * slot_size) for _ in range(2)]
        self._batches = []
        for arena in self._arenas:
            b = ffi.new("fp_batch *")
            b.arena = ffi.from_buffer("uint8_t[]", arena, require_writable=True)
            b.slot_size = slot_size
            b.nslots = batch
            self._batches.append((b, b.arena))  # keep the cdata buffer alive with the struct
        self._egress_batch = self._batches[0][0]
        self._ingress_batch = self._batches[1][0]
        if vnet:
            # TUN offloads: reads may be 64 KiB super-packets split into aux (egress), and
            # writes are merged runs built in aux (ingress).
            cx._cx.vnet = 1
            self._aux = [bytearray(AUX_SIZE) for _ in range(2)]
            for (b, _), aux in zip(self._batches, self._aux, strict=True):
                b.aux = ffi.from_buffer("uint8_t[]", aux, require_writable=True)
                b.aux_size = AUX_SIZE

    def tun_to_udp(self, budget: int) -> int:
        """Forward up to ``budget`` packets from the TUN to their peers; returns packets taken."""
        rc = lib.fp_tun_to_udp(
            self.cx._cx, self.routes._rt, self._egress_batch, self.tun_fd, self._udp_fd, budget
        )
        if rc < 0:
            raise _oserror(rc)
        return int(rc)

    @property
    def gso_active(self) -> bool:
        """False once the kernel refused a UDP_SEGMENT send (EIO) and coalescing stopped."""
        return bool(self.cx._cx.udp_gso)

    def udp_to_tun(self, budget: int) -> int:
        """Forward up to ``budget`` datagrams from the UDP socket into the TUN; returns
        datagrams taken. With UDP GRO a receive is taken whole, so the return may pass the
        budget: at most budget + (K - 1) * min(budget, batch), K the datagrams one receive
        holds (64 from the wire, up to 128 from a local sender on Linux >= 6.11; fastpath.h)."""
        rc = lib.fp_udp_to_tun(
            self.cx._cx, self.routes._rt, self._ingress_batch, self._udp_fd, self.tun_fd, budget
        )
        if rc < 0:
            raise _oserror(rc)
        return int(rc)

    def serve(self, ep_fd: int, ctl_fd: int, budget: int, linger_ms: int) -> int:
        """One uvloop wake-up handed to C (fp_serve): both directions served until linger_ms
        pass without a packet or ``ctl_fd`` (in the epoll set ``ep_fd``, with the TUN and the
        socket) becomes readable; returns packets moved.  Blocks without the GIL."""
        e, i = self._egress_batch, self._ingress_batch
        rc = lib.fp_serve(
            self.cx._cx, self.routes._rt, e, i, self.tun_fd, self._udp_fd, ep_fd, ctl_fd,
            budget, linger_ms,
        )  # fmt: skip
        if rc < 0:
            raise _oserror(rc)
        return int(rc)

    def run_c_loop(self, stop_fd: int, budget: int) -> None:
        """Drive both directions from fp_run's tight C epoll loop until ``stop_fd`` becomes
        readable (the yardstick the Python driver is measured against). Blocks without the
        GIL: run it in a thread of its own, and change no routes meanwhile."""
        e, i = self._egress_batch, self._ingress_batch
        rc = lib.fp_run(
            self.cx._cx, self.routes._rt, e, i, self.tun_fd, self._udp_fd, stop_fd, budget
        )
        if rc < 0:
            raise _oserror(rc)
