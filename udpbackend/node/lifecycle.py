"""The one node lifecycle, whatever the subnet manager: network config, interface, lease, data
plane, rules, subnet.env, health and readiness, the lease watch, renewal, signals, shutdown.
It is fed its parts (a SubnetManager, a data-plane factory, the host's interface finder and
rule installer), so it is tested with fakes.  Must not: name a datastore or touch a packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..control.lease import Lease, LeaseEvent
from ..control.manager import ConfigPending, SubnetManager
from ..control.network import NetworkConfig
from ..control.registry import RegistryUnavailable
from ..errors import ConfigError, StartupError
from ..host.firewall import Firewall, FirewallError
from ..host.iface import ExternalInterface, IfaceError
from ..host.subnetenv import format_subnet_env, parse_subnet_env, write_subnet_env
from ..options import RunOptions
from .health import HealthServer, Route
from .metrics import CONTENT_TYPE, render
from .routes import apply_lease_events

log = logging.getLogger("udpbackend")

CONFIG_RETRY = 1.0  # flanneld re-reads a missing or invalid config every second
RENEW_RETRY = 60.0  # and retries a failed renewal after a minute
STATS_INTERVAL = 1.0  # --stats-file is rewritten this often


class Plane(Protocol):
    """What the lifecycle needs of a data plane (dataplane.plane.DataPlane)."""

    mtu: int
    routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address]

    @property
    def tun_name(self) -> str: ...  # the name the kernel gave (flannel%d picks one)

    async def setup_async(self) -> None: ...
    def set_route(
        self, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address
    ) -> None: ...
    def delete_route(self, subnet: ipaddress.IPv4Network) -> bool: ...
    def start(
        self, loop: asyncio.AbstractEventLoop, on_error: Callable[[OSError], None]
    ) -> None: ...
    def describe(self) -> str: ...
    def stats_doc(self) -> dict[str, Any]: ...
    def write_stats(self) -> None: ...
    def teardown(self) -> None: ...


# (network, this node's subnet, UDP port, external interface, TUN MTU) -> a data plane
PlaneFactory = Callable[
    [ipaddress.IPv4Network, ipaddress.IPv4Network, int, ExternalInterface, int], Plane
]


@dataclass
class Parts:
    """Everything the lifecycle is fed: the seams its unit tests replace."""

    manager: SubnetManager
    make_plane: PlaneFactory
    # (the public IP to look for, or None) -> the external interface; blocking: run in a thread
    find_interface: Callable[[ipaddress.IPv4Address | None], ExternalInterface]
    tun_mtu: Callable[[ExternalInterface], int]  # raises StartupError when too small
    # (config, this node's subnet) -> the rules to keep; only with --ip-masq or FORWARD rules
    make_firewall: Callable[[NetworkConfig, ipaddress.IPv4Network], Firewall]
    notify: Callable[[str], None] = lambda state: None  # sd_notify(3) (node.notify)


@dataclass(frozen=True)
class Previous:
    """What the subnet.env a previous run left says (each part None when absent or bad)."""

    network: ipaddress.IPv4Network | None = None
    subnet: ipaddress.IPv4Network | None = None


def previous_run(path: str | None) -> Previous:
    """FLANNEL_NETWORK and FLANNEL_SUBNET (masked to its network) of an old subnet.env."""
    if not path:
        return Previous()
    try:
        with open(path) as f:
            env = parse_subnet_env(f.read())
    except OSError:
        return Previous()

    def net(key: str) -> ipaddress.IPv4Network | None:
        value = env.get(key, "")
        try:
            return ipaddress.IPv4Network(value, strict=False) if "," not in value else None
        except ValueError:
            return None

    return Previous(net("FLANNEL_NETWORK"), net("FLANNEL_SUBNET"))


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


class Node:
    """One node from start to exit: run() returns the exit code."""

    def __init__(self, opts: RunOptions, parts: Parts) -> None:
        self.opts = opts
        self.parts = parts
        self.manager = parts.manager
        self.manager.on_state = self._on_datastore_state
        self.stop = asyncio.Event()
        self.ready = False
        self.plane: Plane | None = None
        self.lease: Lease | None = None
        self.firewall: Firewall | None = None
        self.exit_code = 0
        self._connected = True
        self._synced = asyncio.Event()  # the initial lease snapshot is in the route table
        self.watcher: asyncio.Task[None] | None = None  # the lease watch, from start() on

    # -- health ---------------------------------------------------------------------------
    def health_routes(self) -> dict[str, Route]:
        return {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}

    def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"flanneld is running"

    def _readyz(self) -> tuple[int, str, bytes]:
        if self.ready:
            return 200, "text/plain", b"flanneld is ready"
        return 503, "text/plain", b"flanneld is not ready yet"

    def _metrics(self) -> tuple[int, str, bytes]:
        lease = self.lease
        control: dict[str, Any] = {
            "lease_expiry": lease.expiration if lease else None,
            "ready": self.ready,
            "subnet": str(lease.subnet) if lease else None,
            "public_ip": str(lease.attrs.public_ip) if lease else None,
        }
        if self.manager.kind == "etcd":
            control["etcd_connected"] = self._connected
        return 200, CONTENT_TYPE, render(self.plane.stats_doc() if self.plane else {}, control)

    def _on_datastore_state(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            log.info(
                "%s %s",
                self.manager.kind,
                "back: watch resumed" if connected else "lost: forwarding on known routes",
            )

    # -- start-up ---------------------------------------------------------------------------
    async def _until(self, what: Callable[[], Awaitable[Any]], retry: float, label: str) -> Any:
        """Retry `what` every `retry` s, logging each distinct problem once, until it works or
        the node is stopped (then None)."""
        last = ""
        while not self.stop.is_set():
            try:
                return await what()
            except (ConfigError, RegistryUnavailable) as e:
                msg = f"{label}: {e}"
                if msg != last:
                    log.warning("%s (retrying every %gs)", msg, retry)
                    last = msg
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), retry)
        return None

    async def _interface(
        self, public_ip: ipaddress.IPv4Address | None
    ) -> tuple[ExternalInterface, int]:
        try:
            ext = await asyncio.to_thread(self.parts.find_interface, public_ip)
        except IfaceError as e:
            raise StartupError(str(e)) from None
        return ext, self.parts.tun_mtu(ext)

    async def _network_config(self) -> NetworkConfig:
        """Only a config that is not there yet (or a datastore that is down) is waited for,
        as flanneld waits; a config that is there and unusable ends the node (exit 1)."""
        try:
            return await self.manager.get_network_config()
        except ConfigPending:
            raise
        except ConfigError as e:
            raise StartupError(f"network config: {e}") from None

    async def start(self) -> bool:
        """Everything up to ready; False when stopped before that."""
        opts, manager = self.opts, self.manager
        cfg: NetworkConfig | None = await self._until(
            self._network_config, CONFIG_RETRY, "couldn't fetch network config"
        )
        if cfg is None:
            return False
        stored = await self._until(
            manager.stored_public_ip, CONFIG_RETRY, "couldn't read this node's stored public IP"
        )
        if self.stop.is_set():
            return False
        wanted = stored or opts.public_ip  # flannel: the node-public-ip annotation wins
        ext, mtu = await self._interface(wanted)
        public_ip = wanted or ext.address
        prev = previous_run(opts.subnet_file)

        async def acquire() -> Lease:
            return await manager.acquire_lease(cfg, public_ip, prev.subnet)

        lease: Lease | None = await self._until(acquire, CONFIG_RETRY, "failed to acquire lease")
        if lease is None:
            return False
        self.lease = lease
        if manager.kind != "static":
            expiry = "no TTL (reservation)" if lease.expiration is None else "24h"
            log.info("lease acquired: %s for %s, %s", lease.subnet, public_ip, expiry)

        self.plane = self.parts.make_plane(cfg.network, lease.subnet, cfg.backend_port, ext, mtu)
        await self.plane.setup_async()
        # Forwarding starts with the known peers routed (the C driver takes no later change).
        self.watcher = asyncio.create_task(self._watch())
        if not await self._initial_sync():
            return False
        self.plane.start(asyncio.get_running_loop(), self._on_dataplane_error)
        log.info("data plane up: %s", self.plane.describe())

        await self._install_rules(cfg, lease)
        if opts.subnet_file:
            v6 = cfg.enable_ipv6 and lease.ipv6_subnet is not None
            try:
                write_subnet_env(
                    opts.subnet_file,
                    format_subnet_env(
                        cfg.network,
                        lease.subnet,
                        self.plane.mtu,
                        opts.ip_masq,
                        cfg.ipv6_network if v6 else None,
                        lease.ipv6_subnet if v6 else None,
                    ),
                )
            except OSError as e:
                log.warning("failed to write %s: %s (not ready)", opts.subnet_file, e.strerror)
                return True
        self.ready = True
        written = f", subnet.env written to {opts.subnet_file}" if opts.subnet_file else ""
        driver = ", C driver" if opts.driver == "c" else ""
        log.info("ready: %d routes%s%s", len(self.plane.routes), driver, written)
        self.parts.notify("READY=1\nSTATUS=forwarding for " + str(lease.subnet))
        try:
            await manager.complete_lease(lease)
        except (ConfigError, RegistryUnavailable) as e:
            log.warning("could not complete the lease: %s", e)
        return True

    async def _install_rules(self, cfg: NetworkConfig, lease: Lease) -> None:
        """flannel's masquerade and FORWARD rules for this subnet, in the mode the config
        asks for.  Installing rewrites the rule chains in one transaction, which replaces a
        previous run's rules for another subnet without a moment of no masquerade."""
        opts = self.opts
        if not (opts.ip_masq or opts.forward_rules):
            return
        try:
            # building one runs the tools (backend detection, probes): off the loop too
            self.firewall = await asyncio.to_thread(self.parts.make_firewall, cfg, lease.subnet)
            await asyncio.to_thread(self.firewall.ensure)
        except FirewallError as e:
            raise StartupError(str(e)) from None

    async def _initial_sync(self) -> bool:
        """Wait until the first lease snapshot is routed (False if stopped first)."""
        assert self.watcher
        synced = asyncio.create_task(self._synced.wait())
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([synced, stopped, self.watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()
            stopped.cancel()
        if self.watcher.done() and self.watcher.exception():
            raise self.watcher.exception()  # type: ignore[misc]
        return self._synced.is_set()

    def _on_dataplane_error(self, e: OSError) -> None:
        log.error("data plane failed: %s", e.strerror or e)
        self.exit_code = 1
        self.stop.set()

    # -- running ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        assert self.plane and self.lease
        async for events in self.manager.watch_leases(self.lease.subnet, on_own=self._on_own):
            apply_lease_events(self.plane, events)
            self._synced.set()

    def _on_own(self, ev: LeaseEvent) -> None:
        # flanneld: our key deleted means an operator revoked the lease; stop (exit 0)
        if not ev.added:
            log.info("Lease has been revoked. Shutting down daemon.")
            self.stop.set()

    async def renew(self) -> None:
        assert self.lease
        while not self.stop.is_set():
            at = self.manager.renew_at(self.lease)
            if at is None:  # a reservation or a static subnet: nothing to renew, ever
                await self.stop.wait()
                return
            await asyncio.sleep(max(0.0, at - time.time()))
            try:
                self.lease = await self.manager.renew_lease(self.lease)
                log.info("lease renewed: %s", self.lease.subnet)
            except RegistryUnavailable as e:
                log.warning("lease renewal failed: %s (retrying in %gs)", e, RENEW_RETRY)
                await asyncio.sleep(RENEW_RETRY)

    async def resync_rules(self) -> None:
        """Every --iptables-resync seconds: rules someone deleted are put back."""
        assert self.firewall
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            missing = await asyncio.to_thread(self.firewall.missing)
            if missing:
                log.info("%s: %d rules missing, restoring", self.firewall.name, missing)
                await asyncio.to_thread(self.firewall.ensure)

    async def run_stats(self) -> None:
        while True:
            if self.plane:
                self.plane.write_stats()
            await asyncio.sleep(STATS_INTERVAL)

    # -- the whole life ---------------------------------------------------------------------
    async def run(self) -> int:
        """Start, run until SIGTERM/SIGINT (or a fatal error), shut down; the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        health = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            if self.opts.healthz_port:
                health = await serve_health(self.opts, self.health_routes())
            if await self.start():
                assert self.watcher
                tasks = [self.watcher, asyncio.create_task(self.renew())]
                if self.firewall:
                    tasks.append(asyncio.create_task(self.resync_rules()))
                if self.opts.stats_file:
                    tasks.append(asyncio.create_task(self.run_stats()))
                stopper = asyncio.create_task(self.stop.wait())
                done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                for t in done:
                    if t is not stopper and t.exception():
                        raise t.exception()  # type: ignore[misc]
        finally:
            if self.watcher and self.watcher not in tasks:
                tasks.append(self.watcher)  # stopped or failed before ready
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.shutdown()
            if health:
                await health.close()
            with contextlib.suppress(Exception):
                await self.manager.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.exit_code

    # -- shutdown ---------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop forwarding and remove the TUN.  The lease stays, so a restart gets the same
        subnet, and so do the rules, as flanneld leaves them: pod traffic keeps its masquerade
        while the node restarts (the next start replaces them if the subnet moved)."""
        self.parts.notify("STOPPING=1")
        if self.plane:
            self.plane.teardown()
            name = self.plane.tun_name
            log.info("stopping: %s", f"{name} removed" if name else "nothing was forwarding yet")
