"""LocalManager, flannel's LocalManager + WatchLeases over a Registry (etcd mode):
acquire, renew and watch this node's lease.  Time, randomness and sleep are injected.
Must not: import the etcd client (control/etcd.py is the Registry) or the data plane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from ..errors import ConfigError
from .allocate import (
    RandomSource,
    allocate_ipv6_subnet,
    allocate_subnet,
    is_lease_compatible,
)
from .gojson import (
    _one_line,
)
from .lease import (
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseEventKind,
    LeaseWatcher,
    _removed_placeholder,
    format_lease_value,
    kv_to_lease,
    parse_subnet_key,
    subnet_kv_key,
)
from .manager import RECONNECT_FIRST, RECONNECT_MAX, ConfigPending
from .network import (
    NetworkConfig,
    parse_network_config,
)
from .registry import (
    CompactedError,
    KeyValue,
    Registry,
    RegistryUnavailable,
    WatchBatch,
    WatchKind,
)

log = logging.getLogger(__name__)

SUBNET_TTL = 86400  # flannel's subnetTTL: 24 h, renewed by re-PUT on a fresh lease
RACE_RETRIES = 10  # flannel's raceRetries


# ---------------------------------------------------------------------------------------------
# The manager (flannel's LocalManager + WatchLeases over the Registry)
# ---------------------------------------------------------------------------------------------


class ConfigMissing(ConfigPending):
    """<prefix>/config does not exist (yet): flanneld retries every second."""

    def __init__(self) -> None:
        super().__init__(
            "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
        )


class AcquireError(RuntimeError):
    """No subnet could be created: every attempt lost the creation race."""


class LocalManager:
    """Acquire, renew and watch this node's subnet lease over a Registry.

    clock: seconds (any epoch; lease expirations are on it); rng: random.Random for the
    allocation pick; sleep: awaited between watch reconnects (asyncio.sleep in production);
    on_state: watch_leases' default connection-state callback; renew_margin: minutes before
    expiry that renew_at schedules the renewal (--subnet-lease-renew-margin).
    Registry errors other than those the watch handles propagate to the caller.
    Implements control.manager.SubnetManager.
    """

    kind = "etcd"

    def __init__(
        self,
        registry: Registry,
        *,
        clock: Callable[[], float],
        rng: RandomSource,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: Callable[[bool], None] | None = None,
        renew_margin: int = 60,
    ) -> None:
        self.registry = registry
        self.renew_margin = renew_margin
        self.clock = clock
        self.rng = rng
        self.sleep = sleep
        self.on_state = on_state
        self.skipped = 0  # malformed subnet entries seen (each skipped alone)

    async def get_network_config(self) -> NetworkConfig:
        """Fetch and check <prefix>/config.  ConfigMissing if absent, ConfigError if bad."""
        raw = await self.registry.get_config()
        if raw is None:
            raise ConfigMissing()
        return parse_network_config(raw)

    async def _leases_of(self, kvs: list[KeyValue]) -> list[Lease]:
        """Parse a listing, skipping malformed entries alone; TTLs looked up concurrently."""
        ttls = await asyncio.gather(*(self._ttl(kv) for kv in kvs))
        now = self.clock()
        leases = []
        for kv, ttl in zip(kvs, ttls, strict=True):
            lease, why = kv_to_lease(kv, ttl, now)
            if lease is None:
                self._skip(kv.key, why)
            else:
                leases.append(lease)
        return leases

    async def _ttl(self, kv: KeyValue) -> int:
        return -1 if kv.lease_id == 0 else await self.registry.lease_ttl(kv.lease_id)

    def _skip(self, key: str, why: str | None) -> None:
        self.skipped += 1
        log.warning("ignoring bad subnet node %s: %s", _one_line(key, 120), why)

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every well-formed lease under <prefix>/subnets and the listing's revision."""
        kvs, revision = await self.registry.list_subnets()
        return await self._leases_of(kvs), revision

    async def stored_public_ip(self) -> IPv4Address | None:
        """etcd mode stores no per-node public IP: --public-ip or the interface decide."""
        return None

    async def acquire_lease(
        self,
        cfg: NetworkConfig,
        public_ip: IPv4Address,
        prev_subnet: IPv4Network | None = None,
        ttl: int = SUBNET_TTL,
        *,
        prev_ipv6_subnet: IPv6Network | None = None,
    ) -> Lease:
        """flannel's AcquireLease: (1) reuse the lease carrying our PublicIP if it fits cfg
        (re-PUT with a fresh TTL; a reservation is re-PUT without one and stays one), else
        delete it; (2) reuse prev_subnet (from subnet.env) if no lease overlaps it and it fits
        cfg; (3) allocate.  Creation is create-if-absent; a lost race lists again (up to
        RACE_RETRIES times) and never overwrites.  Other hosts' leases, reservations included,
        are never taken.  ConfigError("out of subnets"), AcquireError, RegistryUnavailable."""
        attrs = LeaseAttrs(public_ip)
        value = format_lease_value(attrs)
        for _ in range(RACE_RETRIES):
            leases, _rev = await self.list_leases()
            mine = next((le for le in leases if le.attrs.public_ip == public_ip), None)
            if mine is not None:
                if is_lease_compatible(cfg, mine.subnet, mine.ipv6_subnet):
                    log.info("found lease %s for current IP %s, reusing", mine.key, public_ip)
                    reserved = mine.is_reservation
                    await self.registry.update_subnet(mine.key, value, None if reserved else ttl)
                    expiration = None if reserved else self.clock() + ttl
                    return replace(mine, attrs=attrs, expiration=expiration)
                log.info(
                    "found lease %s for current IP %s but not compatible with the network "
                    "config, deleting",
                    mine.key,
                    public_ip,
                )
                await self.registry.delete_subnet(mine.key)

            net: IPv4Network | None = None
            net6: IPv6Network | None = None
            if prev_subnet is not None:
                if any(le.subnet.overlaps(prev_subnet) for le in leases):
                    pass  # held by someone (or by our just-deleted lease): allocate instead
                elif is_lease_compatible(cfg, prev_subnet, prev_ipv6_subnet):
                    log.info("found previously leased subnet %s, reusing", prev_subnet)
                    net, net6 = prev_subnet, prev_ipv6_subnet
                else:
                    log.error(
                        "found previously leased subnet %s that is not compatible with the "
                        "etcd network config, ignoring",
                        prev_subnet,
                    )
            if net is None:
                net = allocate_subnet(cfg, (le.subnet for le in leases), self.rng)
                if cfg.enable_ipv6:
                    taken6 = (le.ipv6_subnet for le in leases if le.ipv6_subnet is not None)
                    net6 = allocate_ipv6_subnet(cfg, taken6, self.rng)

            key = subnet_kv_key(net, net6)
            if await self.registry.create_subnet(key, value, ttl):
                log.info("allocated lease %s to current node %s", key, public_ip)
                return Lease(net, attrs, self.clock() + ttl, key, net6)
            log.info("lost the race for %s: listing again", key)
        raise AcquireError(
            f"gave up acquiring a subnet: lost the creation race {RACE_RETRIES} times"
        )

    async def renew_lease(self, lease: Lease, ttl: int = SUBNET_TTL) -> Lease:
        """Re-PUT the same value on a fresh TTL (flannel renews this way, not by KeepAlive;
        peers see an ADDED upsert).  A reservation has nothing to renew: returned as is."""
        if lease.is_reservation:
            return lease
        await self.registry.update_subnet(lease.key, format_lease_value(lease.attrs), ttl)
        return replace(lease, expiration=self.clock() + ttl)

    def renew_at(self, lease: Lease, margin_minutes: int | None = None) -> float | None:
        """When to renew: expiration - margin (default: renew_margin) on the clock; None for
        a reservation."""
        if lease.expiration is None:
            return None
        margin = self.renew_margin if margin_minutes is None else margin_minutes
        return lease.expiration - margin * 60

    async def complete_lease(self, lease: Lease) -> None:
        """etcd mode has nothing to report once the node is up."""

    async def close(self) -> None:
        await self.registry.close()

    async def _events_of(self, batch: WatchBatch) -> list[LeaseEvent]:
        """One watch response as lease events; a malformed PUT is skipped alone (flannel
        turns it into an empty snapshot that withdraws every route)."""
        puts = [ev.kv for ev in batch.events if ev.kind is WatchKind.PUT]
        ttls = dict(zip(puts, await asyncio.gather(*(self._ttl(kv) for kv in puts)), strict=True))
        now = self.clock()
        out = []
        for ev in batch.events:
            if ev.kind is WatchKind.PUT:
                lease, why = kv_to_lease(ev.kv, ttls[ev.kv], now)
                if lease is None:
                    self._skip(ev.kv.key, why)
                    continue
                out.append(LeaseEvent(LeaseEventKind.ADDED, lease))
            else:
                try:
                    net, net6 = parse_subnet_key(ev.kv.key)
                except ConfigError as exc:
                    self._skip(ev.kv.key, str(exc))
                    continue
                placeholder = _removed_placeholder(net, net6, ev.kv.key)
                out.append(LeaseEvent(LeaseEventKind.REMOVED, placeholder))
        return out

    async def watch_leases(
        self,
        own_subnet: IPv4Network | None,
        *,
        on_state: Callable[[bool], None] | None = None,
        on_own: Callable[[LeaseEvent], None] | None = None,
    ) -> AsyncGenerator[list[LeaseEvent], None]:
        """Peers' lease events, for ever.  The first batch is the initial snapshot (yielded
        even when empty); later batches are never empty.

        1. List, LeaseWatcher.reset, yield; watch from the listing's revision + 1.
        2. Each response: parse (malformed entries skipped alone), update, yield; resume
           point = response revision + 1.
        3. CompactedError: back to 1 (the diff against what was known is yielded).
        4. RegistryUnavailable (or the stream ending): sleep 0.1 s doubling to 0.8 s, reset by
           any watch response, and re-watch from the resume point (or re-list if step 1
           failed).  A compaction hit again before any response also backs off.
        on_state(False)/on_state(True) is called once per outage/recovery (default: the
        constructor's on_state); the caller logs "etcd lost"/"etcd back" there.  on_own gets
        the events of own_subnet's key (ADDED on a renewal, REMOVED if it is deleted or
        missing from a listing): flanneld shuts down on the latter.
        """
        watcher = LeaseWatcher(own_subnet)
        if on_state is None:
            on_state = self.on_state
        connected = True
        backoff = RECONNECT_FIRST
        resume: int | None = None  # None: list first
        relisted = False  # a compaction already sent us to re-list, with no response since

        def succeeded(watch_response: bool) -> None:
            nonlocal connected, backoff, relisted
            if watch_response:  # a listing alone does not prove the watch can work
                backoff = RECONNECT_FIRST
                relisted = False
            if not connected:
                connected = True
                if on_state is not None:
                    on_state(True)

        def own_events(events: Iterable[LeaseEvent]) -> None:
            if on_own is not None and own_subnet is not None:
                for ev in events:
                    if ev.lease.subnet == own_subnet:
                        on_own(ev)

        first = True
        while True:
            try:
                if resume is None:
                    leases, revision = await self.list_leases()
                    succeeded(watch_response=False)
                    own = next((le for le in leases if le.subnet == own_subnet), None)
                    if own is not None:
                        own_events([LeaseEvent(LeaseEventKind.ADDED, own)])
                    elif own_subnet is not None:
                        gone = _removed_placeholder(own_subnet, None, subnet_kv_key(own_subnet))
                        own_events([LeaseEvent(LeaseEventKind.REMOVED, gone)])
                    events = watcher.reset(leases)
                    resume = revision + 1
                    if events or first:
                        first = False
                        yield events
                stream = self.registry.watch_subnets(resume)
                try:
                    async for batch in stream:
                        succeeded(watch_response=True)
                        if not batch.events:
                            continue
                        raw = await self._events_of(batch)
                        own_events(raw)
                        events = watcher.update(raw)
                        resume = max(resume, batch.revision + 1)
                        if events:
                            yield events
                finally:
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()
                log.info("subnet watch stream ended: reconnecting from revision %d", resume)
            except CompactedError:
                log.warning("watch of subnet leases fell behind a compaction: re-listing")
                resume = None
                if not relisted:
                    relisted = True
                    continue  # re-list at once; compacted again before any response: back off
            except RegistryUnavailable as exc:
                log.debug("subnet watch: registry unavailable (retry in %.2fs): %s", backoff, exc)
                if connected:
                    connected = False
                    if on_state is not None:
                        on_state(False)
            await self.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX)
