"""Where a lease becomes a route: lease events from any subnet manager applied to the data
plane's route table, the control plane's only write into the data plane.
Must not: decide which leases count (control/lease.py) or touch the C table directly.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Protocol

from ..control.lease import LeaseEvent

log = logging.getLogger("udpbackend")


class RouteTable(Protocol):
    def set_route(
        self, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address
    ) -> None: ...
    def delete_route(self, subnet: ipaddress.IPv4Network) -> bool: ...


def apply_lease_events(plane: RouteTable, events: Iterable[LeaseEvent]) -> None:
    """ADDED sets (or moves) the subnet's route to the lease's PublicIP; REMOVED deletes it."""
    for ev in events:
        subnet = ev.lease.subnet
        if ev.added:
            plane.set_route(subnet, ev.lease.attrs.public_ip)
            log.info("peer added: %s via %s", subnet, ev.lease.attrs.public_ip)
        elif plane.delete_route(subnet):
            log.info("peer removed: %s", subnet)
