"""Is the path empty again? The previous run's backlog, read from counters before the next run.

A UDP probe that overloads the path leaves datagrams queued behind it (TUN queues, the
daemons' socket buffers) that keep arriving after iperf3 has ended. Lives here: waiting until
no interface in the testbed moved a packet for a short window (before every UDP probe), and
the drain before a run is tried again: the daemons' own counters at rest, then a ping that must
get through. Must not: run iperf3 or judge a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..addressing import NODES
from ..errors import TestbedError
from .counters import snapshot

if TYPE_CHECKING:
    from ..daemons import Node
    from ..testbed import Testbed

QUIET_WINDOW_S = 0.05  # no packet on any interface for this long: the backlog is gone
QUIET_LIMIT_S = 3.0  # give up waiting (the next run then shares the path with the rest)
DRAIN_LIMIT_S = 10.0  # before a retry: the daemons' counters must come to rest within this
SETTLE_S = 0.5  # before a retry on a kernel rung (no daemon counters): let queues empty


def link_packets(tb: Testbed) -> dict[tuple[str, str], tuple[int, int]]:
    """(node, interface) -> (rx, tx) packets, from /proc/net/dev inside each node's netns."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for node in NODES:
        with tb.in_netns(node), open("/proc/thread-self/net/dev") as f:
            lines = f.readlines()[2:]
        for line in lines:
            name, _, rest = line.partition(":")
            cols = rest.split()
            if len(cols) >= 10:
                out[(node, name.strip())] = (int(cols[1]), int(cols[9]))
    return out


def wait_quiet(tb: Testbed, window: float = QUIET_WINDOW_S, limit: float = QUIET_LIMIT_S) -> float:
    """Wait until no interface of the testbed moved a packet for `window` seconds, at most
    `limit`; returns the seconds waited (a full `window` when the path was already quiet)."""
    start = time.monotonic()
    last, since = link_packets(tb), start
    while True:
        time.sleep(0.01)
        counts, now = link_packets(tb), time.monotonic()
        if counts != last:
            last, since = counts, now
        if now - since >= window or now - start >= limit:
            return round(now - start, 3)


def _daemon_packets(nodes: Sequence[Node]) -> list[tuple[int, ...]]:
    """Per daemon, from a stats file written after this call: packets in and out both ways."""
    out = []
    for doc in snapshot(nodes).docs:
        st = doc.get("stats", {})
        eg, ing = st.get("egress", {}), st.get("ingress", {})
        out.append(tuple(d.get(k, 0) for d in (eg, ing) for k in ("rx_packets", "tx_packets")))
    return out


def drain(tb: Testbed, dst: str, nodes: Sequence[Node]) -> dict[str, Any]:
    """Before a run is tried again: wait until the path has drained, then check it works.

    Daemon rungs: until two successive stats files of every daemon (rewritten each second)
    count the same packets, nothing is in flight through them. Kernel rungs: a short settle.
    Then a quiet window on every interface and a ping to dst that must get through.
    Returns {"drain": "counters" | "ping", "drain_s": seconds}; TestbedError if the daemons'
    counters do not come to rest or the ping is not answered."""
    t0 = time.monotonic()
    if nodes:
        before = _daemon_packets(nodes)
        while True:
            after = _daemon_packets(nodes)
            if after == before:
                break
            if time.monotonic() - t0 > DRAIN_LIMIT_S:
                raise TestbedError(f"the daemons' counters still moving after {DRAIN_LIMIT_S}s")
            before = after
    else:
        time.sleep(SETTLE_S)
    wait_quiet(tb)
    ping = tb.ping("a", dst, count=3, interval=0.1)
    if not ping.received:
        raise TestbedError(f"no ping reply from {dst} after the path drained")
    return {"drain": "counters" if nodes else "ping", "drain_s": round(time.monotonic() - t0, 2)}
