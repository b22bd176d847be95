"""Composition root: the only place where the planes meet.  Turns a NodeConfig into a
running node (interface, TUN, per queue a UDP socket, pump and loop thread), runs it until
SIGTERM/SIGINT and takes it down again.  Per-packet work never happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

from . import packet
from .config import NodeConfig
from .forwarder import QueueThread
from .health import HealthServer, Route
from .iface import ExternalInterface, IfaceError, find_interface
from .subnetenv import format_subnet_env, write_subnet_env
from .tun import Tun, TunError, create_tun

log = logging.getLogger("udpbackend")

ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8): flannel's TUN MTU is the underlay's minus this
# Socket buffers, measured (2-node netns, batched with offloads, iperf3 4 s, 2 runs each):
# 256 KiB 5.2-6.3 Gbit/s with ~10^5 TCP retransmits, 1 MiB 7.2-7.5 with 1.7k-11k, 4 MiB 7.3 with
# none, 16 MiB 6.9-7.3 with none: 4 MiB is the smallest without drops.
SOCKET_BUFFER = 4 << 20
STATS_INTERVAL = 1.0


class StartupError(RuntimeError):
    """The node could not start; str() is a one-line message for the user."""


@dataclass
class RunOptions:
    tun_name: str = "flannel0"
    ifaces: tuple[str, ...] = ()
    iface_regexes: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: ipaddress.IPv4Address | None = None
    stats_file: str | None = None
    subnet_file: str | None = None
    batch: int = packet.MAX_BATCH
    offload: bool = True  # --offload auto: UDP GSO/GRO where the kernel has them
    mode: str = "batched"
    driver: str = "python"  # static mode: "c" runs the pumps from fp_run's C loop instead
    queues: int = 1  # TUN queues / UDP sockets / threads (IFF_MULTI_QUEUE + SO_REUSEPORT)
    rt_priority: int = 0  # > 0: the queue threads run SCHED_RR at this priority
    ip_masq: bool = False
    forward_rules: bool = True
    iptables_resync: int = 5
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    etcd_endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    etcd_prefix: str = "/coreos.com/network"
    etcd_cafile: str = ""
    etcd_certfile: str = ""
    etcd_keyfile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    renew_margin_minutes: int = 60


def open_udp_socket(
    address: ipaddress.IPv4Address, port: int, reuseport: bool = False
) -> socket.socket:
    """Non-blocking UDP socket bound to address:port with large buffers; ``reuseport``: a
    member of an SO_REUSEPORT group (one per queue)."""
    s = socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((str(address), port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"UDP port {port} on {address} is already in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot bind UDP {address}:{port}: address not local") from None
        raise StartupError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    return s


def open_udp_sockets(address: ipaddress.IPv4Address, port: int, n: int) -> list[socket.socket]:
    """One socket per queue.  Several form an SO_REUSEPORT group (bound in queue order) with
    fp_reuseport_steer attached, so each inner flow reaches one queue; if the kernel refuses
    the program, its own 4-tuple hash picks (every datagram from one peer on one queue)."""
    if n == 1:
        return [open_udp_socket(address, port)]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(open_udp_socket(address, port, reuseport=True))
        from . import fastpath

        try:
            fastpath.reuseport_steer(socks[0], n)
        except OSError as e:
            log.info("ingress flow steering refused (%s): the kernel spreads by peer", e.strerror)
    except BaseException:
        for sk in socks:
            sk.close()
        raise
    return socks


def make_pump(
    mode: str,
    local_ip: int,
    mtu: int,
    tun_fd: int,
    sock: socket.socket,
    batch: int,
    offload: bool,
    vnet: bool = False,
) -> Any:
    """The data plane for ``mode``, with an empty route table: C batched, C per-packet, or
    the pure-Python twin."""
    if mode == "python":
        cx: Any = packet.Context(local_ip, mtu, per_packet=True)
        routes: Any = packet.Routes()
        pump_cls: Any = packet.Pump
    else:
        from . import fastpath

        cx = fastpath.Context(local_ip, mtu, per_packet=mode == "per-packet")
        routes = fastpath.Routes()
        pump_cls = fastpath.Pump
    if mode == "batched":
        pump = pump_cls(cx, routes, tun_fd, sock, batch=batch, offload=offload, vnet=vnet)
        on = [name for name, ok in pump.offloads.items() if ok]
        off = [name for name, ok in pump.offloads.items() if not ok]
        if offload and off:
            log.info("offloads refused by the kernel, left off: %s", ", ".join(off))
        log.debug("offloads on: %s", ", ".join(on) or "none")
        return pump
    return pump_cls(cx, routes, tun_fd, sock, batch=batch)


def write_stats(path: str, doc: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".stats.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def sum_stats(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several queues added up (same shape as one queue's stats())."""

    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict):
            return {k: add(a[k], b[k]) for k in a}
        if isinstance(a, list):
            return [x + y for x, y in zip(a, b, strict=True)]
        return a + b

    total = docs[0]
    for d in docs[1:]:
        total = add(total, d)
    return total


class DataPlane:
    """The data plane of one node: external interface, TUN and, per queue, a UDP socket, a
    pump and a QueueThread running it.

    The route table is ``self.routes`` (subnet -> peer public IP), written on the control
    plane's thread through set_route/delete_route only; each queue keeps its own copy in its
    pump, changed on its own thread (QueueThread.call) - so C never reads a table being
    written."""

    def __init__(
        self,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        port: int,
        opts: RunOptions,
    ) -> None:
        self.network = network
        self.subnet = subnet
        self.port = port
        self.opts = opts
        self.ext: ExternalInterface | None = None
        self.socks: list[socket.socket] = []
        self.tun: Tun | None = None
        self.queues: list[QueueThread] = []
        self.routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self.mtu = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_error: Any = None

    @staticmethod
    def select_interface(opts: RunOptions) -> tuple[ExternalInterface, int]:
        """The external interface and the TUN MTU it allows."""
        ext = find_interface(opts.ifaces, opts.iface_regexes, opts.iface_can_reach, opts.public_ip)
        mtu = ext.mtu - ENCAP_OVERHEAD
        if mtu < 68:
            raise StartupError(f"interface {ext.name} MTU {ext.mtu} is too small")
        return ext, mtu

    def setup(self) -> None:
        opts = self.opts
        self.ext, self.mtu = self.select_interface(opts)
        self.socks = open_udp_sockets(self.ext.address, self.port, opts.queues)
        tun_address = self.subnet.network_address
        self.tun = create_tun(
            opts.tun_name,
            tun_address,
            self.network,
            self.mtu,
            offload=opts.offload and opts.mode == "batched",
            queues=opts.queues,
        )
        for i, (fd, sock) in enumerate(zip(self.tun.fds, self.socks, strict=True)):
            pump = make_pump(
                opts.mode,
                int(tun_address),
                self.mtu,
                fd,
                sock,
                opts.batch,
                opts.offload,
                vnet=self.tun.vnet,
            )
            self.queues.append(
                QueueThread(
                    f"udpbackend-q{i}",
                    pump,
                    fd,
                    sock.fileno(),
                    self._on_queue_error,
                    driver=opts.driver,
                    rt_priority=opts.rt_priority,
                )
            )
        if self.tun.vnet:
            log.debug("TUN offloads on: %s", ", ".join(self.tun.offloads))

    async def setup_async(self) -> None:
        """setup() off the loop thread: pyroute2's synchronous API runs its own loop."""
        try:
            await asyncio.to_thread(self.setup)
        except (IfaceError, TunError) as e:
            raise StartupError(str(e)) from None

    def set_route(self, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address) -> None:
        self.routes[subnet] = public_ip
        args = (int(subnet.network_address), subnet.prefixlen, int(public_ip), self.port)
        for q in self.queues:
            q.call(q.pump.routes.set, *args)

    def delete_route(self, subnet: ipaddress.IPv4Network) -> bool:
        if self.routes.pop(subnet, None) is None:
            return False
        for q in self.queues:
            q.call(q.pump.routes.delete, int(subnet.network_address), subnet.prefixlen)
        return True

    def _on_queue_error(self, e: OSError) -> None:
        """From a queue's thread: hand the failure to the control plane's loop."""
        if self._loop is not None and self._on_error is not None:
            self._loop.call_soon_threadsafe(self._on_error, e)

    def start(self, loop: asyncio.AbstractEventLoop, on_error: Any) -> None:
        """Start every queue's thread; ``on_error`` is called on ``loop`` when one fails."""
        self._loop, self._on_error = loop, on_error
        for q in self.queues:
            try:
                q.start()
            except OSError as e:
                raise StartupError(
                    f"cannot run the data plane at --rt-priority {self.opts.rt_priority} "
                    f"(SCHED_RR): {e.strerror} (needs CAP_SYS_NICE or an RLIMIT_RTPRIO)"
                ) from None

    def describe(self) -> str:
        assert self.tun and self.ext
        queues = f", {len(self.queues)} queues" if len(self.queues) > 1 else ""
        return (
            f"{self.tun.name} {self.subnet.network_address}/32 mtu {self.mtu}, "
            f"udp {self.ext.address}:{self.port} on {self.ext.name}, mode {self.opts.mode}"
            f"{queues}"
        )

    def stats_doc(self) -> dict[str, Any]:
        per_queue = [q.pump.cx.stats() for q in self.queues]
        return {
            "mode": self.opts.mode,
            "routes": len(self.routes),
            "tun": self.tun.name if self.tun else None,
            "mtu": self.mtu,
            "queues": len(self.queues),
            "offloads": getattr(self.queues[0].pump, "offloads", {}) if self.queues else {},
            "stats": sum_stats(per_queue) if per_queue else {},
            "per_queue": [
                {"egress": d["egress"]["tx_packets"], "ingress": d["ingress"]["tx_packets"]}
                for d in per_queue
            ],
        }

    def write_stats(self) -> None:
        if self.opts.stats_file and self.queues:
            write_stats(self.opts.stats_file, self.stats_doc())

    def teardown(self) -> None:
        """Stop forwarding; closing the fds removes the TUN device and its route."""
        for q in self.queues:
            q.stop()
        self.write_stats()
        if self.tun:
            self.tun.close()
        for sk in self.socks:
            sk.close()


async def _until_stopped(plane: DataPlane, stop: asyncio.Event) -> None:
    while not stop.is_set():
        plane.write_stats()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATS_INTERVAL)


async def serve_health(opts: RunOptions, routes: dict[str, Route]) -> HealthServer:
    """The --healthz-ip/--healthz-port server with these routes; a port that cannot be bound
    is a StartupError."""
    health = HealthServer(opts.healthz_ip, opts.healthz_port, routes)
    try:
        await health.start()
    except OSError as e:
        raise StartupError(
            f"cannot serve health on {opts.healthz_ip}:{opts.healthz_port}: {e.strerror}"
        ) from None
    return health


def static_health_routes(plane: DataPlane, cfg: NodeConfig) -> dict[str, Route]:
    """/healthz, /readyz and /metrics for a static node (ready as soon as it forwards)."""
    from .metrics import CONTENT_TYPE, render

    def metrics() -> tuple[int, str, bytes]:
        control = {"subnet": str(cfg.subnet), "ready": True}
        return 200, CONTENT_TYPE, render(plane.stats_doc(), control)

    return {
        "/healthz": lambda: (200, "text/plain", b"flanneld is running"),
        "/readyz": lambda: (200, "text/plain", b"flanneld is ready"),
        "/metrics": metrics,
    }


async def run_static(cfg: NodeConfig, opts: RunOptions) -> int:
    """A node from static flags: routes to the given peers, no etcd."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failed: list[OSError] = []

    def on_error(e: OSError) -> None:
        failed.append(e)
        stop.set()

    plane = DataPlane(cfg.network, cfg.subnet, cfg.port, opts)
    health: HealthServer | None = None
    try:
        await plane.setup_async()
        for p in cfg.peers:
            plane.set_route(p.subnet, p.public_ip)
        if opts.subnet_file:
            write_subnet_env(
                opts.subnet_file, format_subnet_env(cfg.network, cfg.subnet, plane.mtu, False)
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if opts.healthz_port:
            health = await serve_health(opts, static_health_routes(plane, cfg))
        plane.start(loop, on_error)
        driver = ", C driver" if opts.driver == "c" else ""
        log.info("ready: %s, %d routes%s", plane.describe(), len(plane.routes), driver)
        await _until_stopped(plane, stop)
        assert plane.tun
        log.info("stopping: removing %s", plane.tun.name)
    finally:
        plane.teardown()
        if health:
            await health.close()
    return 1 if failed else 0


def run_node(static: NodeConfig | None, opts: RunOptions) -> int:
    """Run a node until SIGTERM/SIGINT: static when ``static`` is given, else from etcd."""
    import uvloop

    if static is not None:
        return uvloop.run(run_static(static, opts))
    from .node import run_etcd_node

    return uvloop.run(run_etcd_node(opts))
