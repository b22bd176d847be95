# Multi-queue ingress steering, fd-level (no root): real SO_REUSEPORT sockets on 127.0.0.1
# with fp_reuseport_steer's classic-BPF program attached, held to packet.steer_index (the twin).
from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import ipv4, ipv4_udp, mutate

from udpbackend.dataplane import packet

TCP = 6


def tcp_hdr(sport: int, dport: int) -> bytes:
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(16)


class Group:
    """n reuseport sockets bound to one port, steered, and a sender."""

    def __init__(self, fastpath: ModuleType, n: int) -> None:
        self.n = n
        self.socks: list[socket.socket] = []
        port = 0
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.setblocking(False)
            self.socks.append(s)
        self.addr = ("127.0.0.1", port)
        fastpath.reuseport_steer(self.socks[0], n)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def where(self, payload: bytes) -> int:
        """Send one datagram; the index of the socket it arrived on."""
        self.tx.sendto(payload, self.addr)
        import select

        ready, _, _ = select.select(self.socks, [], [], 2.0)
        assert len(ready) == 1, "exactly one socket gets each datagram"
        data = ready[0].recv(65535)
        assert data == payload
        return self.socks.index(ready[0])

    def close(self) -> None:
        for s in (*self.socks, self.tx):
            s.close()


@pytest.fixture
def group4(c_impl: ModuleType) -> Iterator[Group]:
    g = Group(c_impl, 4)
    try:
        yield g
    finally:
        g.close()


def test_kernel_picks_what_the_twin_predicts(group4: Group) -> None:
    rng = random.Random(7)
    cases = []
    for _ in range(40):
        src, dst = f"198.19.{rng.randrange(256)}.{rng.randrange(256)}", "198.19.2.9"
        sp, dp = rng.randrange(1, 65536), rng.randrange(1, 65536)
        cases.append(ipv4(src, dst, TCP, tcp_hdr(sp, dp)))
        cases.append(ipv4_udp(src, dst, b"x" * rng.randrange(40), sport=sp, dport=dp))
        cases.append(ipv4(src, dst, 1, b"\x08\x00" + bytes(6)))  # ICMP: addresses only
    base = ipv4_udp("198.19.1.1", "198.19.2.2", b"payload!", sport=1000, dport=2000)
    cases += [
        mutate(base, flags_frag=0x2000),  # first fragment (MF): addresses only
        mutate(base, flags_frag=0x0010),  # later fragment
        ipv4(base[12:16], base[16:20], TCP, tcp_hdr(5, 6), options=b"\x01" * 8),  # IHL 7
        ipv4(base[12:16], base[16:20], TCP, b"\x00"),  # port word cut short: socket 0
        base[:19],  # shorter than an IPv4 header: socket 0
        b"",
    ]
    for pkt in cases:
        assert group4.where(pkt) == packet.steer_index(pkt, 4), pkt.hex()


def test_one_flow_one_socket_and_flows_spread(group4: Group) -> None:
    seen = {}
    for flow in range(32):
        pkts = [
            ipv4_udp("198.19.1.7", "198.19.2.7", bytes([i]) * (10 + i), sport=30000 + flow)
            for i in range(5)
        ]
        where = {group4.where(p) for p in pkts}
        assert len(where) == 1, f"flow {flow} was spread over {where}"
        seen[flow] = where.pop()
    assert len(set(seen.values())) == 4, "32 flows should reach all 4 queues"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_go_where_the_twin_says(c_impl: ModuleType, payload: bytes) -> None:
    g = Group(c_impl, 3)
    try:
        assert g.where(payload) == packet.steer_index(payload, 3)
    finally:
        g.close()


@pytest.mark.parametrize("n", [0, packet.STEER_MAX_SOCKS + 1])
def test_socket_count_out_of_range(c_impl: ModuleType, n: int) -> None:
    with pytest.raises(ValueError):
        packet.steer_index(b"", n)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError):
            c_impl.reuseport_steer(s, n)
    finally:
        s.close()


def test_a_socket_without_reuseport_group_is_refused(c_impl: ModuleType) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            c_impl.reuseport_steer(s, 2)
    finally:
        s.close()
