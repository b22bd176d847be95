"""The TUN device: open /dev/net/tun (IFF_TUN|IFF_NO_PI, non-blocking) and configure it as
flannel's UDP backend does (<subnet address>/32, MTU, up, one route for the whole network).
The only code that needs CAP_NET_ADMIN; it knows nothing of packets, peers or etcd.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
# TUNSETOFFLOAD bits: what the kernel may hand us unsegmented / with a partial checksum.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_USO4 = 0x20  # kernel >= 6.2

# The TUN queue between the kernel and our reads. Measured (2-node netns, iperf3 4 s): it
# matters for the per-packet loop - 100: 68.9k TCP retransmits, 500: 12.1k, 1000: 3.2k at
# 1.3-1.4 Gbit/s, 5000: none but 1.05 Gbit/s and up to ~40 ms of queue - and not for the
# offload path, whose queue holds super-packets (no retransmits at any length).
TXQUEUELEN = 1000


log = logging.getLogger("udpbackend")


class TunError(RuntimeError):
    """The TUN device could not be created or configured (message says why, in one line)."""


@dataclass
class Tun:
    fds: tuple[int, ...]  # one per queue (IFF_MULTI_QUEUE when more than one)
    name: str
    index: int
    vnet: bool = False  # IFF_VNET_HDR: every read/write carries a virtio-net header
    offloads: tuple[str, ...] = ()  # what TUNSETOFFLOAD accepted

    @property
    def fd(self) -> int:
        """The first queue's fd (the only one of a single-queue TUN)."""
        return self.fds[0] if self.fds else -1

    def close(self) -> None:
        """Close the fds; the device is not persistent, so the kernel removes it and its route
        with the last one."""
        _close_all(self.fds)
        self.fds = ()


def open_tun(name: str, vnet: bool = False, multi_queue: bool = False) -> tuple[int, str]:
    """Create (or attach to) TUN ``name``; returns a non-blocking, close-on-exec fd and the
    name the kernel gave (``name`` may hold ``%d``).  ``vnet``: with IFF_VNET_HDR;
    ``multi_queue``: IFF_MULTI_QUEUE, each further open of the same name adds a queue."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if not os.path.exists(TUN_DEVICE):
        raise TunError(f"{TUN_DEVICE} is missing (containers need --device {TUN_DEVICE})")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as e:
        raise TunError(f"cannot open {TUN_DEVICE}: {e.strerror} (run as root)") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        flags |= IFF_MULTI_QUEUE if multi_queue else 0
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        hint = " (needs CAP_NET_ADMIN: run as root)" if e.errno == 1 else ""
        raise TunError(f"cannot create TUN device {name}: {e.strerror}{hint}") from None
    return fd, ifr[:IFNAMSIZ].rstrip(b"\0").decode()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_queues(name: str, queues: int, vnet: bool) -> tuple[list[int], str]:
    """``queues`` fds of one TUN (IFF_MULTI_QUEUE when more than one); all or none."""
    fd, real = open_tun(name, vnet=vnet, multi_queue=queues > 1)
    fds = [fd]
    try:
        for _ in range(queues - 1):
            fds.append(open_tun(real, vnet=vnet, multi_queue=True)[0])
    except BaseException:
        _close_all(fds)
        raise
    return fds, real


def _sysctl(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        return False
    return True


def _tune_sysctls(name: str) -> None:
    # Without this the kernel sends router solicitations and MLD reports into the data path
    # (a kernel without IPv6 has nothing to silence: failure is fine).
    _sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    # The ICMP errors the data plane writes into the TUN come from the TUN's own address;
    # without accept_local the kernel drops them as martians and the sender never learns
    # of the unreachable network or the expired TTL.
    # In a container /proc/sys is read-only (kube-flannel.yml runs flanneld unprivileged):
    # forwarding does not need the sysctl, so a node there runs, said once and loudly.
    path = f"/proc/sys/net/ipv4/conf/{name}/accept_local"
    if not _sysctl(path, "1") and _read(path) != "1":
        log.warning(
            "cannot set net.ipv4.conf.%s.accept_local=1 (/proc/sys read-only?): ICMP errors "
            "the data plane generates will not reach senders on this host; set "
            "net.ipv4.conf.default.accept_local=1 before the node starts to have them",
            name,
        )


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def set_offloads(fd: int) -> tuple[str, ...]:
    """Ask for checksum + TSO4 (+ USO4 where the kernel has it) on a vnet TUN; returns what
    was accepted, () if nothing was."""
    for bits, names in (
        (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4, ("csum", "tso4", "uso4")),
        (TUN_F_CSUM | TUN_F_TSO4, ("csum", "tso4")),
    ):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, bits)
        except OSError:
            continue
        return names
    return ()


def create_tun(
    name: str,
    address: ipaddress.IPv4Address,
    network: ipaddress.IPv4Network,
    mtu: int,
    offload: bool = False,
    queues: int = 1,
) -> Tun:
    """Open and configure the TUN: ``address``/32, ``mtu``, txqueuelen, IPv6 off, up, and a
    route for ``network`` through it (an existing identical route is fine).  ``offload``:
    open it with virtio-net headers and TSO; if the kernel refuses, without them.
    ``queues`` > 1: a multi-queue TUN with that many fds (the kernel keeps a flow on one)."""
    fds, real = open_queues(name, queues, vnet=offload)
    offloads: tuple[str, ...] = ()
    if offload:
        offloads = set_offloads(fds[0])
        if not offloads:  # a vnet TUN without offloads only costs: start again without
            _close_all(fds)
            fds, real = open_queues(name, queues, vnet=False)
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=real)[0]
            _tune_sysctls(real)
            ipr.link("set", index=index, mtu=mtu, txqlen=TXQUEUELEN)
            ipr.addr("add", index=index, address=str(address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            try:
                ipr.route("add", dst=str(network), oif=index)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise
    except NetlinkError as e:
        _close_all(fds)
        raise TunError(f"cannot configure {real}: {os.strerror(e.code)}") from None
    except BaseException:
        _close_all(fds)
        raise
    return Tun(tuple(fds), real, index, vnet=bool(offloads), offloads=offloads)
