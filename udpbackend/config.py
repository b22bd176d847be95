"""Static node configuration (the `run` flags without etcd): parse and check the overlay
network, this node's subnet and its peers.  Pure: no I/O beyond reading a peers file,
and every problem is one ConfigError with a one-line message naming the flag.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .packet import DEFAULT_PORT

MODES = ("batched", "per-packet", "python")


class ConfigError(ValueError):
    """Bad configuration; str() is a one-line message for the user."""


@dataclass(frozen=True)
class Peer:
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address


@dataclass
class NodeConfig:
    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Network
    peers: list[Peer] = field(default_factory=list)
    port: int = DEFAULT_PORT
    mode: str = "batched"

    @property
    def tun_address(self) -> ipaddress.IPv4Address:
        """flannel gives the TUN the subnet's network address, as a /32."""
        return self.subnet.network_address


def parse_cidr(text: str, what: str) -> ipaddress.IPv4Network:
    """An IPv4 CIDR; host bits are masked off as flannel does (10.5.3.0/16 -> 10.5.0.0/16)."""
    if "/" not in text:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 CIDR (expected a.b.c.d/len)")
    try:
        return ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 CIDR (expected a.b.c.d/len)") from None


def parse_ip(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IPv4 address") from None


def parse_peer(text: str, what: str = "--peer") -> Peer:
    """``SUBNET=PUBLIC_IP``."""
    subnet, sep, ip = text.partition("=")
    if not sep:
        raise ConfigError(f"{what}: {text!r} is not SUBNET=PUBLIC_IP")
    return Peer(parse_cidr(subnet, what), parse_ip(ip, what))


def read_peers_file(path: str) -> list[Peer]:
    """One ``SUBNET=PUBLIC_IP`` per line; blank lines and ``#`` comments are ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--peers-file: cannot read {path}: {e.strerror}") from None
    peers = []
    for no, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            peers.append(parse_peer(line, f"--peers-file {path}:{no}"))
    return peers


def build_config(
    network: str,
    subnet: str,
    peers: Iterable[Peer],
    port: int = DEFAULT_PORT,
    mode: str = "batched",
) -> NodeConfig:
    """Check everything that can be checked without touching the system."""
    net = parse_cidr(network, "--network")
    own = parse_cidr(subnet, "--subnet")
    if not own.subnet_of(net):
        raise ConfigError(f"--subnet: {own} is not inside --network {net}")
    if own == net:
        raise ConfigError(f"--subnet: {own} is the whole --network; it must be a part of it")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: {port} is not a UDP port (1..65535)")
    if mode not in MODES:
        raise ConfigError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    peer_list = list(peers)
    for p in peer_list:
        if not p.subnet.subnet_of(net):
            raise ConfigError(f"peer {p.subnet}: not inside --network {net}")
        if p.subnet.overlaps(own):
            raise ConfigError(f"peer {p.subnet}: overlaps this node's --subnet {own}")
    # Sorted by start address, a subnet overlaps an earlier one iff it starts before the
    # furthest end seen so far: O(n log n) for the 10,000-route tables.
    ordered = sorted(peer_list, key=lambda p: (int(p.subnet.network_address), p.subnet.prefixlen))
    last: Peer | None = None
    for p in ordered:
        if last is not None and int(p.subnet.network_address) <= int(last.subnet.broadcast_address):
            if p.subnet == last.subnet:
                raise ConfigError(f"peer {p.subnet}: duplicate subnet")
            raise ConfigError(f"peer {p.subnet}: overlaps peer {last.subnet}")
        if last is None or p.subnet.broadcast_address > last.subnet.broadcast_address:
            last = p
    return NodeConfig(net, own, peer_list, port, mode)
