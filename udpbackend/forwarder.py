"""Event-loop glue of the data plane: watch the TUN fd and the UDP socket with
``loop.add_reader`` and call the pump with a packet budget on each wake-up.
Knows fds and a pump, nothing of TUN set-up, routes' origin or etcd; never blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("udpbackend")

# Packets one callback may move before it yields to the loop: 4 batches.  Readers are
# level-triggered, so what is left is picked up on the next loop iteration, after the other
# fd and the control plane have had their turn.
DEFAULT_BUDGET = 256


class PumpLike(Protocol):
    def tun_to_udp(self, budget: int) -> int: ...
    def udp_to_tun(self, budget: int) -> int: ...


class Forwarder:
    """Drives one pump from one event loop: the TUN fd and the UDP fd as level-triggered
    readers. ``on_error`` gets an fd-level ``OSError`` (the forwarder has stopped by then)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pump: PumpLike,
        tun_fd: int,
        udp_fd: int,
        budget: int = DEFAULT_BUDGET,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self.loop = loop
        self.pump = pump
        self.tun_fd = tun_fd
        self.udp_fd = udp_fd
        self.budget = budget
        self.on_error = on_error
        self.running = False

    def start(self) -> None:
        self.loop.add_reader(self.tun_fd, self._on_tun)
        self.loop.add_reader(self.udp_fd, self._on_udp)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.loop.remove_reader(self.tun_fd)
            self.loop.remove_reader(self.udp_fd)
            self.running = False

    def _on_tun(self) -> None:
        try:
            self.pump.tun_to_udp(self.budget)
        except OSError as e:
            self._fail("TUN -> UDP", e)

    def _on_udp(self) -> None:
        try:
            self.pump.udp_to_tun(self.budget)
        except OSError as e:
            self._fail("UDP -> TUN", e)

    def _fail(self, where: str, e: OSError) -> None:
        self.stop()
        log.error("%s stopped: %s", where, e.strerror or e)
        if self.on_error:
            self.on_error(e)
