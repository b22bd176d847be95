"""The data plane's UDP sockets: one per queue, bound to the external address with large
buffers, several joined in an SO_REUSEPORT group steered by inner flow.  Must not: send or
receive (the pumps do) or choose the address (the node does).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from ..errors import StartupError

log = logging.getLogger("udpbackend")

# Socket buffers, measured (2-node netns, batched with offloads, iperf3 4 s, 2 runs each):
# 256 KiB 5.2-6.3 Gbit/s with ~10^5 TCP retransmits, 1 MiB 7.2-7.5 with 1.7k-11k, 4 MiB 7.3 with
# none, 16 MiB 6.9-7.3 with none: 4 MiB is the smallest without drops.
SOCKET_BUFFER = 4 << 20


def open_udp_socket(
    address: ipaddress.IPv4Address, port: int, reuseport: bool = False
) -> socket.socket:
    """Non-blocking UDP socket bound to address:port with large buffers; ``reuseport``: a
    member of an SO_REUSEPORT group (one per queue)."""
    s = socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((str(address), port))
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"UDP port {port} on {address} is already in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot bind UDP {address}:{port}: address not local") from None
        raise StartupError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    return s


def open_udp_sockets(address: ipaddress.IPv4Address, port: int, n: int) -> list[socket.socket]:
    """One socket per queue.  Several form an SO_REUSEPORT group (bound in queue order) with
    fp_reuseport_steer attached, so each inner flow reaches one queue; if the kernel refuses
    the program, its own 4-tuple hash picks (every datagram from one peer on one queue)."""
    if n == 1:
        return [open_udp_socket(address, port)]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(open_udp_socket(address, port, reuseport=True))
        from . import fastpath

        try:
            fastpath.reuseport_steer(socks[0], n)
        except OSError as e:
            log.info("ingress flow steering refused (%s): the kernel spreads by peer", e.strerror)
    except BaseException:
        for sk in socks:
            sk.close()
        raise
    return socks
