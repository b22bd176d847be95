"""A flanneld-compatible node in etcd mode: config from etcd, a subnet lease, the data plane,
iptables rules, subnet.env, /healthz and /readyz, then peers from the lease watch and the
lease renewal, until SIGTERM/SIGINT.  Composition and lifecycle only: per-packet work is the
data plane's, lease logic is subnet.py's, etcd access is etcd.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import ConfigError
from .daemon import DataPlane, RunOptions, StartupError, serve_health
from .iptables import Iptables, IptablesError, Rule, forward_rules, masq_rules
from .metrics import CONTENT_TYPE, render
from .subnet import (
    Lease,
    LeaseEvent,
    NetworkConfig,
    RegistryUnavailable,
    SubnetManager,
)
from .subnetenv import format_subnet_env, parse_subnet_env, write_subnet_env

log = logging.getLogger("udpbackend")

CONFIG_RETRY = 1.0  # flanneld re-reads a missing or invalid config every second
RENEW_RETRY = 60.0  # and retries a failed renewal after a minute
LEASE_TTL = 24 * 3600


def previous_subnet(path: str | None) -> ipaddress.IPv4Network | None:
    """FLANNEL_SUBNET of the subnet.env a previous run left, masked to its network."""
    if not path:
        return None
    try:
        with open(path) as f:
            env = parse_subnet_env(f.read())
    except OSError:
        return None
    value = env.get("FLANNEL_SUBNET", "")
    if not value or "," in value:
        return None
    try:
        return ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        return None


def apply_lease_events(plane: DataPlane, events: list[LeaseEvent]) -> None:
    """The control plane's only write into the data plane: routes set and deleted."""
    for ev in events:
        subnet = ev.lease.subnet
        if ev.added:
            plane.set_route(subnet, ev.lease.attrs.public_ip)
            log.info("peer added: %s via %s", subnet, ev.lease.attrs.public_ip)
        elif plane.delete_route(subnet):
            log.info("peer removed: %s", subnet)


class EtcdNode:
    def __init__(self, opts: RunOptions, registry: Any) -> None:
        self.opts = opts
        self.registry = registry
        self.manager = SubnetManager(
            registry,
            clock=time.time,
            rng=random.Random(),
            sleep=asyncio.sleep,
            on_state=self._on_etcd_state,
        )
        self.stop = asyncio.Event()
        self.ready = False
        self.plane: DataPlane | None = None
        self.lease: Lease | None = None
        self.rules: list[Rule] = []
        self.iptables: Iptables | None = None
        self.exit_code = 0
        self._connected = True

    # -- health ---------------------------------------------------------------------------
    def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"flanneld is running"

    def _readyz(self) -> tuple[int, str, bytes]:
        if self.ready:
            return 200, "text/plain", b"flanneld is ready"
        return 503, "text/plain", b"flanneld is not ready yet"

    def _metrics(self) -> tuple[int, str, bytes]:
        lease = self.lease
        control = {
            "lease_expiry": lease.expiration if lease else None,
            "etcd_connected": self._connected,
            "ready": self.ready,
            "subnet": str(lease.subnet) if lease else None,
            "public_ip": str(lease.attrs.public_ip) if lease else None,
        }
        return 200, CONTENT_TYPE, render(self.plane.stats_doc() if self.plane else {}, control)

    def _on_etcd_state(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            log.info(
                "etcd %s",
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

    async def start(self) -> bool:
        """Everything up to ready; False when stopped before that."""
        opts = self.opts
        cfg: NetworkConfig | None = await self._until(
            self.manager.get_network_config, CONFIG_RETRY, "couldn't fetch network config"
        )
        if cfg is None:
            return False
        try:
            ext, _ = await asyncio.to_thread(DataPlane.select_interface, opts)
        except Exception as e:  # IfaceError / StartupError
            raise StartupError(str(e)) from None
        public_ip = opts.public_ip or ext.address
        prev = previous_subnet(opts.subnet_file)

        async def acquire() -> Lease:
            return await self.manager.acquire_lease(cfg, public_ip, prev, ttl=LEASE_TTL)

        lease: Lease | None = await self._until(acquire, CONFIG_RETRY, "failed to acquire lease")
        if lease is None:
            return False
        self.lease = lease
        expiry = "no TTL (reservation)" if lease.expiration is None else "24h"
        log.info("lease acquired: %s for %s, %s", lease.subnet, public_ip, expiry)

        self.plane = DataPlane(cfg.network, lease.subnet, cfg.backend_port, opts)
        await self.plane.setup_async()
        self.plane.start(asyncio.get_running_loop(), self._on_dataplane_error)
        log.info("data plane up: %s", self.plane.describe())

        if opts.ip_masq or opts.forward_rules:
            try:
                self.iptables = Iptables()
                if opts.ip_masq:
                    self.rules += masq_rules(cfg.network, lease.subnet)
                if opts.forward_rules:
                    self.rules += forward_rules(cfg.network)
                await asyncio.to_thread(self.iptables.install, self.rules)
            except IptablesError as e:
                raise StartupError(str(e)) from None
        if opts.subnet_file:
            try:
                write_subnet_env(
                    opts.subnet_file,
                    format_subnet_env(cfg.network, lease.subnet, self.plane.mtu, opts.ip_masq),
                )
            except OSError as e:
                log.warning("failed to write %s: %s (not ready)", opts.subnet_file, e.strerror)
                return True
        self.ready = True
        log.info(
            "ready: subnet.env written%s", f" to {opts.subnet_file}" if opts.subnet_file else ""
        )
        return True

    def _on_dataplane_error(self, e: OSError) -> None:
        self.exit_code = 1
        self.stop.set()

    # -- running ----------------------------------------------------------------------------
    async def watch(self) -> None:
        assert self.plane and self.lease
        async for events in self.manager.watch_leases(self.lease.subnet, on_own=self._on_own):
            apply_lease_events(self.plane, events)

    def _on_own(self, ev: LeaseEvent) -> None:
        # flanneld: our key deleted means an operator revoked the lease; stop (exit 0)
        if not ev.added:
            log.info("Lease has been revoked. Shutting down daemon.")
            self.stop.set()

    async def renew(self) -> None:
        assert self.lease
        while not self.stop.is_set():
            at = self.manager.renew_at(self.lease, self.opts.renew_margin_minutes)
            if at is None:  # a reservation: nothing to renew, ever
                await self.stop.wait()
                return
            await asyncio.sleep(max(0.0, at - time.time()))
            try:
                self.lease = await self.manager.renew_lease(self.lease, ttl=LEASE_TTL)
                log.info("lease renewed: %s", self.lease.subnet)
            except RegistryUnavailable as e:
                log.warning("lease renewal failed: %s (retrying in %gs)", e, RENEW_RETRY)
                await asyncio.sleep(RENEW_RETRY)

    async def resync_rules(self) -> None:
        assert self.iptables
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            missing = await asyncio.to_thread(self.iptables.missing, self.rules)
            if missing:
                log.info("iptables: %d rules missing, restoring", len(missing))
                await asyncio.to_thread(self.iptables.install, self.rules)

    async def run_stats(self) -> None:
        while True:
            if self.plane:
                self.plane.write_stats()
            await asyncio.sleep(1.0)

    # -- shutdown ---------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop forwarding, remove flannel0 and our rules; the lease stays, so a restart
        gets the same subnet."""
        if self.plane:
            self.plane.teardown()
            log.info("stopping: %s removed", self.opts.tun_name)
        if self.iptables and self.rules:
            with contextlib.suppress(IptablesError):
                await asyncio.to_thread(self.iptables.remove, self.rules)


async def run_etcd_node(opts: RunOptions) -> int:
    from .etcd import EtcdRegistry

    loop = asyncio.get_running_loop()
    registry = EtcdRegistry(
        endpoints=opts.etcd_endpoints,
        prefix=opts.etcd_prefix,
        cafile=opts.etcd_cafile or None,
        certfile=opts.etcd_certfile or None,
        keyfile=opts.etcd_keyfile or None,
        username=opts.etcd_username or None,
        password=opts.etcd_password or None,
    )
    node = EtcdNode(opts, registry)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stop.set)
    health = None
    if opts.healthz_port:
        health = await serve_health(
            opts, {"/healthz": node._healthz, "/readyz": node._readyz, "/metrics": node._metrics}
        )
    tasks: list[asyncio.Task[Any]] = []
    try:
        if await node.start():
            tasks = [asyncio.create_task(node.watch()), asyncio.create_task(node.renew())]
            if node.iptables:
                tasks.append(asyncio.create_task(node.resync_rules()))
            if opts.stats_file:
                tasks.append(asyncio.create_task(node.run_stats()))
            stopper = asyncio.create_task(node.stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception():
                    raise t.exception()  # type: ignore[misc]
            stopper.cancel()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await node.shutdown()
        if health:
            await health.close()
        with contextlib.suppress(Exception):
            await registry.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return node.exit_code


__all__ = ["EtcdNode", "apply_lease_events", "previous_subnet", "run_etcd_node"]
