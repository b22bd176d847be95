"""Control-plane vocabulary and logic, flannel's pkg/subnet + pkg/lease: network config,
subnet keys, lease values, allocation, the lease-event diff, the Registry seam and the
SubnetManager that acquires, renews and watches leases over a Registry.
Rule: no I/O and no data-plane imports here; time and randomness are injected.
Rule: whatever the datastore holds, parsing it raises ConfigError or nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Protocol

from .config import ConfigError

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_BACKEND_PORT",
    "SUBNETS_PREFIX",
    "SUBNET_TTL",
    "AcquireError",
    "CompactedError",
    "ConfigError",
    "ConfigMissing",
    "KeyValue",
    "Lease",
    "LeaseAttrs",
    "LeaseEvent",
    "LeaseEventKind",
    "LeaseWatcher",
    "NetworkConfig",
    "RandomSource",
    "Registry",
    "RegistryUnavailable",
    "SubnetManager",
    "WatchBatch",
    "WatchEvent",
    "WatchKind",
    "allocate_ipv6_subnet",
    "allocate_subnet",
    "format_lease_value",
    "format_subnet_key",
    "is_lease_compatible",
    "kv_to_lease",
    "parse_lease_value",
    "parse_network_config",
    "parse_subnet_key",
    "subnet_kv_key",
]

log = logging.getLogger(__name__)

CONFIG_KEY = "config"  # <prefix>/config
SUBNETS_PREFIX = "subnets/"  # <prefix>/subnets/<subnet-key>
SUBNET_TTL = 86400  # flannel's subnetTTL: 24 h, renewed by re-PUT on a fresh lease
DEFAULT_BACKEND_PORT = 8285  # flannel's udp defaultPort (packet.DEFAULT_PORT, not imported here)
RACE_RETRIES = 10  # flannel's raceRetries
MAX_CANDIDATES = 100  # allocation picks among at most this many lowest free subnets
UINT64 = (0, 2**64 - 1)
INT64 = (-(2**63), 2**63 - 1)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


# ---------------------------------------------------------------------------------------------
# The Registry seam: the narrow key-value view of etcd the manager needs (flannel's
# etcd.Registry).  Keys are relative to the prefix: "config" and "subnets/<a.b.c.d>-<len>".
# The real one is udpbackend.etcd.EtcdRegistry; tests use an in-memory fake.
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class LeaseAttrs:
    """The value stored at a subnet key (flannel's LeaseAttrs); a UDP node fills PublicIP only.
    Equality is on public_ip alone: it is all a UDP node routes by."""

    public_ip: ipaddress.IPv4Address
    extra: dict[str, object] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# Go encoding/json, as far as flannel's inputs need it: object keys match field names
# case-insensitively (the last duplicate wins), unknown keys are ignored, a type mismatch is
# an error, null leaves plain fields alone.  Everything wrong becomes one ConfigError line.
# ---------------------------------------------------------------------------------------------


class _JsonObject:
    """A decoded JSON object that keeps its key order and duplicates (Go's last-wins)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs

    def fields(self) -> dict[str, object]:
        """Folded key -> value; a later duplicate (in any case) overrides an earlier one."""
        return {_fold(k): v for k, v in self.pairs}


def _fold(key: str) -> str:
    # Go matches with bytes.EqualFold (simple Unicode folding): the Kelvin sign folds to "k"
    # under lower(), the long s does not, so it is mapped by hand.
    return key.lower().replace("\u017f", "s")


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid literal {name}")  # NaN/Infinity: Python accepts them, Go not


def _decode_json(raw: bytes | str, what: str) -> object:
    if isinstance(raw, bytes | bytearray | memoryview):
        # Go replaces invalid UTF-8 inside strings with U+FFFD; outside strings it is a
        # syntax error either way.
        text = bytes(raw).decode("utf-8", errors="replace")
    elif isinstance(raw, str):
        text = raw
    else:
        raise ConfigError(f"{what}: expected JSON text, got {type(raw).__name__}")
    try:
        return json.loads(text, object_pairs_hook=_JsonObject, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digits limit, nesting
        raise ConfigError(f"{what}: invalid JSON: {_one_line(str(exc))}") from None


def _plain(value: object) -> object:
    """A decoded JSON value with _JsonObject turned into dict (for LeaseAttrs.extra)."""
    if isinstance(value, _JsonObject):
        return {k: _plain(v) for k, v in value.pairs}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: object) -> str:
    """A user-supplied value for an error message: quoted, escaped, one line, bounded."""
    if isinstance(value, str):
        return repr(value[:64]) + ("…" if len(value) > 64 else "")
    return _one_line(repr(value), 80)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number " + _one_line(repr(value), 40)
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(value: object, where: str, go_type: str) -> ConfigError:
    return ConfigError(f"json: cannot unmarshal {_kind(value)} into {where} of type {go_type}")


def _parse_ipv4_text(text: str) -> IPv4Address | None:
    """Go's net.ParseIP(s).To4(): dotted quad, or an IPv4-mapped IPv6 form; else None."""
    if "%" in text:  # a zone: Python's IPv6Address takes one, Go's ParseIP does not
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    try:
        return IPv6Address(text).ipv4_mapped
    except ValueError:
        return None


def _split_cidr(text: str) -> tuple[str, int] | None:
    addr, sep, plen = text.partition("/")
    if not sep or not (plen.isascii() and plen.isdigit()) or len(plen) > 4:
        return None
    return addr, int(plen)


def _go_ipv4(fields: dict[str, object], name: str) -> IPv4Address | None:
    """An ip.IP4 field: absent -> None; anything but an IPv4 string (null too) -> error."""
    if name.lower() not in fields:
        return None
    value = fields[name.lower()]
    ip = _parse_ipv4_text(value) if isinstance(value, str) else None
    if ip is None:
        raise ConfigError(f"{name}: {_show(value)} is not an IPv4 address")
    return ip


def _go_ipv6(fields: dict[str, object], name: str) -> IPv6Address | None:
    """A *ip.IP6 field: absent or null -> None; else must be an IPv6 address string."""
    value = fields.get(name.lower())
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return IPv6Address(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}: {_show(value)} is not an IPv6 address")


def _go_bool(fields: dict[str, object], name: str, default: bool) -> bool:
    value = fields.get(name.lower())
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(value, f"Go struct field Config.{name}", "bool")
    return value


def _go_int(
    fields: dict[str, object], name: str, default: int, where: str, go_type: str, lo: int, hi: int
) -> int:
    value = fields.get(name.lower())
    if value is None:
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise _type_error(value, where, go_type)
    return value


# ---------------------------------------------------------------------------------------------
# Network config (flannel's subnet.Config: ParseConfig + CheckNetworkConfig, etcd mode)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    """The checked <prefix>/config, defaults filled in as flannel's CheckNetworkConfig does."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    enable_nftables: bool = False
    backend_type: str = "udp"
    backend_port: int = DEFAULT_BACKEND_PORT  # Backend.Port: the UDP port of every node
    backend: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def subnet_count(self) -> int:
        """How many subnets SubnetMin..SubnetMax spans (0 if Min > Max)."""
        size = 1 << (32 - self.subnet_len)
        return max(0, (int(self.subnet_max) - int(self.subnet_min)) // size + 1)


def _parse_network_field(fields: dict[str, object]) -> IPv4Network | None:
    if "network" not in fields:
        return None
    value = fields["network"]
    parts = _split_cidr(value) if isinstance(value, str) else None
    if parts is not None and parts[1] <= 32:
        try:
            return IPv4Network((IPv4Address(parts[0]), parts[1]), strict=False)
        except ValueError:
            pass
    raise ConfigError(f"Network: {_show(value)} is not an IPv4 CIDR (invalid CIDR address)")


def _parse_ipv6_network_field(fields: dict[str, object]) -> IPv6Network | None:
    if "ipv6network" not in fields:
        return None
    value = fields["ipv6network"]
    parts = _split_cidr(value) if isinstance(value, str) else None
    if parts is not None and parts[1] <= 128:
        try:
            return IPv6Network((IPv6Address(parts[0]), parts[1]), strict=False)
        except ValueError:
            pass
    raise ConfigError(f"IPv6Network: {_show(value)} is not an IPv6 CIDR (invalid CIDR address)")


def _check_ipv4(
    network: IPv4Network | None,
    subnet_len: int,
    smin: IPv4Address | None,
    smax: IPv4Address | None,
) -> tuple[IPv4Network, int, IPv4Address, IPv4Address]:
    """flannel's CheckNetworkConfig, IPv4 half, with its exact error texts."""
    if network is None or (int(network.network_address) == 0 and network.prefixlen == 0):
        raise ConfigError("please define a correct Network parameter in the flannel config")
    plen = network.prefixlen
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError("SubnetLen must be less than /31")
        if subnet_len < plen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif plen > 28:
        raise ConfigError("network is too small. Minimum useful network prefix is /28")
    else:
        subnet_len = 24 if plen <= 22 else plen + 2
    size = 1 << (32 - subnet_len)
    base = int(network.network_address)
    if smin is None or int(smin) == 0:
        smin = IPv4Address(base + size)
    elif smin not in network:
        raise ConfigError("SubnetMin is not in the range of the Network")
    if smax is None or int(smax) == 0:
        smax = IPv4Address(base + network.num_addresses - size)
    elif smax not in network:
        raise ConfigError("SubnetMax is not in the range of the Network")
    if int(smin) % size:
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {smin}")
    if int(smax) % size:
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {smax}")
    return network, subnet_len, smin, smax


def _check_ipv6(
    network: IPv6Network | None,
    subnet_len: int,
    smin: IPv6Address | None,
    smax: IPv6Address | None,
) -> tuple[IPv6Network, int, IPv6Address, IPv6Address]:
    """flannel's CheckNetworkConfig, IPv6 half, with its exact error texts."""
    if network is None or (int(network.network_address) == 0 and network.prefixlen == 0):
        raise ConfigError("please define a correct IPv6Network parameter in the flannel config")
    plen = network.prefixlen
    if subnet_len > 0:
        if subnet_len > 126:
            raise ConfigError("SubnetLen must be less than /127")
        if subnet_len < plen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif plen > 124:
        raise ConfigError("IPv6Network is too small. Minimum useful network prefix is /124")
    else:
        subnet_len = 64 if plen <= 62 else plen + 2
    size = 1 << (128 - subnet_len)
    base = int(network.network_address)
    if smin is None or int(smin) == 0:
        smin = IPv6Address(base + size)
    elif smin not in network:
        raise ConfigError("IPv6SubnetMin is not in the range of the IPv6Network")
    if smax is None or int(smax) == 0:
        smax = IPv6Address(base + network.num_addresses - size)
    elif smax not in network:
        raise ConfigError("IPv6SubnetMax is not in the range of the IPv6Network")
    if int(smin) % size:
        raise ConfigError(f"IPv6SubnetMin is not on a SubnetLen boundary: {smin}")
    if int(smax) % size:
        raise ConfigError(f"IPv6SubnetMax is not on a SubnetLen boundary: {smax}")
    return network, subnet_len, smin, smax


def _parse_backend(fields: dict[str, object]) -> tuple[str, int, dict[str, object]]:
    """(lower-cased type, udp port, the Backend object as a dict).  Absent Backend: udp."""
    if "backend" not in fields:
        return "udp", DEFAULT_BACKEND_PORT, {}
    value = fields["backend"]
    if value is None:  # Go keeps the raw "null": decodes to Type "", an unknown backend
        return "", DEFAULT_BACKEND_PORT, {}
    if not isinstance(value, _JsonObject):
        raise ConfigError(
            "error decoding Backend property of config: "
            + str(_type_error(value, "Go value", "struct { Type string }"))
        )
    backend = value.fields()
    btype = backend.get("type")
    if btype is not None and not isinstance(btype, str):
        raise ConfigError(
            "error decoding Backend property of config: "
            + str(_type_error(btype, "Go struct field .Type", "string"))
        )
    try:
        port = _go_int(
            backend, "Port", DEFAULT_BACKEND_PORT, "Go struct field .Port", "int", *INT64
        )
    except ConfigError as exc:
        raise ConfigError(f"Backend.Port: error decoding UDP backend config: {exc}") from None
    try:
        plain = _plain(value)
    except RecursionError:
        raise ConfigError("Backend: nested too deeply") from None
    assert isinstance(plain, dict)
    return (btype or "").lower(), port, plain


def parse_network_config(raw: bytes | str) -> NetworkConfig:
    """Decode and check <prefix>/config as flanneld does in etcd mode (Go JSON semantics,
    flannel's defaults and error texts), then require what this daemon can run: the udp
    backend on IPv4.  Any problem is one ConfigError line."""
    doc = _decode_json(raw, "network config")
    if doc is None:  # Go: unmarshalling null is a no-op, leaving the defaults
        doc = _JsonObject([])
    if not isinstance(doc, _JsonObject):
        raise ConfigError(
            f"json: cannot unmarshal {_kind(doc).split()[0]} into Go value of type subnet.Config"
        )
    f = doc.fields()
    enable_ipv4 = _go_bool(f, "EnableIPv4", True)
    enable_ipv6 = _go_bool(f, "EnableIPv6", False)
    enable_nft = _go_bool(f, "EnableNFTables", False)
    network = _parse_network_field(f)
    ipv6_network = _parse_ipv6_network_field(f)
    subnet_len = _go_int(f, "SubnetLen", 0, "Go struct field Config.SubnetLen", "uint", *UINT64)
    ipv6_subnet_len = _go_int(
        f, "IPv6SubnetLen", 0, "Go struct field Config.IPv6SubnetLen", "uint", *UINT64
    )
    smin = _go_ipv4(f, "SubnetMin")
    smax = _go_ipv4(f, "SubnetMax")
    smin6 = _go_ipv6(f, "IPv6SubnetMin")
    smax6 = _go_ipv6(f, "IPv6SubnetMax")
    btype, port, backend = _parse_backend(f)

    if enable_ipv4:
        network, subnet_len, smin, smax = _check_ipv4(network, subnet_len, smin, smax)
    if enable_ipv6:
        ipv6_network, ipv6_subnet_len, smin6, smax6 = _check_ipv6(
            ipv6_network, ipv6_subnet_len, smin6, smax6
        )
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("none defined stack")
    if not enable_ipv4:
        raise ConfigError("EnableIPv4: false is not supported: the udp backend forwards IPv4 only")
    if btype == "":
        raise ConfigError(
            'Backend.Type: unknown backend type: "" (this daemon runs only the udp backend)'
        )
    if btype != "udp":
        raise ConfigError(
            f"Backend.Type: backend type {_show(btype)} is not supported "
            "(this daemon runs only the udp backend)"
        )
    if not 1 <= port <= 65535:
        raise ConfigError(f"Backend.Port: {port} is not a UDP port (1..65535)")
    assert network is not None and smin is not None and smax is not None
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=smin,
        subnet_max=smax,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        ipv6_network=ipv6_network,
        ipv6_subnet_len=ipv6_subnet_len,
        ipv6_subnet_min=smin6,
        ipv6_subnet_max=smax6,
        enable_nftables=enable_nft,
        backend_type=btype,
        backend_port=port,
        backend=backend,
    )


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


# ---------------------------------------------------------------------------------------------
# Allocation (flannel's allocateSubnet)
# ---------------------------------------------------------------------------------------------


class RandomSource(Protocol):
    """What allocation needs from its random source: random.Random fits."""

    def randrange(self, stop: int, /) -> int: ...


def _free_subnets(
    first: int, last: int, length: int, bits: int, taken: Iterable[tuple[int, int]]
) -> list[int]:
    """The first MAX_CANDIDATES subnets of `length` from `first` (stepping by the subnet
    size, while <= last) that overlap no taken (address, prefixlen).  Overlap is flannel's:
    equal under the shorter mask.  Taken subnets as long as ours or longer block one
    candidate (a set lookup); shorter ones block a span that the walk jumps over."""
    size = 1 << (bits - length)
    mask = ((1 << bits) - 1) ^ (size - 1)
    blocked: set[int] = set()
    spans: list[tuple[int, int]] = []
    for addr, plen in taken:
        if plen >= length:
            blocked.add(addr & mask)
        else:
            span = 1 << (bits - plen)
            start = addr & ~(span - 1)
            spans.append((start, start + span - 1))
    spans.sort()
    free: list[int] = []
    cand, i = first, 0
    while cand <= last and len(free) < MAX_CANDIDATES:
        while i < len(spans) and spans[i][1] < cand:
            i += 1
        if i < len(spans) and spans[i][0] <= cand:
            cand += ((spans[i][1] - cand) // size + 1) * size
            continue
        if cand & mask not in blocked:
            free.append(cand)
        cand += size
    return free


def allocate_subnet(
    cfg: NetworkConfig, taken: Iterable[IPv4Network], rng: RandomSource
) -> IPv4Network:
    """A free IPv4 subnet: uniformly random among the (up to) 100 lowest free subnets of
    SubnetLen in SubnetMin..SubnetMax.  ConfigError("out of subnets") if there is none."""
    free = _free_subnets(
        int(cfg.subnet_min),
        int(cfg.subnet_max),
        cfg.subnet_len,
        32,
        ((int(n.network_address), n.prefixlen) for n in taken),
    )
    if not free:
        raise ConfigError("out of subnets")
    return IPv4Network((free[rng.randrange(len(free))], cfg.subnet_len))


def allocate_ipv6_subnet(
    cfg: NetworkConfig, taken: Iterable[IPv6Network], rng: RandomSource
) -> IPv6Network:
    """The same over IPv6SubnetMin..IPv6SubnetMax (only meaningful with EnableIPv6)."""
    if cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        raise ConfigError("out of subnets")
    free = _free_subnets(
        int(cfg.ipv6_subnet_min),
        int(cfg.ipv6_subnet_max),
        cfg.ipv6_subnet_len,
        128,
        ((int(n.network_address), n.prefixlen) for n in taken),
    )
    if not free:
        raise ConfigError("out of subnets")
    return IPv6Network((free[rng.randrange(len(free))], cfg.ipv6_subnet_len))


def is_lease_compatible(
    cfg: NetworkConfig, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
) -> bool:
    """flannel's isSubnetConfigCompat + isIPv6SubnetConfigCompat: in SubnetMin..SubnetMax
    with prefix SubnetLen; an IPv6 part only (and then in range) when EnableIPv6."""
    if not cfg.subnet_min <= subnet.network_address <= cfg.subnet_max:
        return False
    if subnet.prefixlen != cfg.subnet_len:
        return False
    if not cfg.enable_ipv6:
        return ipv6_subnet is None
    if ipv6_subnet is None or cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        return False
    if not cfg.ipv6_subnet_min <= ipv6_subnet.network_address <= cfg.ipv6_subnet_max:
        return False
    return ipv6_subnet.prefixlen == cfg.ipv6_subnet_len


# ---------------------------------------------------------------------------------------------
# The manager (flannel's LocalManager + WatchLeases over the Registry)
# ---------------------------------------------------------------------------------------------


class ConfigMissing(ConfigError):
    """<prefix>/config does not exist (yet): flanneld retries every second."""

    def __init__(self) -> None:
        super().__init__(
            "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
        )


class AcquireError(RuntimeError):
    """No subnet could be created: every attempt lost the creation race."""


class SubnetManager:
    """Acquire, renew and watch this node's subnet lease over a Registry.

    clock: seconds (any epoch; lease expirations are on it); rng: random.Random for the
    allocation pick; sleep: awaited between watch reconnects (asyncio.sleep in production);
    on_state: watch_leases' default connection-state callback.
    Registry errors other than those the watch handles propagate to the caller.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        clock: Callable[[], float],
        rng: RandomSource,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.registry = registry
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

    def renew_at(self, lease: Lease, margin_minutes: int) -> float | None:
        """When to renew: expiration - margin (on the clock); None for a reservation."""
        if lease.expiration is None:
            return None
        return lease.expiration - margin_minutes * 60

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
        4. RegistryUnavailable (or the stream ending): sleep 0.1 s doubling to 5 s, reset by
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
        backoff = BACKOFF_FIRST
        resume: int | None = None  # None: list first
        relisted = False  # a compaction already sent us to re-list, with no response since

        def succeeded(watch_response: bool) -> None:
            nonlocal connected, backoff, relisted
            if watch_response:  # a listing alone does not prove the watch can work
                backoff = BACKOFF_FIRST
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
                if connected:
                    connected = False
                    log.debug("subnet watch: registry unavailable: %s", exc)
                    if on_state is not None:
                        on_state(False)
            await self.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
