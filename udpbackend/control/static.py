"""The static subnet manager: a node run from flags instead of a datastore (--network,
--subnet, --peer, --peers-file), parsed and checked here, then served to the lifecycle as
StaticManager.  No I/O beyond reading a peers file; every problem is one ConfigError line.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ..errors import ConfigError
from ..options import MODES
from .lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventKind, subnet_kv_key
from .network import DEFAULT_BACKEND_PORT as DEFAULT_PORT
from .network import NetworkConfig


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


class StaticManager:
    """The subnet manager of a node run from flags (control.manager.SubnetManager): the
    network and this node's subnet from --network/--subnet, the peers from --peer and
    --peers-file, once; nothing to renew, no datastore to lose."""

    kind = "static"

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.on_state: Callable[[bool], None] | None = None

    async def get_network_config(self) -> NetworkConfig:
        net = self.cfg.network
        return NetworkConfig(
            network=net,
            subnet_len=self.cfg.subnet.prefixlen,
            subnet_min=net.network_address,
            subnet_max=net.broadcast_address,
            backend_port=self.cfg.port,
        )

    async def stored_public_ip(self) -> IPv4Address | None:
        return None

    async def acquire_lease(
        self, cfg: NetworkConfig, public_ip: IPv4Address, prev_subnet: IPv4Network | None
    ) -> Lease:
        return self._lease(self.cfg.subnet, public_ip)

    @staticmethod
    def _lease(subnet: IPv4Network, public_ip: IPv4Address) -> Lease:
        return Lease(subnet, LeaseAttrs(public_ip), None, subnet_kv_key(subnet))

    async def watch_leases(
        self,
        own_subnet: IPv4Network | None,
        *,
        on_own: Callable[[LeaseEvent], None] | None = None,
    ) -> AsyncIterator[list[LeaseEvent]]:
        yield [
            LeaseEvent(LeaseEventKind.ADDED, self._lease(p.subnet, p.public_ip))
            for p in self.cfg.peers
        ]
        await asyncio.Event().wait()  # the peers never change

    def renew_at(self, lease: Lease) -> float | None:
        return None

    async def renew_lease(self, lease: Lease) -> Lease:
        return lease

    async def complete_lease(self, lease: Lease) -> None:
        return None

    async def close(self) -> None:
        return None
