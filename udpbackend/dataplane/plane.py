"""The data plane's public surface: DataPlane (the TUN, per queue a UDP socket, a pump and a
loop thread) with the route table the control plane writes through set_route/delete_route,
and the pump factory of the three modes.  Must not: know where routes come from, or choose
the interface (the node hands it the bind address and MTU).  Per-packet work is the pumps'.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import tempfile
from typing import Any

from ..errors import StartupError
from ..options import RunOptions
from . import packet
from .forwarder import QueueThread
from .sockets import open_udp_sockets
from .tun import Tun, TunError, create_tun

log = logging.getLogger("udpbackend")

ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8): flannel's TUN MTU is the underlay's minus this


def tun_mtu(ext: Any) -> int:
    """The TUN MTU an external interface (``.name``, ``.mtu``) allows: its MTU minus the
    encapsulation; StartupError when that leaves less than IPv4's minimum of 68."""
    mtu = int(ext.mtu) - ENCAP_OVERHEAD
    if mtu < 68:
        raise StartupError(f"interface {ext.name} MTU {ext.mtu} is too small")
    return mtu


def make_pump(
    mode: str,
    local_ip: int,
    mtu: int,
    tun_fd: int,
    sock: socket.socket,
    batch: int,
    offload: bool,
    vnet: bool = False,
    subnet: tuple[int, int] | None = None,
    peer_check: str = "strict",
) -> Any:
    """The data plane for ``mode``, with an empty route table: C batched, C per-packet, or
    the pure-Python twin.  ``subnet`` (net, prefix_len) is this node's, ``peer_check`` the
    ingress source check (packet.PEER_CHECKS)."""
    kw: dict[str, Any] = {"subnet": subnet, "peer_check": peer_check}
    if mode == "python":
        cx: Any = packet.Context(local_ip, mtu, per_packet=True, **kw)
        routes: Any = packet.Routes()
        pump_cls: Any = packet.Pump
    else:
        from . import fastpath

        cx = fastpath.Context(local_ip, mtu, per_packet=mode == "per-packet", **kw)
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
    written.  The same calls keep each copy's peer-address table (public IP -> its subnets),
    which the ingress source check (--peer-check) reads: a lease whose PublicIP changes is
    set_route with the new address, and from then on only the new one is accepted."""

    def __init__(
        self,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        port: int,
        bind_address: ipaddress.IPv4Address,
        iface_name: str,
        mtu: int,
        opts: RunOptions,
    ) -> None:
        self.network = network
        self.subnet = subnet
        self.port = port
        self.bind_address = bind_address
        self.iface_name = iface_name
        self.mtu = mtu
        self.opts = opts
        self.socks: list[socket.socket] = []
        self.tun: Tun | None = None
        self.queues: list[QueueThread] = []
        self.routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_error: Any = None

    def setup(self) -> None:
        opts = self.opts
        self.socks = open_udp_sockets(self.bind_address, self.port, opts.queues)
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
                packet.MAX_BATCH,
                opts.offload,
                vnet=self.tun.vnet,
                subnet=(int(self.subnet.network_address), self.subnet.prefixlen),
                peer_check=opts.peer_check,
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
                    linger_ms=opts.linger_ms,
                )
            )
        if self.tun.vnet:
            log.debug("TUN offloads on: %s", ", ".join(self.tun.offloads))

    async def setup_async(self) -> None:
        """setup() off the loop thread: pyroute2's synchronous API runs its own loop."""
        try:
            await asyncio.to_thread(self.setup)
        except TunError as e:
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

    @property
    def tun_name(self) -> str:
        """The device's name ("" before setup created it)."""
        return self.tun.name if self.tun else ""

    def describe(self) -> str:
        assert self.tun
        queues = f", {len(self.queues)} queues" if len(self.queues) > 1 else ""
        return (
            f"{self.tun.name} {self.subnet.network_address}/32 mtu {self.mtu}, "
            f"udp {self.bind_address}:{self.port} on {self.iface_name}, mode {self.opts.mode}"
            f"{queues}, peer check {self.opts.peer_check}"
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
