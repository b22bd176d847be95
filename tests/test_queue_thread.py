# QueueThread, fd-level (no root for most): a queue's own event loop on its own thread moves
# packets with the real C pump between a socketpair "TUN" and loopback UDP, takes route changes
# through call(), stops cleanly, and reports a refused scheduling policy instead of running.
from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
from packets import forwarded, ip, ipv4_udp

from udpbackend.dataplane.forwarder import QueueThread

SRC, DST = "198.18.5.5", "198.19.1.5"


class Rig:
    def __init__(self, fastpath: ModuleType) -> None:
        self.tun_end, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.peer.bind(("127.0.0.1", 0))
        cx = fastpath.Context(ip("198.18.0.1"), 1400)
        self.pump = fastpath.Pump(cx, fastpath.Routes(), self.tun.fileno(), self.sock, batch=8)
        self.errors: list[OSError] = []

    def queue(self, **kw: object) -> QueueThread:
        return QueueThread(
            "test-q0",
            self.pump,
            self.tun.fileno(),
            self.sock.fileno(),
            self.errors.append,
            **kw,  # type: ignore[arg-type]
        )

    def route(self) -> tuple[int, int, int, int]:
        return (ip("198.19.1.0"), 24, ip("127.0.0.1"), self.peer.getsockname()[1])

    def peer_recv(self, timeout: float = 2.0) -> bytes | None:
        if not select.select([self.peer], [], [], timeout)[0]:
            return None
        return self.peer.recv(65535)

    def close(self) -> None:
        for s in (self.tun_end, self.tun, self.sock, self.peer):
            s.close()


@pytest.fixture
def rig(c_impl: ModuleType) -> Iterator[Rig]:
    r = Rig(c_impl)
    try:
        yield r
    finally:
        r.close()


def test_forwards_on_its_own_thread_and_takes_routes_through_call(rig: Rig) -> None:
    q = rig.queue()
    q.start()
    try:
        assert q.thread is not None and q.thread is not threading.current_thread()
        pkt = ipv4_udp(SRC, DST)
        rig.tun_end.send(pkt)
        time.sleep(0.2)
        assert rig.pump.cx.stats()["egress"]["drops"]["no_route"] == 1, "no route yet"
        q.call(rig.pump.routes.set, *rig.route())
        deadline = time.monotonic() + 2
        while len(rig.pump.routes) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # applied asynchronously, on the queue's thread
        rig.tun_end.send(pkt)
        assert rig.peer_recv() == forwarded(pkt)
    finally:
        q.stop()
    assert q.thread is None and rig.errors == []


def test_call_before_start_runs_now(rig: Rig) -> None:
    q = rig.queue()
    q.call(rig.pump.routes.set, *rig.route())
    assert len(rig.pump.routes) == 1


def test_c_driver_refuses_changes_while_running(rig: Rig) -> None:
    rig.pump.routes.set(*rig.route())
    q = rig.queue(driver="c")
    q.start()
    try:
        with pytest.raises(RuntimeError, match="nothing may change"):
            q.call(rig.pump.routes.delete, ip("198.19.1.0"), 24)
        pkt = ipv4_udp(SRC, DST, b"through fp_run")
        rig.tun_end.send(pkt)
        assert rig.peer_recv() == forwarded(pkt)
    finally:
        q.stop()
    assert q.thread is None


def test_refused_scheduling_policy_is_raised_and_nothing_runs(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    for driver in ("python", "c"):
        q = rig.queue(rt_priority=5, driver=driver)
        with pytest.raises(PermissionError):
            q.start()
        assert q.thread is None
    assert not [t for t in threading.enumerate() if t.name == "test-q0"]


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_RR needs root (CAP_SYS_NICE)")
def test_rt_priority_puts_the_queue_thread_in_sched_rr(rig: Rig) -> None:
    q = rig.queue(rt_priority=3)
    q.start()
    try:
        assert q.thread is not None and q.thread.native_id is not None
        tid = q.thread.native_id
        assert os.sched_getscheduler(tid) == os.SCHED_RR
        assert os.sched_getparam(tid).sched_priority == 3
        assert os.sched_getscheduler(0) == os.SCHED_OTHER, "the caller's thread is untouched"
    finally:
        q.stop()
