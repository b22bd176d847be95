# The C pumps at the edges of what fastpath.h allows, driven through cffi with batches built here:
# slot sizes the contract permits but Pump never uses, every caller-owned buffer (arena, aux)
# lent between guard zones that must come back untouched, UDP_GRO receives against the slot
# size, and the budget's true bound.  The fuzz findings of the trust issue are pinned here; the
# same tests run under AddressSanitizer in tests/test_sanitizers.py.
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from packets import TS_OPTS, expect_tcp, forwarded, ip, ipv4_udp, payload, tso, vnet

LOCAL = ip("198.18.0.1")
SRC, DST = "198.18.5.5", "198.19.1.5"  # DST is routed to the peer socket
MTU = 1400
# Guard zones larger than the largest frame: even a whole misplaced read lands in one.  Under
# ASan (tests/test_sanitizers.py) there are none: each buffer is a malloc of its exact size,
# so ASan's redzones are right behind it.
GUARD = int(os.environ.get("UDPBACKEND_TEST_GUARD", 1 << 17))
PATTERN = bytes(range(251)) * (GUARD // 251) + bytes(range(GUARD % 251))
UDP_SEGMENT = 103
MSS = MTU - 52  # TCP with timestamps: a full segment is exactly the MTU


class Lent:
    """size bytes lent to the C, between two guard zones it must never read or write."""

    def __init__(self, ffi: Any, size: int) -> None:
        self.size = size
        self.mem = bytearray(PATTERN + PATTERN)
        if GUARD:
            self.mem[GUARD:GUARD] = bytes(size)
            self._base = ffi.from_buffer("uint8_t[]", self.mem, require_writable=True)
        else:
            self._base = ffi.new("uint8_t[]", size)
        self.ptr = self._base + GUARD

    def untouched(self) -> bool:
        return self.mem[:GUARD] == PATTERN and self.mem[GUARD + self.size :] == PATTERN


class Rig:
    """fp_tun_to_udp / fp_udp_to_tun on a batch built here, between a socketpair standing in
    for the TUN and loopback UDP to a peer socket."""

    def __init__(self, c: ModuleType, mtu: int = MTU, vnet: bool = False) -> None:
        self.ffi, self.lib = c.ffi, c.lib
        self.cx = c.Context(LOCAL, mtu, peer_check="peer-only")  # from the peer, inner any
        self.cx._cx.vnet = int(vnet)
        self.tun_end, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.peer.bind(("127.0.0.1", 0))
        self.routes = c.Routes()
        self.routes.set(ip("198.19.0.0"), 16, ip("127.0.0.1"), self.peer.getsockname()[1])
        self.lent: list[Lent] = []

    def batch(self, nslots: int, slot_size: int, aux_size: int | None = None) -> Any:
        """An fp_batch of nslots slots of slot_size bytes (and aux), all lent between guards."""
        b = self.ffi.new("fp_batch *")
        arena = Lent(self.ffi, nslots * slot_size)
        aux = Lent(self.ffi, self.lib.FP_AUX_MIN if aux_size is None else aux_size)
        self.lent += [arena, aux]
        b.arena, b.slot_size, b.nslots = arena.ptr, slot_size, nslots
        b.aux, b.aux_size = aux.ptr, aux.size
        return b

    def udp_gro(self) -> None:
        got = self.lib.fp_udp_offloads(self.cx._cx, self.sock.fileno(), self.lib.FP_OFFLOAD_GRO)
        if not got & self.lib.FP_OFFLOAD_GRO:
            pytest.skip("the kernel refused UDP_GRO on this socket")

    def tun_to_udp(self, b: Any, budget: int) -> int:
        return int(
            self.lib.fp_tun_to_udp(
                self.cx._cx, self.routes._rt, b, self.tun_end.fileno(), self.sock.fileno(), budget
            )
        )

    def udp_to_tun(self, b: Any, budget: int) -> int:
        return int(
            self.lib.fp_udp_to_tun(
                self.cx._cx,
                self.routes._rt,
                b,
                self.sock.fileno(),
                self.tun_end.fileno(),
                budget,
            )
        )

    def gso_send(self, pkts: list[bytes], may_fail: bool = False) -> bool:
        """pkts (all of one size but the last) as one UDP_SEGMENT message from the peer; False
        if the kernel refused and may_fail (else the test is skipped)."""
        seg = struct.pack("=H", len(pkts[0]))
        try:
            self.peer.sendmsg(
                [b"".join(pkts)], [(socket.SOL_UDP, UDP_SEGMENT, seg)], 0, self.sock.getsockname()
            )
        except OSError as exc:
            if may_fail:
                return False
            pytest.skip(f"cannot send {len(pkts)} segments with UDP_SEGMENT: {exc}")
        assert select.select([self.sock], [], [], 2.0)[0]
        return True

    def peer_in(self, n: int) -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n and select.select([self.peer], [], [], 2.0)[0]:
            got.append(self.peer.recv(70000))
        assert not select.select([self.peer], [], [], 0.02)[0], "more datagrams than expected"
        assert len(got) == n
        return got

    def tun_out(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun.recv(70000))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.close()


@pytest.fixture
def make_rig(c_impl: ModuleType) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**kw: Any) -> Rig:
        rigs.append(Rig(c_impl, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()
        assert all(lent.untouched() for lent in r.lent), "the C wrote outside a lent buffer"


# --- egress with vnet headers: frames read one after another into the arena ------------------

BIG = payload(65535 - 52, seed=21)  # IPv4 total length 65535: the largest frame, 65545 bytes


def big_frame(seq: int) -> bytes:
    frame = tso(BIG, MSS, src=SRC, dst=DST, opts=TS_OPTS, seq=seq)
    assert len(frame) == 10 + 65535
    return frame


def big_segments(seq: int) -> list[bytes]:
    return [forwarded(p) for p in expect_tcp(BIG, MSS, src=SRC, dst=DST, opts=TS_OPTS, seq=seq)]


@pytest.mark.parametrize(
    ("nslots", "slot_size"),
    [
        (5, 13109),  # the fuzz finding: 65545 bytes, exactly one largest frame, not 8-aligned
        (2, 32773),  # 65546
        (3, 21851),  # 65553: one frame and 8 bytes
        (7, 9363),  # 65541: smaller than the largest frame, refused
        (2, 65536),  # Pump's smallest vnet batch
        (64, 65536),  # Pump's default
    ],
)
def test_vnet_egress_stays_inside_any_arena(make_rig, nslots, slot_size):
    rig = make_rig(vnet=True)
    b = rig.batch(nslots, slot_size)
    if nslots * slot_size < 10 + 65535:  # fastpath.h: the arena must hold the largest frame
        assert rig.tun_to_udp(b, 100) == -errno.EINVAL
        return
    plain = ipv4_udp(SRC, DST, b"right behind a 64 KiB frame")
    rig.tun.send(big_frame(1000))
    rig.tun.send(vnet() + plain)
    want = [*big_segments(1000), forwarded(plain)]
    assert rig.tun_to_udp(b, 1000) == len(want)
    assert all(lent.untouched() for lent in rig.lent), "a read went past the arena's end"
    assert rig.peer_in(len(want)) == want
    # a second round: two largest frames back to back, then a small one
    for frame in (vnet() + plain, big_frame(7), big_frame(90000), vnet() + plain):
        rig.tun.send(frame)
    want = [forwarded(plain), *big_segments(7), *big_segments(90000), forwarded(plain)]
    assert rig.tun_to_udp(b, 1000) == len(want)
    assert all(lent.untouched() for lent in rig.lent), "a read went past the arena's end"
    assert rig.peer_in(len(want)) == want
    s = rig.cx.stats()
    assert s["tso_reads"] == 3 and s["egress"]["tx_packets"] == s["egress"]["rx_packets"]


# --- ingress with UDP_GRO: a receive may hold many datagrams ---------------------------------


def gro_run(n: int, size: int = MTU) -> list[bytes]:
    """n valid packets of size bytes (distinct payloads), for one UDP_SEGMENT message."""
    return [ipv4_udp(SRC, DST, bytes([i % 256]) * (size - 28), ident=i) for i in range(n)]


def test_udp_gro_needs_slots_a_gro_receive_fits(make_rig, c_impl):
    # slot_size = mtu + 1 is enough for one datagram, not for a GRO receive of twenty: the
    # kernel would cut it (MSG_TRUNC) and twenty valid packets would go as one "oversize".
    rig = make_rig()
    rig.udp_gro()
    pkts = gro_run(20)
    rig.gso_send(pkts)
    assert rig.udp_to_tun(rig.batch(8, MTU + 1), 100) == -errno.EINVAL
    assert rig.cx.stats()["ingress"]["rx_packets"] == 0, "refused before anything was taken"
    small = c_impl.lib.FP_UDP_MAX_PAYLOAD - 1
    assert rig.udp_to_tun(rig.batch(8, small), 100) == -errno.EINVAL
    # a slot of FP_UDP_MAX_PAYLOAD bytes holds any GRO receive: all twenty get through
    assert rig.udp_to_tun(rig.batch(8, c_impl.lib.FP_UDP_MAX_PAYLOAD), 100) == 20
    assert rig.tun_out() == [forwarded(p) for p in pkts]
    s = rig.cx.stats()
    assert s["gro_receives"] == 1 and s["ingress"]["drops"]["oversize"] == 0
    # egress never receives: its batch is not held to the GRO rule
    assert rig.tun_to_udp(rig.batch(8, MTU + 1), 100) == 0


def test_pump_with_small_slots_leaves_udp_gro_off(make_rig, c_impl):
    rig = make_rig()
    tun_fd = rig.tun_end.fileno()
    pump = c_impl.Pump(rig.cx, rig.routes, tun_fd, rig.sock, offload=True, slot_size=MTU + 1)
    assert pump.offloads["udp_gro"] is False, "a GRO receive would not fit a slot"
    pkts = gro_run(20)
    rig.gso_send(pkts)
    assert pump.udp_to_tun(100) == 20  # the kernel hands them over one datagram each
    assert rig.tun_out() == [forwarded(p) for p in pkts]
    with pytest.raises(ValueError):
        c_impl.Pump(rig.cx, rig.routes, 0, rig.sock, slot_size=MTU)  # must see an over-MTU one
    with pytest.raises(ValueError):
        c_impl.Pump(rig.cx, rig.routes, 0, rig.sock, slot_size=c_impl.MAX_SLOT + 1)
    with pytest.raises(ValueError):  # two slots of 32772 bytes cannot hold a 65545-byte frame
        c_impl.Pump(rig.cx, rig.routes, 0, rig.sock, batch=2, slot_size=32772, vnet=True)
    c_impl.Pump(rig.cx, rig.routes, 0, rig.sock, batch=2, slot_size=32773, vnet=True)


def test_udp_gro_budget_bound(make_rig):
    # fastpath.h: one recvmmsg asks for min(budget - taken, nslots) messages and takes each
    # whole, so the return may pass the budget by (K - 1) * min(budget, nslots), K the
    # datagrams one receive may hold (64 from the wire; UDP_MAX_SEGMENTS from a local sender).
    rig = make_rig()
    rig.udp_gro()
    b = rig.batch(8, 65536)
    runs = [gro_run(64, 100) for _ in range(3)]
    for run in runs:
        rig.gso_send(run)
    got = rig.udp_to_tun(b, 2)
    assert got == 128, "two messages of 64 datagrams each, for a budget of 2"
    assert got > 2 + 63, "more than 'at most 63 more'"
    assert got <= 2 + (64 - 1) * min(2, 8)
    assert rig.tun_out() == [forwarded(p) for p in runs[0] + runs[1]]
    assert rig.udp_to_tun(b, 1) == 64, "the third message was left for the next call"
    assert rig.tun_out() == [forwarded(p) for p in runs[2]]
    assert rig.cx.stats()["gro_receives"] == 3
    # Linux >= 6.11 lets a local sender put 128 segments in one message (UDP_MAX_SEGMENTS)
    run = gro_run(128, 100)
    if not rig.gso_send(run, may_fail=True):
        return
    assert rig.udp_to_tun(b, 1) == 128 <= 1 + (128 - 1) * min(1, 8)
    assert rig.tun_out() == [forwarded(p) for p in run]
