"""External interface selection, as flanneld does it: by --iface (name or IPv4 address), by
--public-ip, or the interface of the default route; gives the bind address and the MTU.
Reads netlink only; it creates and changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute


class IfaceError(RuntimeError):
    """No usable external interface (message says why, in one line)."""


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    address: ipaddress.IPv4Address  # the UDP socket binds here
    mtu: int


def _first_ipv4(ipr: IPRoute, index: int) -> ipaddress.IPv4Address | None:
    addrs = [a for a in ipr.get_addr(family=2, index=index)]
    # global scope (0) before link scope (253); flanneld prefers global addresses
    addrs.sort(key=lambda a: a["scope"])
    for a in addrs:
        if a["scope"] in (0, 253):
            return ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS"))
    return None


def _by_index(ipr: IPRoute, index: int, address: ipaddress.IPv4Address | None) -> ExternalInterface:
    link = ipr.get_links(index)[0]
    name = link.get_attr("IFLA_IFNAME")
    mtu = link.get_attr("IFLA_MTU") or 0
    if address is None:
        address = _first_ipv4(ipr, index)
        if address is None:
            raise IfaceError(f"failed to find IPv4 address for interface {name}")
    if mtu <= 0:
        raise IfaceError(f"interface {name} reports MTU 0")
    return ExternalInterface(name, index, address, mtu)


def _index_of_address(ipr: IPRoute, address: ipaddress.IPv4Address) -> int | None:
    for a in ipr.get_addr(family=2):
        if a.get_attr("IFA_ADDRESS") == str(address):
            return int(a["index"])
    return None


def _by_regex(ipr: IPRoute, pattern: str) -> ExternalInterface | None:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise IfaceError(f"--iface-regex {pattern!r}: {e}") from None
    # flanneld matches the regex against IPv4 addresses first, then interface names
    for a in ipr.get_addr(family=2):
        addr = a.get_attr("IFA_ADDRESS")
        if addr and rx.search(addr):
            return _by_index(ipr, int(a["index"]), ipaddress.IPv4Address(addr))
    for link in ipr.get_links():
        if rx.search(link.get_attr("IFLA_IFNAME") or ""):
            try:
                return _by_index(ipr, int(link["index"]), None)
            except IfaceError:
                continue
    return None


def _by_name_or_ip(ipr: IPRoute, iface: str) -> ExternalInterface | None:
    try:
        addr = ipaddress.IPv4Address(iface)
    except ValueError:
        found = ipr.link_lookup(ifname=iface)
        return _by_index(ipr, found[0], None) if found else None
    index = _index_of_address(ipr, addr)
    return _by_index(ipr, index, addr) if index is not None else None


def find_interface(
    ifaces: Sequence[str] = (),
    regexes: Sequence[str] = (),
    can_reach: str | None = None,
    public_ip: ipaddress.IPv4Address | None = None,
) -> ExternalInterface:
    """Select the external interface as flanneld does: each --iface (name or IPv4) in order,
    then each --iface-regex, then --iface-can-reach; with none of them, the interface holding
    --public-ip, else the one carrying the IPv4 default route."""
    with IPRoute() as ipr:
        if ifaces or regexes or can_reach:
            for name in ifaces:
                found = _by_name_or_ip(ipr, name)
                if found:
                    return found
            for pattern in regexes:
                found = _by_regex(ipr, pattern)
                if found:
                    return found
            if can_reach:
                try:
                    ipaddress.IPv4Address(can_reach)
                    route = ipr.route("get", dst=can_reach)[0]
                except (ValueError, OSError) as e:
                    raise IfaceError(f"--iface-can-reach {can_reach}: {e}") from None
                src = route.get_attr("RTA_PREFSRC")
                return _by_index(
                    ipr, route.get_attr("RTA_OIF"), ipaddress.IPv4Address(src) if src else None
                )
            wanted = ", ".join([*ifaces, *regexes])
            raise IfaceError(f"failed to find an interface matching {wanted}")
        if public_ip is not None:
            index = _index_of_address(ipr, public_ip)
            if index is None:
                raise IfaceError(
                    f"no local interface has --public-ip {public_ip}; pass --iface as well"
                )
            return _by_index(ipr, index, public_ip)
        for r in ipr.get_routes(family=2, table=254):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF"):
                return _by_index(ipr, r.get_attr("RTA_OIF"), None)
        raise IfaceError("failed to get default interface: no IPv4 default route; use --iface")
