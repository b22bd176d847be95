"""Leases (flannel's pkg/lease): the subnet key codec, the lease value codec, Lease and
LeaseEvent, and LeaseWatcher, the pure diff of snapshots and watch events into route
changes.  Must not: do I/O or know which datastore a lease came from.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType

from ..errors import ConfigError
from .gojson import (
    _decode_json,
    _go_ipv4,
    _JsonObject,
    _kind,
    _parse_ipv4_text,
    _plain,
    _show,
)
from .registry import (
    SUBNETS_PREFIX,
    KeyValue,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseAttrs:
    """The value stored at a subnet key (flannel's LeaseAttrs); a UDP node fills PublicIP only.
    Equality is on public_ip alone: it is all a UDP node routes by."""

    public_ip: ipaddress.IPv4Address
    extra: dict[str, object] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# Subnet keys (flannel's MakeSubnetKey / ParseSubnetKey)
# ---------------------------------------------------------------------------------------------

# flannel's regexp, verbatim (the last two dots unescaped), anchored only at the END: Go's
# "$" is Python's "\Z", and Go's \d is ASCII-only.
_SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?\Z", re.ASCII)


def format_subnet_key(net: IPv4Network, ipv6: IPv6Network | None = None) -> str:
    """``10.5.52.0-24``, or ``10.12.13.0-24&fd00:12:13::-56`` for a dual-stack lease."""
    key = f"{net.network_address}-{net.prefixlen}"
    if ipv6 is not None:
        key += f"&{_ipv6_text(ipv6.network_address)}-{ipv6.prefixlen}"
    return key


def _ipv6_text(addr: IPv6Address) -> str:
    """Lower-case, ::-compressed hex; Python >= 3.13 prints IPv4-mapped addresses dotted,
    which the key alphabet has no room for."""
    mapped = addr.ipv4_mapped
    if mapped is None:
        return str(addr)
    v4 = int(mapped)
    return f"::ffff:{v4 >> 16:x}:{v4 & 0xFFFF:x}"


def subnet_kv_key(net: IPv4Network, ipv6: IPv6Network | None = None) -> str:
    """The Registry key (relative to the prefix): ``subnets/10.5.52.0-24``."""
    return SUBNETS_PREFIX + format_subnet_key(net, ipv6)


def _small_uint(digits: str) -> int:
    """Decimal digits (leading zeros allowed, as Go's ParseUint) -> int; huge -> 9999."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 4 else 9999


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """The subnet(s) a key names; the key may carry any prefix (the match is end-anchored).
    IPv4 prefix lengths above 31 and IPv6 ones above 127 fail, as in flannel (5/7-bit
    unsigned).  Host bits are masked off (flannel keeps them: 10.5.52.1-24 would be a route
    that matches nothing; masked, the key's subnet is the one routed and allocated around)."""
    m = _SUBNET_KEY_RE.search(key) if isinstance(key, str) else None
    if m is None:
        raise ConfigError(f"subnet key {_show(key)}: not of the form a.b.c.d-len[&ipv6-len]")
    ip4 = _parse_ipv4_text(m[1])
    plen4 = _small_uint(m[2])
    if ip4 is None or plen4 > 31:
        raise ConfigError(f"subnet key {_show(key)}: bad IPv4 subnet {_show(m[1] + '-' + m[2])}")
    net = IPv4Network((ip4, plen4), strict=False)
    if m[3] is None:
        return net, None
    plen6 = _small_uint(m[4])
    try:
        ip6 = IPv6Address(m[3])
    except ValueError:
        ip6 = None
    if ip6 is None or plen6 > 127:
        raise ConfigError(f"subnet key {_show(key)}: bad IPv6 subnet {_show(m[3] + '-' + m[4])}")
    return net, IPv6Network((ip6, plen6), strict=False)


# ---------------------------------------------------------------------------------------------
# Lease values (JSON of flannel's LeaseAttrs)
# ---------------------------------------------------------------------------------------------

_LEASE_FIELDS = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")


def format_lease_value(attrs: LeaseAttrs) -> bytes:
    """Exactly the bytes a flannel UDP node writes: ``{"PublicIP":"a.b.c.d","PublicIPv6":null}``."""
    return b'{"PublicIP":"%s","PublicIPv6":null}' % str(attrs.public_ip).encode()


def parse_lease_value(raw: bytes) -> LeaseAttrs:
    """Decode a subnet key's value written by any flannel backend.  Keys match
    case-insensitively, unknown ones are ignored; PublicIP must be an IPv4 string and the
    other LeaseAttrs fields must have their Go types.  extra keeps the other known fields."""
    doc = _decode_json(raw, "lease value")
    if not isinstance(doc, _JsonObject):
        raise ConfigError(f"lease value: expected a JSON object, got {_kind(doc).split()[0]}")
    f = doc.fields()
    if "publicip" not in f:
        raise ConfigError("lease value: PublicIP is missing")
    try:
        public_ip = _go_ipv4(f, "PublicIP")
    except ConfigError as exc:
        raise ConfigError(f"lease value: {exc}") from None
    assert public_ip is not None
    v6 = f.get("publicipv6")
    if v6 is not None and (not isinstance(v6, str) or _parse_ip_any(v6) is None):
        raise ConfigError(f"lease value: PublicIPv6 {_show(v6)} is not an IP address")
    btype = f.get("backendtype")
    if btype is not None and not isinstance(btype, str):
        raise ConfigError(f"lease value: BackendType {_show(btype)} is not a string")
    extra: dict[str, object] = {}
    for name in _LEASE_FIELDS[1:]:
        if name.lower() in f:
            try:
                extra[name] = _plain(f[name.lower()])
            except RecursionError:
                raise ConfigError(f"lease value: {name} is nested too deeply") from None
    return LeaseAttrs(public_ip, extra)


def _parse_ip_any(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Leases and the lease-event diff (flannel's pkg/lease)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    attrs: LeaseAttrs
    expiration: float | None  # on the injected clock; None: a reservation (no TTL attached)
    key: str  # the Registry key it lives at, e.g. "subnets/10.5.52.0-24"
    ipv6_subnet: IPv6Network | None = None

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None


class LeaseEventKind(Enum):
    ADDED = 0  # flannel's EventAdded: a new lease, or an update of a known one (upsert)
    REMOVED = 1  # flannel's EventRemoved: deleted or expired


@dataclass(frozen=True)
class LeaseEvent:
    kind: LeaseEventKind
    lease: Lease

    @property
    def added(self) -> bool:
        return self.kind is LeaseEventKind.ADDED


def kv_to_lease(kv: KeyValue, ttl: int, now: float) -> tuple[Lease | None, str | None]:
    """(lease, None), or (None, reason) when the key or the value does not parse.  ttl is
    the registry's lease_ttl() answer; a KV without an etcd lease is a reservation."""
    try:
        net, net6 = parse_subnet_key(kv.key)
        attrs = parse_lease_value(kv.value)
    except ConfigError as exc:
        return None, str(exc)
    expiration = None if kv.lease_id == 0 else now + ttl
    return Lease(net, attrs, expiration, kv.key, net6), None


def _removed_placeholder(net: IPv4Network, net6: IPv6Network | None, key: str) -> Lease:
    """A DELETE carries no value: the watcher swaps this for the lease it knew."""
    return Lease(net, LeaseAttrs(IPv4Address(0)), None, key, net6)


class LeaseWatcher:
    """Turns snapshots and watch events into ADDED/REMOVED batches for the route table
    (flannel's LeaseWatcher).  Pure.  The node's own subnet never appears.  A REMOVED event
    carries the last lease known for the subnet; removals of unknown subnets are dropped."""

    def __init__(self, own_subnet: IPv4Network | None) -> None:
        self.own_subnet = own_subnet
        self._leases: dict[IPv4Network, Lease] = {}

    @property
    def leases(self) -> Mapping[IPv4Network, Lease]:
        """The peers' leases as currently known (read-only view)."""
        return MappingProxyType(self._leases)

    def reset(self, snapshot: Iterable[Lease]) -> list[LeaseEvent]:
        """Diff a full listing against the known set: gone -> REMOVED, new -> ADDED, present
        in both -> ADDED only if its attrs changed (flannel emits nothing there, so a peer
        that changed PublicIP while the watch was behind would keep a stale route)."""
        fresh = {lease.subnet: lease for lease in snapshot if lease.subnet != self.own_subnet}
        events = [
            LeaseEvent(LeaseEventKind.REMOVED, old)
            for net, old in sorted(self._leases.items())
            if net not in fresh
        ]
        for net, lease in sorted(fresh.items()):
            old = self._leases.get(net)
            if old is None or old.attrs != lease.attrs:
                events.append(LeaseEvent(LeaseEventKind.ADDED, lease))
        self._leases = fresh
        return events

    def update(self, events: Iterable[LeaseEvent]) -> list[LeaseEvent]:
        """Apply watch events in order: ADDED upserts (and is always passed on: a renewal is
        an ADDED with unchanged attrs), REMOVED deletes."""
        out = []
        for ev in events:
            net = ev.lease.subnet
            if net == self.own_subnet:
                continue
            if ev.kind is LeaseEventKind.ADDED:
                self._leases[net] = ev.lease
                out.append(ev)
            else:
                old = self._leases.pop(net, None)
                if old is not None:
                    out.append(LeaseEvent(LeaseEventKind.REMOVED, old))
        return out
