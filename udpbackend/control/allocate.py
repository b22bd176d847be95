"""Subnet allocation (flannel's allocateSubnet) and the check that a lease fits the
network config.  Pure: randomness is injected, nothing is read or written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from ..errors import ConfigError
from .network import (
    NetworkConfig,
)

log = logging.getLogger(__name__)

MAX_CANDIDATES = 100  # allocation picks among at most this many lowest free subnets


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
