"""fp_serve (a uvloop wake-up handed to C) and the forwarder around it, on real fds: an AF_UNIX
datagram socketpair stands in for the TUN, loopback UDP for the underlay.  Both directions in
one call, a reply that lands meanwhile sent in the same call, the linger bounded, the control
eventfd bringing it back at once, and a QueueThread applying a route change mid-linger.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from types import ModuleType

from packets import ip, ipv4_udp

LOCAL = ip("198.18.0.1")
LOCAL_SUBNET = (ip("198.18.0.0"), 16)
PEER_NET = "198.19.0.0"
MTU = 1400


class ServeRig:
    """A C pump between a fake TUN and a loopback UDP socket; the peer owns 198.19.0.0/16."""

    def __init__(self, fastpath: ModuleType, per_packet: bool = False) -> None:
        self.tun_end, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.peer.bind(("127.0.0.1", 0))
        cx = fastpath.Context(LOCAL, MTU, per_packet=per_packet, subnet=LOCAL_SUBNET)
        self.routes = fastpath.Routes()
        self.routes.set(ip(PEER_NET), 16, ip("127.0.0.1"), self.peer.getsockname()[1])
        self.pump = fastpath.Pump(cx, self.routes, self.tun_end.fileno(), self.sock, batch=8)
        self.ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep = select.epoll()
        for fd in (self.tun_end.fileno(), self.sock.fileno(), self.ctl):
            self.ep.register(fd, select.EPOLLIN)

    def serve(self, linger_ms: int, budget: int = 64) -> tuple[int, float]:
        t0 = time.monotonic()
        n = self.pump.serve(self.ep.fileno(), self.ctl, budget, linger_ms)
        return n, time.monotonic() - t0

    def close(self) -> None:
        self.ep.close()
        os.close(self.ctl)
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.close()


def _request() -> bytes:
    return ipv4_udp(src="198.19.1.5", dst="198.18.5.5", payload=b"ping")  # peer -> our pod


def _reply() -> bytes:
    return ipv4_udp(src="198.18.5.5", dst="198.19.1.5", payload=b"pong")  # our pod -> peer


def test_both_directions_in_one_call_and_the_linger_is_bounded(c_impl: ModuleType) -> None:
    rig = ServeRig(c_impl)
    try:
        rig.peer.sendto(_request(), rig.sock.getsockname())
        rig.tun.send(_reply())
        time.sleep(0.01)
        n, took = rig.serve(linger_ms=50)
        assert n == 2, n
        assert rig.tun.recv(2048)[20:] != b""  # the request reached the "TUN"
        assert rig.peer.recv(2048)  # the reply reached the peer
        assert 0.045 <= took < 0.5, took  # returned once 50 ms passed without a packet
        n, took = rig.serve(linger_ms=0)
        assert n == 0 and took < 0.05
    finally:
        rig.close()


def test_a_reply_landing_meanwhile_goes_out_in_the_same_call(c_impl: ModuleType) -> None:
    rig = ServeRig(c_impl)
    stop = threading.Event()

    def host_stack() -> None:  # answers each packet written into the "TUN", like the kernel
        while not stop.is_set():
            if select.select([rig.tun], [], [], 0.01)[0]:
                rig.tun.recv(2048)
                rig.tun.send(_reply())

    t = threading.Thread(target=host_stack)
    t.start()
    try:
        for _ in range(5):
            rig.peer.sendto(_request(), rig.sock.getsockname())
        n, _ = rig.serve(linger_ms=200)
        got = 0
        while select.select([rig.peer], [], [], 0.2)[0]:
            rig.peer.recv(2048)
            got += 1
        assert n == 10 and got == 5, (n, got)
    finally:
        stop.set()
        t.join()
        rig.close()


def test_the_control_eventfd_returns_at_once(c_impl: ModuleType) -> None:
    rig = ServeRig(c_impl, per_packet=True)
    try:
        threading.Timer(0.05, os.eventfd_write, (rig.ctl, 1)).start()
        n, took = rig.serve(linger_ms=10_000)
        assert n == 0 and took < 2.0, took
        n, took = rig.serve(linger_ms=10_000)  # still readable: the caller reads it, not C
        assert took < 0.05
    finally:
        rig.close()


def test_queue_thread_applies_a_route_change_while_c_lingers(c_impl: ModuleType) -> None:
    from udpbackend.dataplane.forwarder import QueueThread

    rig = ServeRig(c_impl)
    errors: list[OSError] = []
    q = QueueThread(
        "q-test", rig.pump, rig.tun_end.fileno(), rig.sock.fileno(), errors.append, linger_ms=5000
    )
    q.start()
    try:
        rig.peer.sendto(_request(), rig.sock.getsockname())
        assert select.select([rig.tun], [], [], 2.0)[0]  # C is serving, lingering 5 s now
        done = threading.Event()
        t0 = time.monotonic()
        q.call(lambda: (rig.routes.set(ip("198.20.0.0"), 16, ip("127.0.0.1"), 9), done.set()))
        assert done.wait(2.0), "the route change waited for the linger"
        assert time.monotonic() - t0 < 1.0
        assert len(rig.routes) == 2
    finally:
        t0 = time.monotonic()
        q.stop()
        assert time.monotonic() - t0 < 2.0  # stop does not wait for the linger either
        rig.close()
    assert errors == []
