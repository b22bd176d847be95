"""The subnet-manager seam (flannel's subnet.Manager): what the node lifecycle asks of any
source of network config, this node's lease and the peers' leases.  Implementations: static
(flags), local (etcd), kube.  Must not: hold an implementation or import a datastore client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from ..errors import ConfigError
from .lease import Lease, LeaseEvent
from .network import NetworkConfig


class ConfigPending(ConfigError):
    """The datastore has no network config (yet): the lifecycle waits for it, as flanneld
    does; any other ConfigError from get_network_config ends the node."""


# How a lost datastore is retried by every manager's watch: 0.1 s doubling, capped so that a
# node joining after an outage is learned within a second of the datastore's return (with
# etcd the gRPC channel reconnects on its own schedule first: control/etcd.py keeps that one
# at 0.5 s, so the two waits in series stay under a second).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 0.25


class SubnetManager(Protocol):
    """One node's view of its subnet manager, driven by node.lifecycle.

    Errors: get_network_config and acquire_lease raise ConfigError (bad or missing config:
    the lifecycle retries and says so once) or RegistryUnavailable (the datastore is down:
    retried likewise); anything else ends the node.
    """

    kind: str  # "static", "etcd", "kube": names the datastore in log lines and /metrics

    # Called with True/False once per recovery/outage of the datastore (the lifecycle logs).
    on_state: Callable[[bool], None] | None

    async def get_network_config(self) -> NetworkConfig:
        """The checked network config."""
        ...

    async def stored_public_ip(self) -> IPv4Address | None:
        """A public IP a person stored in the datastore for this node (kube: the
        node-public-ip annotation); it overrides --public-ip.  None: there is none."""
        ...

    async def acquire_lease(
        self, cfg: NetworkConfig, public_ip: IPv4Address, prev_subnet: IPv4Network | None
    ) -> Lease:
        """This node's lease; prev_subnet is the subnet.env a previous run left (a hint)."""
        ...

    def watch_leases(
        self,
        own_subnet: IPv4Network | None,
        *,
        on_own: Callable[[LeaseEvent], None] | None = None,
    ) -> AsyncIterator[list[LeaseEvent]]:
        """The peers' lease events for ever: the first batch is the initial snapshot (even
        when empty), later ones are never empty.  Events of own_subnet go to on_own only."""
        ...

    def renew_at(self, lease: Lease) -> float | None:
        """When (time.time()) to renew the lease; None: it never needs renewing."""
        ...

    async def renew_lease(self, lease: Lease) -> Lease:
        """The lease on a fresh TTL; RegistryUnavailable is retried by the lifecycle."""
        ...

    async def complete_lease(self, lease: Lease) -> None:
        """Everything is up (subnet.env written, routes synced): tell the datastore, if it
        wants to know (kube: NetworkUnavailable=False).  Errors here are logged, not fatal."""
        ...

    async def close(self) -> None:
        """Release connections; the lease itself stays (a restart gets the same subnet)."""
        ...
