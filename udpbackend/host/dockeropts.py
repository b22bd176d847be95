"""`udpbackend docker-opts`: subnet.env turned into docker daemon options, as flannel's
mk-docker-opts.sh does it (same flags, variable names, order and quoting), so docker's
`--bip=$FLANNEL_SUBNET` set-up carries over.  Must not: start or configure docker itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .subnetenv import parse_subnet_env

DEFAULT_FLANNEL_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"


@dataclass(frozen=True)
class DockerOpts:
    individual: bool = True  # -i: DOCKER_OPT_BIP="..." lines
    combined: bool = True  # -c: one KEY="..." line
    key: str = DEFAULT_KEY  # -k
    ip_masq: bool = True  # -m turns it off: no --ip-masq option


def flannel_values(text: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The FLANNEL_* values the script sees: the environment's, overridden by the file's
    (it sources the file); a missing file (None) leaves the environment's alone."""
    values = {k: v for k, v in environ.items() if k.startswith("FLANNEL_")}
    if text is not None:
        values.update(parse_subnet_env(text))
    return values


def render(values: Mapping[str, str], opts: DockerOpts, environ: Mapping[str, str]) -> str:
    """The docker env file's text.  ConfigError for an FLANNEL_IPMASQ that is neither true
    nor false (the script exits 1 before writing anything)."""
    found: dict[str, str] = {}
    if values.get("FLANNEL_SUBNET"):
        found["DOCKER_OPT_BIP"] = f"--bip={values['FLANNEL_SUBNET']}"
    if values.get("FLANNEL_MTU"):
        found["DOCKER_OPT_MTU"] = f"--mtu={values['FLANNEL_MTU']}"
    masq = values.get("FLANNEL_IPMASQ", "")
    if masq and opts.ip_masq:
        if masq not in ("true", "false"):
            raise ConfigError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
        # flannel masquerades already: docker must not, and the other way round
        found["DOCKER_OPT_IPMASQ"] = "--ip-masq=false" if masq == "true" else "--ip-masq=true"
    combined = environ.get(opts.key, "")
    if combined:
        combined += " "
    lines = []
    for name in sorted(found):  # `set | grep DOCKER_OPT_` lists them sorted
        if opts.individual:
            lines.append(f'{name}="{found[name]}"')
        combined += f" {found[name]}"
    if opts.combined:
        lines.append(f'{opts.key}="{combined}"')
    return "".join(line + "\n" for line in lines)


def bridge_subnet(values: Mapping[str, str]) -> ipaddress.IPv4Network | None:
    """The subnet docker's bridge will own (FLANNEL_SUBNET's network), if any."""
    value = values.get("FLANNEL_SUBNET", "")
    try:
        return ipaddress.IPv4Network(value, strict=False) if value else None
    except ValueError:
        return None


def conflicting_route(subnet: ipaddress.IPv4Network) -> str | None:
    """A route to exactly that subnet through a gateway already in the main table (the
    script refuses to go on then), as `ip route` would print it; None if there is none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for r in ipr.get_routes(family=2, table=254):
            gw = r.get_attr("RTA_GATEWAY")
            dst = r.get_attr("RTA_DST")
            if gw is None or dst != str(subnet.network_address):
                continue
            if r["dst_len"] != subnet.prefixlen:
                continue
            dev = ipr.get_links(r.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
            return f"{subnet} via {gw} dev {dev}"
    return None
