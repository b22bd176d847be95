"""Test doubles for the control plane: FakeClock (time and sleep you drive by hand) and
FakeRegistry, an in-memory etcd v3 behind udpbackend.control.registry.Registry: revisions, TTL
leases that expire on the clock (producing DELETE events), create-if-absent, watches replaying
history from a revision, compaction, and an outage switch.  No I/O, no threads.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from udpbackend.control.registry import (
    CompactedError,
    KeyValue,
    RegistryUnavailable,
    WatchBatch,
    WatchEvent,
    WatchKind,
)

__all__ = ["FakeClock", "FakeRegistry"]


class FakeClock:
    """A clock that moves only when told.  Call it for the time; `await clock.sleep(dt)`
    records dt, advances the time, calls on_sleep(dt) and yields to the loop once."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        await asyncio.sleep(0)


@dataclass
class _Entry:
    value: bytes
    lease_id: int
    mod_revision: int


class FakeRegistry:
    """In-memory etcd for one flannel prefix.  Keys are prefix-relative ("config",
    "subnets/10.5.1.0-24").

    The Registry methods (what the daemon calls) raise RegistryUnavailable while
    `available` is False.  The admin methods (put, delete, grant, compact, expire, set_config)
    stand for other etcd clients and always work, also during an outage.
    """

    def __init__(self, clock: FakeClock | None = None, config: bytes | None = None) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.config = config
        self.revision = 1  # etcd's store starts at revision 1
        self.compact_revision = 0
        self.available = True
        self.data: dict[str, _Entry] = {}
        self.leases: dict[int, float] = {}  # lease id -> expiry on the clock
        self._expiries: list[tuple[float, int]] = []  # heap over self.leases
        self.history: list[tuple[int, WatchEvent]] = []
        self.watch_starts: list[int] = []  # start_revision of every watch_subnets call
        self.calls: list[str] = []  # Registry method names, in call order
        self.before_create: Callable[[str], object] | None = None  # stage a lost race
        self._next_lease = 0x7E57_0000
        self._watchers: list[asyncio.Queue[WatchBatch | BaseException]] = []

    # -- admin side (other etcd clients, the test) ---------------------------------------------

    def set_config(self, raw: bytes | str | None) -> None:
        self.config = raw.encode() if isinstance(raw, str) else raw

    def grant(self, ttl: int) -> int:
        self._next_lease += 1
        self.leases[self._next_lease] = self.clock() + ttl
        heapq.heappush(self._expiries, (self.clock() + ttl, self._next_lease))
        return self._next_lease

    def put(self, key: str, value: bytes | str, ttl: int | None = None) -> int:
        """PUT like `etcdctl put [--lease]`; ttl None: no lease (a reservation).  Returns the
        new revision."""
        self.expire()
        raw = value.encode() if isinstance(value, str) else value
        lease_id = 0 if ttl is None else self.grant(ttl)
        return self._put(key, raw, lease_id)

    def delete(self, key: str) -> int | None:
        """Delete key; the new revision, or None if it did not exist."""
        self.expire()
        return self._delete([key])

    def expire(self) -> None:
        """Revoke every lease whose time is up, deleting its keys (one revision per lease)."""
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiries)
            if self.leases.pop(lease_id, None) is not None:
                self._delete([k for k, e in sorted(self.data.items()) if e.lease_id == lease_id])

    def compact(self, revision: int | None = None, *, cancel_watches: bool = False) -> None:
        """Forget history before `revision` (default: the current one).  Watches asking for
        an older start raise CompactedError; cancel_watches also ends the open ones so."""
        rev = self.revision if revision is None else revision
        self.compact_revision = max(self.compact_revision, rev)
        self.history = [(r, ev) for r, ev in self.history if r >= self.compact_revision]
        if cancel_watches:
            self._broadcast(CompactedError(f"required revision {rev} has been compacted"))

    def set_available(self, available: bool) -> None:
        """Cut or restore the daemon's connection; cutting it breaks every open watch."""
        self.available = available
        if not available:
            self._broadcast(RegistryUnavailable("fake etcd: connection lost"))

    def lease_of(self, key: str) -> int | None:
        entry = self.data.get(key)
        return None if entry is None else entry.lease_id

    def value_of(self, key: str) -> bytes | None:
        entry = self.data.get(key)
        return None if entry is None else entry.value

    def ttl_of(self, key: str) -> float | None:
        """Seconds left on the key's lease; None for no key or no lease."""
        entry = self.data.get(key)
        if entry is None or entry.lease_id == 0 or entry.lease_id not in self.leases:
            return None
        return self.leases[entry.lease_id] - self.clock()

    # -- the Registry protocol -----------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        self._enter("get_config")
        return self.config

    async def list_subnets(self) -> tuple[list[KeyValue], int]:
        self._enter("list_subnets")
        kvs = [
            KeyValue(k, e.value, e.lease_id, e.mod_revision)
            for k, e in sorted(self.data.items())
            if k.startswith("subnets")  # flannel's range has no trailing slash
        ]
        return kvs, self.revision

    async def lease_ttl(self, lease_id: int) -> int:
        self._enter("lease_ttl")
        if lease_id == 0 or lease_id not in self.leases:
            return -1
        return max(0, math.ceil(self.leases[lease_id] - self.clock()))

    async def create_subnet(self, key: str, value: bytes, ttl: int) -> bool:
        self._enter("create_subnet")
        if self.before_create is not None:
            self.before_create(key)
            self.expire()
        if key in self.data:
            return False
        self._put(key, value, self.grant(ttl))
        return True

    async def update_subnet(self, key: str, value: bytes, ttl: int | None) -> int:
        self._enter("update_subnet")
        lease_id = 0 if ttl is None else self.grant(ttl)
        self._put(key, value, lease_id)
        return lease_id

    async def delete_subnet(self, key: str) -> None:
        self._enter("delete_subnet")
        self._delete([key])

    def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchBatch]:
        return self._watch(start_revision)

    # -- internals -----------------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if not self.available:
            raise RegistryUnavailable("fake etcd: connection refused")
        self.expire()

    def _put(self, key: str, value: bytes, lease_id: int) -> int:
        self.revision += 1
        self.data[key] = _Entry(value, lease_id, self.revision)
        kv = KeyValue(key, value, lease_id, self.revision)
        self._record([WatchEvent(WatchKind.PUT, kv)])
        return self.revision

    def _delete(self, keys: list[str]) -> int | None:
        keys = [k for k in keys if k in self.data]
        if not keys:
            return None
        self.revision += 1
        for k in keys:
            del self.data[k]
        self._record(
            [WatchEvent(WatchKind.DELETE, KeyValue(k, b"", 0, self.revision)) for k in keys]
        )
        return self.revision

    def _record(self, events: list[WatchEvent]) -> None:
        events = [ev for ev in events if ev.kv.key.startswith("subnets")]
        if not events:
            return
        self.history.extend((self.revision, ev) for ev in events)
        self._broadcast(WatchBatch(events, self.revision))

    def _broadcast(self, item: WatchBatch | BaseException) -> None:
        for q in list(self._watchers):
            q.put_nowait(item)

    async def _watch(self, start: int) -> AsyncIterator[WatchBatch]:
        self.watch_starts.append(start)
        self._enter("watch_subnets")
        if start < self.compact_revision:
            raise CompactedError(f"required revision {start} has been compacted")
        q: asyncio.Queue[WatchBatch | BaseException] = asyncio.Queue()
        self._watchers.append(q)
        try:
            # Like etcd: first the history from `start`, in one response (empty: the
            # "created" response), then one response per revision.
            yield WatchBatch([ev for rev, ev in self.history if rev >= start], self.revision)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._watchers.remove(q)
