"""External interface selection, as flanneld does it: by --iface (name or IPv4 address), by
--public-ip, or the interface of the default route; gives the bind address and the MTU.
Reads netlink only; it creates and changes nothing.
"""

from __future__ import annotations

import ipaddress
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


def find_interface(
    iface: str | None = None, public_ip: ipaddress.IPv4Address | None = None
) -> ExternalInterface:
    """Select the external interface: ``iface`` (name or IPv4), else the one holding
    ``public_ip``, else the one carrying the IPv4 default route."""
    with IPRoute() as ipr:
        if iface:
            try:
                addr = ipaddress.IPv4Address(iface)
            except ValueError:
                found = ipr.link_lookup(ifname=iface)
                if not found:
                    raise IfaceError(f"no interface named {iface!r}") from None
                return _by_index(ipr, found[0], None)
            index = _index_of_address(ipr, addr)
            if index is None:
                raise IfaceError(f"no interface has the address {addr}")
            return _by_index(ipr, index, addr)
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
