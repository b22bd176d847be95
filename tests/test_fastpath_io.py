# fd-level tests of the pumps, no root needed: an AF_UNIX SOCK_DGRAM socketpair stands in for the
# TUN (one datagram per read, EAGAIN when empty) and real UDP sockets on 127.0.0.1 carry the
# overlay.  Modes: the Python Pump, the C Pump batched, and the C Pump with per_packet=True.
from __future__ import annotations

import os
import select
import socket
import struct
import time
from types import ModuleType

import pytest
from packets import (
    ACK,
    GSO_NONE,
    GSO_UDP_L4,
    NEEDS_CSUM,
    PSH,
    TS_OPTS,
    complete,
    expect_tcp,
    field,
    flow,
    forwarded,
    frag_needed,
    header_ok,
    icmp_error,
    ip,
    ipv4,
    ipv4_udp,
    l4_ok,
    mutate,
    nonzero,
    payload,
    ref_merge,
    tcp4,
    tso,
    vnet,
)

LOCAL = ip("198.18.0.1")
LOCAL_SUBNET = (ip("198.18.0.0"), 16)  # this node's: ingress delivers SRC and UNROUTED here
SRC = "198.18.5.5"
DST = "198.19.1.5"  # routed to the peer socket: ingress from the peer comes from its subnet
UNROUTED = "198.18.9.9"
BLACKHOLE = "198.19.2.5"  # routed to 127.0.0.1 port 0: every sendto fails with EINVAL
MTU = 1400
MODES = ("python", "c-batched", "c-per-packet")


class Rig:
    """One pump between a fake TUN and a loopback UDP socket, plus the peer's UDP socket."""

    def __init__(
        self,
        impl: ModuleType,
        mode: str,
        batch: int = 8,
        mtu: int = MTU,
        offload: bool = False,
        **cxkw,
    ) -> None:
        self.mode = mode
        self.impl = impl
        self.tun_fd_end, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_fd_end, self.tun, self.sock, self.peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.peer.bind(("127.0.0.1", 0))
        cxkw.setdefault("subnet", LOCAL_SUBNET)
        self.cx = self.impl.Context(LOCAL, mtu, per_packet=mode != "c-batched", **cxkw)
        self.routes = self.impl.Routes()
        self.routes.set(ip("198.19.0.0"), 16, ip("127.0.0.1"), self.peer.getsockname()[1])
        self.routes.set(ip("198.19.2.0"), 24, ip("127.0.0.1"), 0)
        kw = {"offload": True} if offload else {}
        self.pump = self.impl.Pump(
            self.cx, self.routes, self.tun_fd_end.fileno(), self.sock, batch=batch, **kw
        )

    @property
    def batched(self) -> bool:
        return self.mode == "c-batched"

    def to_tun(self, *pkts: bytes) -> None:
        """Packets the kernel would hand the pump on its TUN fd."""
        for p in pkts:
            self.tun.send(p)

    def from_peer(self, *pkts: bytes) -> None:
        for p in pkts:
            self.peer.sendto(p, self.sock.getsockname())

    def tun_out(self) -> list[bytes]:
        """Everything the pump wrote into the TUN."""
        return _drain(self.tun)

    def peer_in(self, n: int) -> list[tuple[bytes, tuple[str, int]]]:
        """Exactly n datagrams at the peer (waiting up to 2 s for them), and no more."""
        got: list[tuple[bytes, tuple[str, int]]] = []
        while len(got) < n:
            if not select.select([self.peer], [], [], 2.0)[0]:
                break
            got.append(self.peer.recvfrom(70000))
        assert not select.select([self.peer], [], [], 0.02)[0], "more datagrams than expected"
        assert len(got) == n
        return got

    def close(self) -> None:
        for s in (self.tun_fd_end, self.tun, self.sock, self.peer):
            s.close()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


def impl_for(request: pytest.FixtureRequest, mode: str) -> ModuleType:
    return request.getfixturevalue("py_impl" if mode == "python" else "c_impl")


@pytest.fixture
def make_rig(request: pytest.FixtureRequest):
    rigs: list[Rig] = []

    def make(mode: str, **kw) -> Rig:
        rig = Rig(impl_for(request, mode), mode, **kw)
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


# --- egress ---------------------------------------------------------------------------------


def test_egress_byte_exact(make_rig, mode):
    rig = make_rig(mode)
    pkts = [
        ipv4_udp(SRC, DST, b"a" * 20),
        ipv4_udp(SRC, DST, b"b" * (MTU - 28)),  # exactly the MTU
        ipv4_udp(SRC, DST, b"odd", options=b"\x01" * 8, ttl=2),
        ipv4(SRC, DST, 6, b"tcp-ish", tos=0x10, ident=4242, flags_frag=0x4000),
        ipv4_udp(SRC, DST, b"e" * 100, ttl=255),
    ]
    junk = b"bytes after the total length"
    rig.to_tun(*pkts[:-1], pkts[-1] + junk)
    assert rig.pump.tun_to_udp(100) == 5
    got = rig.peer_in(5)
    assert [data for data, _ in got] == [forwarded(p) for p in pkts]
    assert {addr for _, addr in got} == {rig.sock.getsockname()}
    assert rig.tun_out() == []
    rx = sum(map(len, pkts)) + len(junk)
    tx = sum(map(len, pkts))
    want: dict = {
        "egress.rx_packets": 5,
        "egress.rx_bytes": rx,
        "egress.tx_packets": 5,
        "egress.tx_bytes": tx,
        "syscalls.read": 6,  # five packets and the EAGAIN
    }
    if rig.batched:
        want |= {"egress.batches": 1, "egress.batch_hist[2]": 1, "syscalls.sendmmsg": 1}
    else:
        want |= {"egress.batches": 5, "egress.batch_hist[0]": 5, "syscalls.sendto": 5}
    assert nonzero(rig.cx.stats()) == want


def test_budget_and_batch_honoured(make_rig, mode):
    rig = make_rig(mode, batch=4)
    pkts = [ipv4_udp(SRC, DST, bytes([i]) * (10 + i)) for i in range(10)]
    rig.to_tun(*pkts)
    assert rig.pump.tun_to_udp(6) == 6
    assert [d for d, _ in rig.peer_in(6)] == [forwarded(p) for p in pkts[:6]]
    assert rig.pump.tun_to_udp(100) == 4, "the other four stayed queued in the TUN"
    assert [d for d, _ in rig.peer_in(4)] == [forwarded(p) for p in pkts[6:]]
    assert rig.pump.tun_to_udp(100) == 0
    s = rig.cx.stats()
    assert s["egress"]["rx_packets"] == s["egress"]["tx_packets"] == 10
    # reads: 6 (the budget stops before an EAGAIN), 4 + EAGAIN, EAGAIN
    assert s["syscalls"]["read"] == 12
    if rig.batched:  # rounds of 4, 2 | 4 | none
        assert s["egress"]["batches"] == 3
        assert s["egress"]["batch_hist"] == [0, 1, 2, 0, 0, 0, 0, 0]
        assert s["syscalls"]["sendmmsg"] == 3 and s["syscalls"]["sendto"] == 0
    else:
        assert s["egress"]["batches"] == 10
        assert s["egress"]["batch_hist"] == [10, 0, 0, 0, 0, 0, 0, 0]
        assert s["syscalls"]["sendto"] == 10 and s["syscalls"]["sendmmsg"] == 0


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_batch_larger_than_slots(make_rig, batch):
    rig = make_rig("c-batched", batch=batch)
    pkts = [ipv4_udp(SRC, DST, bytes([i]) * 30) for i in range(70)]
    rig.to_tun(*pkts)
    assert rig.pump.tun_to_udp(1000) == 70
    assert [d for d, _ in rig.peer_in(70)] == [forwarded(p) for p in pkts]
    s = rig.cx.stats()["egress"]
    rounds = -(-70 // batch)
    assert s["batches"] == rounds
    assert sum(n * (1 << k) for k, n in enumerate(s["batch_hist"])) <= 70


def test_eagain_returns_zero(make_rig, mode):
    rig = make_rig(mode)
    assert rig.pump.tun_to_udp(10) == 0
    assert rig.pump.udp_to_tun(10) == 0
    recv = "recvmmsg" if rig.batched else "recvfrom"
    assert nonzero(rig.cx.stats()) == {"syscalls.read": 1, f"syscalls.{recv}": 1}


def test_budget_zero_takes_nothing(make_rig, mode):
    rig = make_rig(mode)
    rig.to_tun(ipv4_udp(SRC, DST))
    rig.from_peer(ipv4_udp(SRC, DST))
    assert rig.pump.tun_to_udp(0) == 0
    assert rig.pump.udp_to_tun(0) == 0
    assert nonzero(rig.cx.stats()) == {}
    assert rig.pump.tun_to_udp(1) == 1
    assert rig.pump.udp_to_tun(1) == 1


def test_no_route_icmp_back_into_tun(make_rig, mode):
    rig = make_rig(mode)
    pkt = ipv4_udp(SRC, UNROUTED, b"nowhere to go")
    rig.to_tun(pkt)
    assert rig.pump.tun_to_udp(10) == 1
    assert rig.tun_out() == [icmp_error(LOCAL, pkt, 3)]
    rig.peer_in(0)
    assert nonzero(rig.cx.stats()) == {
        "egress.rx_packets": 1,
        "egress.rx_bytes": len(pkt),
        "egress.drops.no_route": 1,
        "egress.batches": 1,
        "egress.batch_hist[0]": 1,
        "icmp_unreachable": 1,
        "syscalls.read": 2,
        "syscalls.write": 1,
    }


def test_egress_ttl_exceeded_into_tun(make_rig, mode):
    rig = make_rig(mode)
    pkt = ipv4_udp(SRC, DST, ttl=1)
    rig.to_tun(pkt)
    assert rig.pump.tun_to_udp(10) == 1
    assert rig.tun_out() == [icmp_error(LOCAL, pkt, 11)]
    rig.peer_in(0)
    s = rig.cx.stats()
    assert s["egress"]["drops"]["ttl_exceeded"] == s["icmp_time_exceeded"] == 1


def test_egress_drops(make_rig, mode):
    rig = make_rig(mode)
    bad = [
        b"",
        b"\x45" * 10,
        b"\x60" + bytes(47),  # IPv6
        ipv4_udp(SRC, DST, b"o" * MTU),  # over the MTU
        mutate(ipv4_udp(SRC, DST), checksum=1),
        mutate(ipv4_udp(SRC, DST), total_length=500),
    ]
    rig.to_tun(*bad)
    assert rig.pump.tun_to_udp(100) == 6
    rig.peer_in(0)
    assert rig.tun_out() == []
    s = rig.cx.stats()["egress"]
    assert s["rx_packets"] == 6 and s["rx_bytes"] == sum(map(len, bad))
    assert s["tx_packets"] == s["tx_bytes"] == 0
    assert {k: v for k, v in s["drops"].items() if v} == {
        "too_short": 2,
        "not_ipv4": 1,
        "oversize": 1,
        "bad_checksum": 1,
        "truncated": 1,
    }


def test_send_refused_is_tx_error(make_rig, mode):
    rig = make_rig(mode)
    pkts = [ipv4_udp(SRC, DST, b"1"), ipv4_udp(SRC, BLACKHOLE, b"2"), ipv4_udp(SRC, DST, b"3")]
    rig.to_tun(*pkts)
    assert rig.pump.tun_to_udp(10) == 3
    assert [d for d, _ in rig.peer_in(2)] == [forwarded(pkts[0]), forwarded(pkts[2])]
    s = rig.cx.stats()
    assert s["egress"]["tx_packets"] == 2
    assert s["egress"]["tx_bytes"] == len(pkts[0]) + len(pkts[2])
    assert s["egress"]["drops"]["tx_error"] == 1
    if rig.batched:  # sends 1 and stops at the refused one; refused; the last one
        assert s["syscalls"]["sendmmsg"] == 3
    else:
        assert s["syscalls"]["sendto"] == 3


# --- ingress --------------------------------------------------------------------------------


def test_ingress_byte_exact(make_rig, mode):
    rig = make_rig(mode)
    pkts = [
        ipv4_udp(DST, SRC, b"x" * 33),
        ipv4_udp(DST, UNROUTED, b"ingress needs no route", ttl=2),
        ipv4_udp(DST, SRC, b"y" * (MTU - 28)),
    ]
    rig.from_peer(pkts[0], pkts[1] + b"trailer", pkts[2])
    assert rig.pump.udp_to_tun(100) == 3
    assert rig.tun_out() == [forwarded(p) for p in pkts]
    rig.peer_in(0)
    want: dict = {
        "ingress.rx_packets": 3,
        "ingress.rx_bytes": sum(map(len, pkts)) + len(b"trailer"),
        "ingress.tx_packets": 3,
        "ingress.tx_bytes": sum(map(len, pkts)),
        "syscalls.write": 3,
    }
    if rig.batched:  # one recvmmsg returns 3 < 8: the round ends without another call
        want |= {"ingress.batches": 1, "ingress.batch_hist[1]": 1, "syscalls.recvmmsg": 1}
    else:
        want |= {"ingress.batches": 3, "ingress.batch_hist[0]": 3, "syscalls.recvfrom": 4}
    assert nonzero(rig.cx.stats()) == want


def test_ingress_budget(make_rig, mode):
    rig = make_rig(mode, batch=4)
    pkts = [ipv4_udp(DST, SRC, bytes([i]) * 20) for i in range(7)]
    rig.from_peer(*pkts)
    assert rig.pump.udp_to_tun(5) == 5
    assert rig.tun_out() == [forwarded(p) for p in pkts[:5]]
    assert rig.pump.udp_to_tun(5) == 2
    assert rig.tun_out() == [forwarded(p) for p in pkts[5:]]
    s = rig.cx.stats()
    if rig.batched:  # rounds of 4 and 1 | 2
        assert s["ingress"]["batch_hist"] == [1, 1, 1, 0, 0, 0, 0, 0]
        assert s["syscalls"]["recvmmsg"] == 3
    else:  # 5 | 2 + EAGAIN
        assert s["ingress"]["batch_hist"] == [7, 0, 0, 0, 0, 0, 0, 0]
        assert s["syscalls"]["recvfrom"] == 8


def test_ingress_ttl_exceeded_answers_sender(make_rig, mode):
    rig = make_rig(mode)
    pkt = ipv4_udp(DST, SRC, b"last hop", ttl=1)
    rig.from_peer(pkt)
    assert rig.pump.udp_to_tun(10) == 1
    assert rig.tun_out() == []
    [(reply, addr)] = rig.peer_in(1)
    assert reply == icmp_error(LOCAL, pkt, 11)
    assert addr == rig.sock.getsockname()
    recv = {"syscalls.recvmmsg": 1} if rig.batched else {"syscalls.recvfrom": 2}
    assert nonzero(rig.cx.stats()) == {
        "ingress.rx_packets": 1,
        "ingress.rx_bytes": len(pkt),
        "ingress.drops.ttl_exceeded": 1,
        "ingress.batches": 1,
        "ingress.batch_hist[0]": 1,
        "icmp_time_exceeded": 1,
        "syscalls.sendto": 1,
        **recv,
    }


@pytest.mark.parametrize("size", [MTU + 1, 1500, 9000, 60000])
def test_ingress_oversize_not_written(make_rig, mode, size):
    rig = make_rig(mode)
    big = ipv4_udp(DST, SRC, b"B" * (size - 28))
    ok = ipv4_udp(DST, SRC, b"fine")
    rig.from_peer(big, ok)
    assert rig.pump.udp_to_tun(10) == 2
    assert rig.tun_out() == [forwarded(ok)], "only the packet within the MTU reaches the TUN"
    s = rig.cx.stats()["ingress"]
    assert s["rx_packets"] == 2 and s["rx_bytes"] == size + len(ok)
    assert s["tx_packets"] == 1 and s["tx_bytes"] == len(ok)
    assert {k: v for k, v in s["drops"].items() if v} == {"oversize": 1}


def test_ingress_garbage(make_rig, mode):
    rig = make_rig(mode)
    junk = [b"", b"hello", b"\x60" + bytes(50), mutate(ipv4_udp(DST, SRC), checksum=3)]
    rig.from_peer(*junk)
    assert rig.pump.udp_to_tun(10) == 4
    assert rig.tun_out() == []
    rig.peer_in(0)
    d = rig.cx.stats()["ingress"]["drops"]
    assert {k: v for k, v in d.items() if v} == {"too_short": 2, "not_ipv4": 1, "bad_checksum": 1}


def fill(sock: socket.socket) -> int:
    """Send from sock until its buffer is full; the number of datagrams that went."""
    n = 0
    while True:
        try:
            sock.send(b"filler")
        except BlockingIOError:
            return n
        n += 1


def test_full_tun_costs_tx_error(make_rig, mode):
    rig = make_rig(mode)
    rig.tun_fd_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filler = fill(rig.tun_fd_end)  # the pump's writes into the TUN now get EAGAIN
    ok, ttl1 = ipv4_udp(DST, SRC, b"in"), ipv4_udp(SRC, UNROUTED, b"out", ttl=1)
    rig.from_peer(ok)
    rig.to_tun(ttl1)
    t0 = time.monotonic()
    assert rig.pump.udp_to_tun(10) == 1
    assert rig.pump.tun_to_udp(10) == 1
    assert time.monotonic() - t0 < 1.0, "a full TUN costs a short wait, never a block"
    s = rig.cx.stats()
    assert s["ingress"]["drops"]["tx_error"] == 1 and s["ingress"]["tx_packets"] == 0
    assert s["egress"]["drops"] == {
        **dict.fromkeys(s["egress"]["drops"], 0),
        "ttl_exceeded": 1,
        "tx_error": 1,
    }
    assert s["icmp_time_exceeded"] == 1, "the reply was built, then could not be written"
    # one write each, one wait each (it times out: nothing drains the TUN), no retry
    assert (s["syscalls"]["write"], s["syscalls"]["poll"]) == (2, 2)
    assert len(rig.tun_out()) == filler, "only the filler reached the TUN"
    rig.from_peer(ok)
    assert rig.pump.udp_to_tun(10) == 1
    assert rig.tun_out() == [forwarded(ok)], "once drained, the TUN takes packets again"


# --- UDP GSO/GRO (C, batched only): still one IPv4 packet per datagram on the wire ---------

UDP_SEGMENT = 103


def test_gso_egress_one_packet_per_datagram(make_rig):
    rig = make_rig("c-batched", batch=32, offload=True)
    if not rig.pump.offloads["udp_gso"]:
        pytest.skip("the kernel refused UDP_SEGMENT on this socket")
    pkts = [ipv4_udp(SRC, DST, bytes([i]) * 172) for i in range(10)]  # 200 bytes each
    pkts.append(ipv4_udp(SRC, DST, b"short tail"))  # a run may end with a shorter one
    pkts += [ipv4_udp(SRC, DST, bytes([i]) * 272) for i in range(5)]
    rig.to_tun(*pkts)
    assert rig.pump.tun_to_udp(100) == 16
    assert [d for d, _ in rig.peer_in(16)] == [forwarded(p) for p in pkts]
    s = rig.cx.stats()
    assert s["egress"]["tx_packets"] == 16
    assert s["egress"]["tx_bytes"] == sum(map(len, pkts))
    assert s["gso_sends"] >= 1
    assert s["syscalls"]["sendmmsg"] == 1


def test_gso_runs_split_by_peer_size_and_limit(make_rig):
    rig = make_rig("c-batched", batch=64, offload=True)
    if not rig.pump.offloads["udp_gso"]:
        pytest.skip("the kernel refused UDP_SEGMENT on this socket")
    peer2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer2.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        peer2.bind(("127.0.0.1", 0))
        peer2.setblocking(False)
        rig.routes.set(ip("198.19.3.0"), 24, ip("127.0.0.1"), peer2.getsockname()[1])
        to1, to2 = "198.19.1.9", "198.19.3.9"
        # MTU-sized packets: 64 of them exceed one UDP_SEGMENT message's 65507 bytes.
        big = [ipv4_udp(SRC, to1, bytes([i]) * (MTU - 28)) for i in range(50)]
        mixed = []
        for i in range(14):  # runs interrupted by the other peer and by size changes
            mixed.append(ipv4_udp(SRC, to1 if i % 3 else to2, bytes([i]) * (100 + 7 * (i % 4))))
        rig.to_tun(*big, *mixed)
        assert rig.pump.tun_to_udp(64) == 64
        want1 = [forwarded(p) for p in big + mixed if p[16:20] == ip(to1).to_bytes(4, "big")]
        want2 = [forwarded(p) for p in mixed if p[16:20] == ip(to2).to_bytes(4, "big")]
        assert [d for d, _ in rig.peer_in(len(want1))] == want1
        select.select([peer2], [], [], 1.0)
        assert _drain(peer2) == want2
        s = rig.cx.stats()
        assert s["egress"]["tx_packets"] == 64 and s["egress"]["drops"]["tx_error"] == 0
        assert s["gso_sends"] >= 2, "50 MTU-sized packets need at least two GSO messages"
    finally:
        peer2.close()


@pytest.mark.parametrize(
    "ports, gso_messages",
    [
        ((1, 1, 1, 2, 2, 2), 2),  # two runs of one flow each: one message per flow
        ((1, 2, 1, 2, 1, 2), 0),  # flows alternate: nothing to coalesce
        ((1, 1, 2, 2, 3, 3), 3),
    ],
)
def test_gso_message_holds_one_inner_flow(make_rig, ports, gso_messages):
    # The receiver's multi-queue steering sees a merged message's first packet only, so a
    # message mixing flows could put part of a flow on another queue (reordering).
    rig = make_rig("c-batched", batch=16, offload=True)
    if not rig.pump.offloads["udp_gso"]:
        pytest.skip("the kernel refused UDP_SEGMENT on this socket")
    pkts = [ipv4_udp(SRC, DST, bytes([i]) * 100, sport=5000 + p) for i, p in enumerate(ports)]
    rig.to_tun(*pkts)
    assert rig.pump.tun_to_udp(100) == len(pkts)
    assert [d for d, _ in rig.peer_in(len(pkts))] == [forwarded(p) for p in pkts]
    s = rig.cx.stats()
    assert s["gso_sends"] == gso_messages
    assert s["syscalls"]["sendmmsg"] == 1


def test_gro_ingress_split_into_packets(make_rig):
    rig = make_rig("c-batched", batch=8, offload=True)
    if not rig.pump.offloads["udp_gro"]:
        pytest.skip("the kernel refused UDP_GRO on this socket")
    pkts = [ipv4_udp(DST, SRC, bytes([i]) * 92) for i in range(4)]  # 120 bytes each
    pkts.append(ipv4_udp(DST, SRC, b"tail"))
    seg = struct.pack("=H", 120)
    try:
        rig.peer.sendmsg(
            [b"".join(pkts)], [(socket.SOL_UDP, UDP_SEGMENT, seg)], 0, rig.sock.getsockname()
        )
    except OSError as exc:
        pytest.skip(f"cannot send with UDP_SEGMENT: {exc}")
    select.select([rig.sock], [], [], 1.0)
    assert rig.pump.udp_to_tun(64) == 5
    assert rig.tun_out() == [forwarded(p) for p in pkts]
    s = rig.cx.stats()
    assert s["ingress"]["rx_packets"] == s["ingress"]["tx_packets"] == 5
    assert s["ingress"]["tx_bytes"] == sum(map(len, pkts))
    assert s["gro_receives"] == 1, "the kernel handed the five datagrams over as one"


def test_python_pump_has_no_offloads(make_rig):
    rig = make_rig("python", offload=True)
    assert rig.pump.offloads == {"udp_gso": False, "udp_gro": False}
    assert rig.pump.gso_active is False


# --- both together, C per-packet against Python -----------------------------------------------


def run_script(impl: ModuleType, mode: str) -> tuple[dict, list, list]:
    """A fixed mix of traffic through one rig; (stats, what the peer got, what the TUN got)."""
    rig = Rig(impl, mode, batch=4)
    try:
        seen_peer: list[bytes] = []
        seen_tun: list[bytes] = []
        egress_pkts = [
            ipv4_udp(SRC, DST, b"one"),
            ipv4_udp(SRC, UNROUTED, b"no route"),
            ipv4_udp(SRC, DST, b"ttl", ttl=1),
            b"\x60" + bytes(39),
            b"short",
            ipv4_udp(SRC, DST, b"o" * MTU),
            ipv4_udp(SRC, BLACKHOLE, b"refused"),
            ipv4(SRC, DST, 1, b"\x03" + bytes(30), ttl=1),  # ICMP error: no answer
            ipv4_udp(SRC, DST, b"two") + b"trailer",
        ]
        ingress_pkts = [
            ipv4_udp(DST, SRC, b"in one"),
            ipv4_udp(DST, SRC, b"in ttl", ttl=1),
            ipv4_udp(DST, SRC, b"O" * 2000),
            b"\x45" + bytes(30),
            ipv4_udp(DST, "224.0.0.5", b"mcast dst", ttl=1),
            ipv4_udp(SRC, SRC, b"spoofed: a local source"),
            ipv4_udp(DST, SRC, b"in two"),
        ]
        rig.to_tun(*egress_pkts)
        rig.from_peer(*ingress_pkts)
        for budget in (2, 3, 100, 100):
            rig.pump.tun_to_udp(budget)
            rig.pump.udp_to_tun(budget)
            seen_tun += rig.tun_out()
        while select.select([rig.peer], [], [], 0.05)[0]:
            seen_peer.append(rig.peer.recv(70000))
        return rig.cx.stats(), seen_peer, seen_tun
    finally:
        rig.close()


def test_c_per_packet_equals_python(py_impl, c_impl):
    py = run_script(py_impl, "python")
    c = run_script(c_impl, "c-per-packet")
    assert c[0] == py[0]
    assert c[1] == py[1]
    assert c[2] == py[2]
    # ...and the script exercised what it meant to.
    s = py[0]
    assert s["egress"]["tx_packets"] == 2 and s["ingress"]["tx_packets"] == 2
    assert s["icmp_unreachable"] == 1 and s["icmp_time_exceeded"] == 2
    assert s["egress"]["drops"]["tx_error"] == 1
    assert len(py[1]) == 3 and len(py[2]) == 4  # 2 forwarded + 1 reply; 2 replies + 2 in


def test_c_batched_same_traffic_as_python(py_impl, c_impl):
    py, c = run_script(py_impl, "python"), run_script(c_impl, "c-batched")
    assert c[1] == py[1] and c[2] == py[2]
    for direction in ("egress", "ingress"):
        for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drops"):
            assert c[0][direction][key] == py[0][direction][key], (direction, key)
    for key in ("icmp_unreachable", "icmp_time_exceeded", "icmp_ratelimited"):
        assert c[0][key] == py[0][key]


# --- fd-level failures and arguments --------------------------------------------------------


def test_closed_tun_fd(make_rig, mode):
    rig = make_rig(mode)
    rig.tun_fd_end.close()
    with pytest.raises(OSError) as exc:
        rig.pump.tun_to_udp(10)
    assert not isinstance(exc.value, BlockingIOError)


def test_closed_udp_socket(make_rig, mode):
    rig = make_rig(mode)
    rig.sock.close()
    with pytest.raises(OSError) as exc:
        rig.pump.udp_to_tun(10)
    assert not isinstance(exc.value, BlockingIOError)


def test_unreadable_tun_fd(request, mode):
    impl = impl_for(request, mode)
    fd = os.open(os.devnull, os.O_WRONLY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        cx = impl.Context(LOCAL, MTU, per_packet=mode != "c-batched")
        pump = impl.Pump(cx, impl.Routes(), fd, sock)
        with pytest.raises(OSError) as exc:
            pump.tun_to_udp(10)
        assert exc.value.errno == 9  # EBADF: not open for reading
        assert cx.stats()["egress"]["rx_packets"] == 0
    finally:
        os.close(fd)
        sock.close()


@pytest.mark.parametrize("batch", [0, 65, -1])
def test_bad_batch(impl, batch):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(ValueError):
        impl.Pump(impl.Context(LOCAL, MTU), impl.Routes(), 0, sock, batch=batch)


# --- TUN offloads (C, batched, vnet): frames on the fake TUN carry a virtio-net header -------
# The socketpair stands in for a TUN opened with IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4):
# every datagram written into it is what the kernel would hand over (10-byte header, then an
# IPv4 (super-)packet), and everything the pump writes must start with a header too.

VNET_MSS = MTU - 52  # TCP over IPv4 with timestamps: a full segment is exactly the MTU


def vnet_rig(make_rig, batch: int = 8, offload: bool = False) -> Rig:
    """A batched C rig whose pump has vnet headers on (Pump(vnet=True))."""
    rig = make_rig("c-batched", batch=batch, offload=offload)
    rig.pump = rig.impl.Pump(
        rig.cx,
        rig.routes,
        rig.tun_fd_end.fileno(),
        rig.sock,
        batch=batch,
        offload=offload,
        vnet=True,
    )
    assert rig.pump.offloads["tun_vnet"] is True
    return rig


def tso_to(dst: str, data: bytes, **kw) -> bytes:
    """A TSO super-packet from SRC to dst (timestamps, MSS that fills the MTU)."""
    return tso(data, VNET_MSS, src=SRC, dst=dst, opts=TS_OPTS, **kw)


def tso_segments(dst: str, data: bytes, **kw) -> list[bytes]:
    return expect_tcp(data, VNET_MSS, src=SRC, dst=dst, opts=TS_OPTS, **kw)


def test_vnet_needs_batched_mode(c_impl):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for cx, batch in (
            (c_impl.Context(LOCAL, MTU, per_packet=True), 8),
            (c_impl.Context(LOCAL, MTU), 1),
        ):
            with pytest.raises(ValueError):
                c_impl.Pump(cx, c_impl.Routes(), 0, sock, batch=batch, vnet=True)


def test_vnet_tso_leaves_as_mtu_sized_datagrams(make_rig):
    rig = vnet_rig(make_rig)
    data = payload(20000, seed=3)
    want = tso_segments(DST, data, flags=ACK | PSH)
    assert len(want) == 15
    rig.to_tun(tso_to(DST, data, flags=ACK | PSH))
    assert rig.pump.tun_to_udp(100) == 15, "the pump counts the segments it cut"
    got = [d for d, _ in rig.peer_in(15)]
    assert got == [forwarded(p) for p in want]
    for d in got:
        assert len(d) <= MTU and header_ok(d) and l4_ok(d)
    assert b"".join(d[52:] for d in got) == data
    assert rig.tun_out() == []
    assert nonzero(rig.cx.stats()) == {
        "egress.rx_packets": 15,
        "egress.rx_bytes": sum(map(len, want)),
        "egress.tx_packets": 15,
        "egress.tx_bytes": sum(map(len, want)),
        "egress.batches": 1,
        "egress.batch_hist[3]": 1,
        "tso_reads": 1,
        "syscalls.read": 2,  # the super-packet and the EAGAIN
        "syscalls.sendmmsg": 1,
    }


def test_vnet_plain_frames_and_checksum_completion(make_rig):
    rig = vnet_rig(make_rig)
    plain = ipv4_udp(SRC, DST, b"plain")
    partial = tcp4(b"needs its checksum", src=SRC, dst=DST, csum="partial")
    rig.to_tun(vnet() + plain, vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + partial)
    assert rig.pump.tun_to_udp(100) == 2
    full = tcp4(b"needs its checksum", src=SRC, dst=DST)
    assert [d for d, _ in rig.peer_in(2)] == [forwarded(plain), forwarded(full)]
    s = rig.cx.stats()
    assert s["tso_reads"] == 0 and s["egress"]["tx_packets"] == 2


def test_vnet_mixed_frames_in_one_round_keep_their_bytes(make_rig):
    # Split segments point at their payload where the read put it: frames read one after
    # another in one round must not overwrite each other before the send.
    rig = vnet_rig(make_rig, batch=8, offload=True)
    d1, d2 = payload(9000, seed=11), payload(5000, seed=12)
    plain = ipv4_udp(SRC, DST, b"between two super-packets")
    rig.to_tun(tso_to(DST, d1), vnet() + plain, tso_to(DST, d2, seq=90000))
    want = [*tso_segments(DST, d1), plain, *tso_segments(DST, d2, seq=90000)]
    assert rig.pump.tun_to_udp(100) == len(want)
    assert [d for d, _ in rig.peer_in(len(want))] == [forwarded(p) for p in want]


@pytest.mark.parametrize("case", ["ttl1", "unrouted"])
def test_vnet_super_packet_that_cannot_go_counts_every_segment(make_rig, case):
    # Not the zero-copy path: the general one decides each segment as a packet of its own.
    rig = vnet_rig(make_rig)
    data = payload(3 * VNET_MSS, seed=13)
    dst, ttl = (DST, 1) if case == "ttl1" else (UNROUTED, 64)
    rig.to_tun(tso_to(dst, data, ttl=ttl))
    assert rig.pump.tun_to_udp(100) == 3
    rig.peer_in(0)
    s = rig.cx.stats()
    reason = "ttl_exceeded" if case == "ttl1" else "no_route"
    assert s["egress"]["drops"][reason] == 3 and s["egress"]["tx_packets"] == 0
    replies = rig.tun_out()
    assert len(replies) == 3 and all(r[:10] == bytes(10) for r in replies)
    assert s["icmp_time_exceeded" if case == "ttl1" else "icmp_unreachable"] == 3


def test_vnet_gso_none_over_mtu_is_an_egress_drop(make_rig):
    # fastpath.h: the split returns a GSO_NONE packet as it is, whatever its size, and fp_egress
    # drops it as oversize - the very counters a TUN without vnet headers gives; the TCP one has
    # DF set and gets fragmentation needed (with a vnet header), the UDP one (no DF) nothing.
    big = ipv4_udp(SRC, DST, b"o" * (MTU + 1 - 28))
    partial = tcp4(payload(MTU), src=SRC, dst=DST, csum="partial")
    assert field(partial, "flags_frag") & 0x4000 and not field(big, "flags_frag")
    frames = [vnet() + big, vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + partial]
    plain = make_rig("c-batched")
    plain.to_tun(big, partial)
    assert plain.pump.tun_to_udp(100) == 2
    assert plain.tun_out() == [frag_needed(LOCAL, partial, MTU)]
    rig = vnet_rig(make_rig)
    rig.to_tun(*frames)
    assert rig.pump.tun_to_udp(100) == 2
    rig.peer_in(0)
    assert rig.tun_out() == [bytes(10) + frag_needed(LOCAL, partial, MTU)]
    s = nonzero(rig.cx.stats())
    assert s == nonzero(plain.cx.stats())
    assert s["egress.drops.oversize"] == 2 and s["egress.rx_bytes"] == len(big) + len(partial)


def test_vnet_egress_icmp_reply_has_a_header(make_rig):
    rig = vnet_rig(make_rig)
    pkt = ipv4_udp(SRC, DST, b"ttl", ttl=1)
    rig.to_tun(vnet() + pkt)
    assert rig.pump.tun_to_udp(10) == 1
    assert rig.tun_out() == [bytes(10) + icmp_error(LOCAL, pkt, 11)]
    rig.peer_in(0)


def test_vnet_tso_with_udp_gso(make_rig):
    rig = vnet_rig(make_rig, offload=True)
    data = payload(40000, seed=5)
    want = tso_segments(DST, data)
    rig.to_tun(tso_to(DST, data), tso_to(DST, data, seq=50000))
    n = 2 * len(want)
    assert rig.pump.tun_to_udp(1000) == n
    got = [d for d, _ in rig.peer_in(n)]
    want += tso_segments(DST, data, seq=50000)
    assert got == [forwarded(p) for p in want], "still one IPv4 packet per datagram"
    assert all(len(d) <= MTU and header_ok(d) and l4_ok(d) for d in got)
    s = rig.cx.stats()
    assert s["tso_reads"] == 2 and s["egress"]["tx_packets"] == n
    if rig.pump.offloads["udp_gso"]:
        assert s["gso_sends"] >= 1


def test_vnet_bad_frames_counted_never_sent(make_rig):
    rig = vnet_rig(make_rig, batch=16)
    bad = [
        b"",
        bytes(9),  # shorter than the header
        vnet() + b"\x60" + bytes(39),  # IPv6
        tso_to(DST, payload(3000), gso_type=GSO_UDP_L4),  # gso type does not fit the protocol
        tso(payload(3000), 0, src=SRC, dst=DST),  # gso_size 0
        tso_to(DST, payload(3000), flags_frag=0x2000),  # a fragment
        tso_to(DST, payload(3000))[:-1],  # truncated
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 10, 16) + ipv4_udp(SRC, DST),  # csum in the IP header
    ]
    too_big = tso(payload(3000), MTU, src=SRC, dst=DST)  # segments would pass the MTU
    good = ipv4_udp(SRC, DST, b"still forwarding")
    rig.to_tun(*bad, too_big, vnet() + good)
    assert rig.pump.tun_to_udp(100) == len(bad) + 2
    assert [d for d, _ in rig.peer_in(1)] == [forwarded(good)]
    # the super-packet too big for the MTU (DF set, as TCP sends): the sender learns the MTU
    assert rig.tun_out() == [bytes(10) + frag_needed(LOCAL, too_big[10:], MTU)]
    s = rig.cx.stats()
    e = s["egress"]
    assert {k: v for k, v in e["drops"].items() if v} == {"bad_offload": len(bad), "oversize": 1}
    assert e["rx_packets"] == len(bad) + 2
    assert e["rx_bytes"] == sum(max(len(f) - 10, 0) for f in [*bad, too_big]) + len(good)
    assert e["tx_packets"] == 1 and e["tx_bytes"] == len(good)
    assert s["tso_reads"] == 0


def test_vnet_egress_budget(make_rig):
    rig = vnet_rig(make_rig)
    data = payload(6000, seed=9)
    n = len(tso_segments(DST, data))
    rig.to_tun(tso_to(DST, data), tso_to(DST, data, seq=9000), vnet() + ipv4_udp(SRC, DST))
    # a super-packet is taken whole: one read, then the budget is spent
    assert rig.pump.tun_to_udp(1) == n
    assert len(rig.peer_in(n)) == n
    assert rig.pump.tun_to_udp(n) == n
    assert len(rig.peer_in(n)) == n
    assert rig.pump.tun_to_udp(100) == 1
    rig.peer_in(1)
    s = rig.cx.stats()
    assert s["tso_reads"] == 2 and s["syscalls"]["read"] == 4  # 3 frames and one EAGAIN


def test_vnet_ingress_coalesces_runs(make_rig):
    rig = vnet_rig(make_rig, batch=16)
    a = flow([1000] * 5, src=DST, dst=SRC)
    b = flow([700, 700, 300], src=DST, dst=SRC, sport=40001, seq=777)
    udp = ipv4_udp(DST, SRC, b"not tcp")
    ack = tcp4(b"", src=DST, dst=SRC, seq=5)
    rig.from_peer(*a, udp, *b, ack)
    assert rig.pump.udp_to_tun(100) == 10
    fa, fb = [forwarded(p) for p in a], [forwarded(p) for p in b]
    got = rig.tun_out()
    assert got == [
        ref_merge(fa),
        bytes(10) + forwarded(udp),
        ref_merge(fb),
        bytes(10) + forwarded(ack),
    ]
    merged = complete(got[0])
    assert header_ok(merged) and l4_ok(merged) and merged[8] == 63
    assert merged[40:] == b"".join(p[40:] for p in a)
    all_fwd = [*fa, forwarded(udp), *fb, forwarded(ack)]
    assert nonzero(rig.cx.stats()) == {
        "ingress.rx_packets": 10,
        "ingress.rx_bytes": sum(map(len, [*a, udp, *b, ack])),
        "ingress.tx_packets": 10,
        "ingress.tx_bytes": sum(map(len, all_fwd)),
        "ingress.batches": 1,
        "ingress.batch_hist[3]": 1,
        "tun_gro_writes": 2,
        "syscalls.recvmmsg": 1,
        "syscalls.write": 4,
    }


def test_vnet_ingress_drops_and_replies(make_rig):
    rig = vnet_rig(make_rig)
    a = flow([500] * 3, src=DST, dst=SRC)
    ttl1 = ipv4_udp(DST, SRC, b"last hop", ttl=1)
    rig.from_peer(a[0], b"junk", a[1], ttl1, a[2])
    assert rig.pump.udp_to_tun(100) == 5
    # the drop and the reply do not break the run: only forwarded packets are merged
    assert rig.tun_out() == [ref_merge([forwarded(p) for p in a])]
    [(reply, _)] = rig.peer_in(1)
    assert reply == icmp_error(LOCAL, ttl1, 11)
    s = rig.cx.stats()
    assert s["ingress"]["drops"]["too_short"] == 1 and s["ingress"]["drops"]["ttl_exceeded"] == 1
    assert s["tun_gro_writes"] == 1 and s["ingress"]["tx_packets"] == 3


def test_vnet_ingress_budget(make_rig):
    rig = vnet_rig(make_rig, batch=8)
    a = flow([1000] * 6, src=DST, dst=SRC)
    rig.from_peer(*a)
    assert rig.pump.udp_to_tun(4) == 4
    fa = [forwarded(p) for p in a]
    assert rig.tun_out() == [ref_merge(fa[:4])], "merged within what the budget took"
    assert rig.pump.udp_to_tun(100) == 2
    assert rig.tun_out() == [ref_merge(fa[4:])]
    assert rig.pump.udp_to_tun(100) == 0
    s = rig.cx.stats()
    assert s["tun_gro_writes"] == 2 and s["ingress"]["tx_packets"] == 6
    assert s["syscalls"]["recvmmsg"] == 3 and s["syscalls"]["write"] == 2
