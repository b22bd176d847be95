"""Composition root: the only place where the planes meet.  Turns a NodeConfig into a
running node (interface, UDP socket, TUN, routes, pump, forwarder on uvloop), runs it until
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
from dataclasses import dataclass
from typing import Any

from . import packet
from .config import NodeConfig
from .forwarder import Forwarder
from .iface import ExternalInterface, find_interface
from .subnetenv import format_subnet_env, write_subnet_env
from .tun import Tun, create_tun

log = logging.getLogger("udpbackend")

ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8): flannel's TUN MTU is the underlay's minus this
# Socket buffers: large enough to absorb a full batch from every reader wake-up in both
# directions without drops at multi-Gbit/s, small enough not to add queueing delay.
SOCKET_BUFFER = 4 << 20
STATS_INTERVAL = 1.0


class StartupError(RuntimeError):
    """The node could not start; str() is a one-line message for the user."""


@dataclass
class RunOptions:
    tun_name: str = "flannel0"
    iface: str | None = None
    public_ip: ipaddress.IPv4Address | None = None
    stats_file: str | None = None
    subnet_file: str | None = None
    batch: int = packet.MAX_BATCH
    offload: bool = True  # --offload auto: UDP GSO/GRO where the kernel has them


def open_udp_socket(address: ipaddress.IPv4Address, port: int) -> socket.socket:
    """Non-blocking UDP socket bound to address:port with large buffers."""
    s = socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        s.bind((str(address), port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"UDP port {port} on {address} is already in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot bind UDP {address}:{port}: address not local") from None
        raise StartupError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    return s


def make_pump(
    cfg: NodeConfig, mtu: int, tun_fd: int, sock: socket.socket, batch: int, offload: bool
) -> Any:
    """The data plane for cfg.mode, with a route per peer: C batched, C per-packet, or the
    pure-Python twin."""
    local_ip = int(cfg.tun_address)
    if cfg.mode == "python":
        cx: Any = packet.Context(local_ip, mtu, per_packet=True)
        routes: Any = packet.Routes()
        pump_cls: Any = packet.Pump
    else:
        from . import fastpath

        cx = fastpath.Context(local_ip, mtu, per_packet=cfg.mode == "per-packet")
        routes = fastpath.Routes()
        pump_cls = fastpath.Pump
    for p in cfg.peers:
        routes.set(int(p.subnet.network_address), p.subnet.prefixlen, int(p.public_ip), cfg.port)
    if cfg.mode == "batched":
        pump = pump_cls(cx, routes, tun_fd, sock, batch=batch, offload=offload)
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


class Node:
    """One running node of the static (etcd-less) mode."""

    def __init__(self, cfg: NodeConfig, opts: RunOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.ext: ExternalInterface | None = None
        self.sock: socket.socket | None = None
        self.tun: Tun | None = None
        self.pump: Any = None
        self.forwarder: Forwarder | None = None
        self.mtu = 0

    def setup(self) -> None:
        cfg, opts = self.cfg, self.opts
        self.ext = find_interface(opts.iface, opts.public_ip)
        self.mtu = self.ext.mtu - ENCAP_OVERHEAD
        if self.mtu < 68:
            raise StartupError(f"interface {self.ext.name} MTU {self.ext.mtu} is too small")
        self.sock = open_udp_socket(self.ext.address, cfg.port)
        self.tun = create_tun(opts.tun_name, cfg.tun_address, cfg.network, self.mtu)
        self.pump = make_pump(cfg, self.mtu, self.tun.fd, self.sock, opts.batch, opts.offload)
        if opts.subnet_file:
            write_subnet_env(
                opts.subnet_file, format_subnet_env(cfg.network, cfg.subnet, self.mtu, False)
            )

    def stats_doc(self) -> dict[str, Any]:
        return {
            "mode": self.cfg.mode,
            "routes": len(self.pump.routes),
            "tun": self.tun.name if self.tun else None,
            "mtu": self.mtu,
            "offloads": getattr(self.pump, "offloads", {}),
            "stats": self.pump.cx.stats(),
        }

    def teardown(self) -> None:
        if self.forwarder:
            self.forwarder.stop()
        if self.tun:
            self.tun.close()
        if self.sock:
            self.sock.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        failed: list[OSError] = []

        def on_error(e: OSError) -> None:
            failed.append(e)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        assert self.tun and self.sock and self.ext
        self.forwarder = Forwarder(
            loop, self.pump, self.tun.fd, self.sock.fileno(), on_error=on_error
        )
        self.forwarder.start()
        log.info(
            "ready: %s %s/32 mtu %d, udp %s:%d on %s, mode %s, %d routes",
            self.tun.name,
            self.cfg.tun_address,
            self.mtu,
            self.ext.address,
            self.cfg.port,
            self.ext.name,
            self.cfg.mode,
            len(self.pump.routes),
        )
        try:
            while not stop.is_set():
                if self.opts.stats_file:
                    write_stats(self.opts.stats_file, self.stats_doc())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STATS_INTERVAL)
        finally:
            self.forwarder.stop()
            if self.opts.stats_file:
                write_stats(self.opts.stats_file, self.stats_doc())
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopping: removing %s", self.tun.name)
        return 1 if failed else 0
