"""Where subnet.env becomes a pod network: the configuration flannel's CNI plugin derives from
it and hands to its delegate (bridge cni0 + host-local), for Debian's containernetworking-
plugins, which lack the flannel meta-plugin.  Pure; `udpbackend cni-config` prints it.
Must not: run a plugin or touch a namespace (the lab and container runtimes do).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .subnetenv import parse_subnet_env

DEFAULT_NAME = "cbr0"  # kube-flannel.yml's network name
CNI_VERSION = "0.3.1"  # kube-flannel.yml's cni-conf.json


@dataclass(frozen=True)
class FlannelEnv:
    """subnet.env as flannel's CNI plugin reads it (loadFlannelSubnetEnv)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    subnet: ipaddress.IPv4Network | None
    ipv6_subnet: ipaddress.IPv6Network | None
    mtu: int
    ip_masq: bool


def _cidr(key: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)  # Go's ParseCIDR: masked
    except ValueError:
        raise ConfigError(f"subnet.env: {key}={text!r} is not a CIDR") from None


def read_flannel_env(text: str, path: str = "subnet.env") -> FlannelEnv:
    """ConfigError naming what is missing, in the plugin's words ("... is missing ...")."""
    env = parse_subnet_env(text)
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for key in ("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"):
        for part in filter(None, env.get(key, "").split(",")):
            net = _cidr(key, part)
            if net not in nets:
                nets.append(net)
    sn = _cidr("FLANNEL_SUBNET", env["FLANNEL_SUBNET"]) if env.get("FLANNEL_SUBNET") else None
    sn6 = (
        _cidr("FLANNEL_IPV6_SUBNET", env["FLANNEL_IPV6_SUBNET"])
        if env.get("FLANNEL_IPV6_SUBNET")
        else None
    )
    missing = []
    if not nets:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if sn is None and sn6 is None:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    if not env.get("FLANNEL_MTU", "").isdigit():
        missing.append("FLANNEL_MTU")
    if "FLANNEL_IPMASQ" not in env:
        missing.append("FLANNEL_IPMASQ")
    if missing:
        raise ConfigError(f"{path} is missing {', '.join(missing)}")
    if sn is not None and not isinstance(sn, ipaddress.IPv4Network):
        raise ConfigError(f"{path}: FLANNEL_SUBNET is not IPv4")
    if sn6 is not None and not isinstance(sn6, ipaddress.IPv6Network):
        raise ConfigError(f"{path}: FLANNEL_IPV6_SUBNET is not IPv6")
    return FlannelEnv(
        tuple(nets), sn, sn6, int(env["FLANNEL_MTU"]), env["FLANNEL_IPMASQ"] == "true"
    )


def delegate_config(
    fenv: FlannelEnv,
    *,
    name: str = DEFAULT_NAME,
    cni_version: str = CNI_VERSION,
    delegate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What flannel's plugin passes its delegate (doCmdAdd): type bridge (bridge cni0 by the
    bridge plugin's default), ipMasq only where flannel does not masquerade, the pod MTU
    from FLANNEL_MTU, isGateway, host-local over FLANNEL_SUBNET with a route to the whole
    network.  `delegate` is the conflist's "delegate" object (hairpinMode,
    isDefaultGateway ...); keys it sets are kept, as the plugin keeps them."""
    d: dict[str, Any] = dict(delegate or {})
    d["name"] = name
    d.setdefault("type", "bridge")
    d.setdefault("ipMasq", not fenv.ip_masq)
    d.setdefault("mtu", fenv.mtu)
    if d["type"] == "bridge":
        d.setdefault("isGateway", True)
    if cni_version:
        d["cniVersion"] = cni_version
    ranges = [[{"subnet": str(sn)}] for sn in (fenv.subnet, fenv.ipv6_subnet) if sn is not None]
    d["ipam"] = {
        "type": "host-local",
        "ranges": ranges,
        "routes": [{"dst": str(net)} for net in fenv.networks],
    }
    return d
