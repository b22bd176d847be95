"""The Registry seam: the narrow key-value view of etcd a LocalManager needs (flannel's
etcd.Registry), its value types and its two errors.  The real one is control/etcd.py;
tests use an in-memory fake.  Must not: parse values or hold policy (retries, backoff).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

log = logging.getLogger(__name__)

CONFIG_KEY = "config"  # <prefix>/config
SUBNETS_PREFIX = "subnets/"  # <prefix>/subnets/<subnet-key>


class RegistryUnavailable(ConnectionError):
    """The datastore cannot be reached right now (retry with backoff)."""


class CompactedError(RuntimeError):
    """A watch asked for a revision the datastore has compacted away (re-list, then re-watch)."""


@dataclass(frozen=True)
class KeyValue:
    key: str  # relative to the prefix, e.g. "subnets/10.5.52.0-24"
    value: bytes
    lease_id: int  # 0: no TTL attached (a reservation)
    mod_revision: int


class WatchKind(Enum):
    PUT = "PUT"
    DELETE = "DELETE"  # explicit delete or lease expiry: etcd v3 has no separate expire event


@dataclass(frozen=True)
class WatchEvent:
    kind: WatchKind
    kv: KeyValue  # for DELETE, value is b"" and lease_id 0


@dataclass(frozen=True)
class WatchBatch:
    events: list[WatchEvent]
    revision: int  # header revision of this response: resume from revision + 1


class Registry(Protocol):
    async def get_config(self) -> bytes | None:
        """The raw value of <prefix>/config, or None when the key is missing."""
        ...

    async def list_subnets(self) -> tuple[list[KeyValue], int]:
        """Every key under <prefix>/subnets and the store revision of the listing."""
        ...

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on an etcd lease; -1 for lease 0 (no TTL) or an expired lease."""
        ...

    async def create_subnet(self, key: str, value: bytes, ttl: int) -> bool:
        """Create key with value on a new lease of ttl seconds, only if the key is absent
        (transaction on version == 0).  False (and no change, lease revoked) if it exists."""
        ...

    async def update_subnet(self, key: str, value: bytes, ttl: int | None) -> int:
        """Unconditional PUT; ttl None: no lease (keeps a reservation a reservation).
        Returns the new lease id (0 without ttl)."""
        ...

    async def delete_subnet(self, key: str) -> None: ...

    def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Events under <prefix>/subnets from start_revision on.  Raises CompactedError if
        start_revision is compacted, RegistryUnavailable when the connection is lost.
        May yield a batch without events (e.g. etcd's "watch created" response): the manager
        takes it as proof the connection is back and does not move its resume point."""
        ...

    async def close(self) -> None:
        """Release the connection (idempotent)."""
        ...
