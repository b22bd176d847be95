"""Round-trip time: where the RTT is measured (ping from node a to the rung's address).

Lives here: the ping under load (every 10 ms during the single TCP stream, its ramp-up
skipped), the idle ping (after the TCP runs, while the daemons rewrite their stats file) and
the "ping" document (p50, p99, avg, min, max). Must not: run iperf3 or read counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..tools import PingResult
from .settings import Settings

if TYPE_CHECKING:
    from ..testbed import Testbed

# iperf3 takes ~0.1 s to connect and ramp up: the first replies of the loaded ping are not
# "loaded" yet
LOADED_RAMP_S = 0.2


def ping_doc(res: PingResult, skip: int = 0) -> dict[str, Any]:
    """A ping's figures; skip: leave out the first replies (when more than 10 remain)."""
    rtts = res.rtts_ms[skip:] if len(res.rtts_ms) > skip + 10 else res.rtts_ms
    r = PingResult(res.dst, res.sent, rtts)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        "sent": res.sent,
        "received": res.received,
        "p50_ms": num(r.p50_ms),
        "p99_ms": num(r.percentile_ms(99)),
        "avg_ms": num(r.avg_ms),
        "min_ms": num(r.min_ms),
        "max_ms": num(r.max_ms),
    }


def start_loaded(tb: Testbed, dst: str, s: Settings) -> Callable[[], PingResult]:
    """Start the ping that runs alongside the single TCP stream; returns its waiter."""
    count = max(10, int(s.tcp_seconds / s.loaded_ping_interval))
    return tb.ping_start("a", dst, count=count, interval=s.loaded_ping_interval)


def loaded_doc(res: PingResult, s: Settings) -> dict[str, Any]:
    return ping_doc(res, skip=int(LOADED_RAMP_S / s.loaded_ping_interval))


def start_idle(tb: Testbed, dst: str, s: Settings) -> Callable[[], PingResult]:
    """Start the idle ping (s.pings_idle replies, every s.ping_interval); returns its waiter."""
    return tb.ping_start("a", dst, count=s.pings_idle, interval=s.ping_interval)
