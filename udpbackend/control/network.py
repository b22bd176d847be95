"""The network config (flannel's subnet.Config: ParseConfig + CheckNetworkConfig), as
etcd's <prefix>/config and kube's net-conf.json hold it.  Pure: whatever the input,
parse_network_config returns a NetworkConfig or raises ConfigError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ..errors import ConfigError
from .gojson import (
    INT64,
    UINT64,
    _decode_json,
    _go_bool,
    _go_int,
    _go_ipv4,
    _go_ipv6,
    _JsonObject,
    _kind,
    _plain,
    _show,
    _split_cidr,
    _type_error,
)

log = logging.getLogger(__name__)

DEFAULT_BACKEND_PORT = 8285  # flannel's udp defaultPort (packet.DEFAULT_PORT, not imported here)


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


def parse_network_config(raw: bytes | str, *, kube: bool = False) -> NetworkConfig:
    """Decode and check <prefix>/config as flanneld does in etcd mode (Go JSON semantics,
    flannel's defaults and error texts), then require what this daemon can run: the udp
    backend on IPv4.  kube: net-conf.json, where flannel leaves SubnetLen/Min/Max unchecked
    (kube-controller-manager allocates): only a Network is required.  Any problem is one
    ConfigError line."""
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

    if enable_ipv4 and kube:
        if network is None or (int(network.network_address) == 0 and network.prefixlen == 0):
            raise ConfigError("please define a correct Network parameter in the flannel config")
        subnet_len = subnet_len or 24
        smin, smax = smin or network.network_address, smax or network.broadcast_address
    elif enable_ipv4:
        network, subnet_len, smin, smax = _check_ipv4(network, subnet_len, smin, smax)
    if enable_ipv6 and not kube:
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
