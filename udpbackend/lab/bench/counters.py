"""The daemons' own counters: read from their --stats-file, turned into per-packet figures.

Lives here: a Snapshot of both daemons (stats JSON rewritten every second, CPU, wake-ups), the
counters of one traffic phase between two snapshots (syscalls, batch sizes, offloads, copies,
drops per packet) and the rung's counters over its runs. Must not: start traffic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import DaemonError, TestbedError
from .cpu import pid_cpu_s, pid_wakeups
from .figures import median

if TYPE_CHECKING:
    from ..daemons import Node

# counter phases of a daemon rung (see measure.measure_rung); "idle": the idle pings alone
PHASES = ("tcp", "idle", "udp64")
PHASE_FIELDS = (
    "packets",
    "syscalls_per_packet",
    "mean_batch",
    "packets_per_send",
    "packets_per_receive",
    "packets_per_tun_read",
    "packets_per_tun_write",
    "gso_sends",
    "gro_receives",
    "tso_reads",
    "tun_gro_writes",
    "wakeups_per_packet",
    "daemon_cpu_us_per_packet",
    "user_kernel_copies_per_packet",
    "drops",
)


@dataclass
class Snapshot:
    """What the daemons of a rung have counted at one moment."""

    docs: list[dict[str, Any]]
    cpu_s: list[float]
    wakeups: list[int]


def read_fresh_stats(node: Node, after: float, timeout: float = 4.0) -> dict[str, Any]:
    """The daemon's stats file once it has been rewritten after `after` (epoch s): the daemon
    rewrites it every second, so this waits at most about one second."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if node.stats_path.stat().st_mtime > after:
                data = json.loads(node.stats_path.read_text())
                if isinstance(data, dict):
                    return data
        except (OSError, json.JSONDecodeError) as e:
            last = e
        if not node.alive:
            raise DaemonError(f"daemon {node.node} died\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise TestbedError(f"stats file {node.stats_path} not rewritten in {timeout}s: {last}")
        time.sleep(0.02)


def snapshot(nodes: Sequence[Node], fresh: bool = True) -> Snapshot:
    """The daemons' counters; fresh: from a stats file written after this call (so that it
    holds all traffic up to now), else whatever is there (before any traffic)."""
    after = time.time() if fresh else 0.0
    docs = [read_fresh_stats(n, after) for n in nodes]
    return Snapshot(docs, [pid_cpu_s(n.pid) for n in nodes], [pid_wakeups(n.pid) for n in nodes])


def _sub(a: Any, b: Any) -> Any:
    """b - a over the numeric leaves of two stats documents of the same shape."""
    if isinstance(b, dict):
        return {k: _sub(a.get(k, 0) if isinstance(a, dict) else 0, v) for k, v in b.items()}
    if isinstance(b, list):
        a = a if isinstance(a, list) else [0] * len(b)
        return [_sub(x, y) for x, y in zip(a, b, strict=False)]
    if isinstance(b, int | float) and not isinstance(b, bool):
        return b - (a if isinstance(a, int | float) else 0)
    return b


@dataclass
class _Totals:
    """Both daemons' counters over one phase, added up."""

    eg_rx: int = 0  # packets read from the TUN (egress in)
    eg_tx: int = 0  # packets sent to the peer (egress out)
    ing_rx: int = 0  # packets received from the peer (ingress in)
    ing_tx: int = 0  # packets written into the TUN (ingress out)
    batches: int = 0
    gso: int = 0
    gro: int = 0
    tso: int = 0
    tun_gro: int = 0
    entered: int = 0  # bytes that entered the overlay (read from a TUN)
    copied: int = 0  # bytes that crossed the user/kernel boundary
    syscalls: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)

    def add(self, st: dict[str, Any]) -> None:
        """Add one daemon's counter differences (the "stats" part of its document)."""
        eg, ing = st.get("egress", {}), st.get("ingress", {})
        self.eg_rx += eg.get("rx_packets", 0)
        self.eg_tx += eg.get("tx_packets", 0)
        self.ing_rx += ing.get("rx_packets", 0)
        self.ing_tx += ing.get("tx_packets", 0)
        self.batches += eg.get("batches", 0) + ing.get("batches", 0)
        self.gso += st.get("gso_sends", 0)
        self.gro += st.get("gro_receives", 0)
        self.tso += st.get("tso_reads", 0)
        self.tun_gro += st.get("tun_gro_writes", 0)
        self.entered += eg.get("rx_bytes", 0)
        self.copied += sum(d.get(k, 0) for d in (eg, ing) for k in ("rx_bytes", "tx_bytes"))
        for k, v in st.get("syscalls", {}).items():
            self.syscalls[k] = self.syscalls.get(k, 0) + v
        for d in (eg, ing):
            for k, v in d.get("drops", {}).items():
                if v:
                    self.drops[k] = self.drops.get(k, 0) + v


def phase_counters(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Both daemons' counters over one traffic phase, as per-packet figures."""
    t = _Totals()
    for a, b in zip(before.docs, after.docs, strict=True):
        t.add(_sub(a.get("stats", {}), b.get("stats", {})))
    packets = t.eg_rx + t.ing_rx
    cpu = sum(after.cpu_s) - sum(before.cpu_s)
    wakeups = sum(after.wakeups) - sum(before.wakeups)
    sends = t.syscalls.get("sendmmsg", 0) + t.syscalls.get("sendto", 0)
    receives = t.syscalls.get("recvmmsg", 0) + t.syscalls.get("recvfrom", 0)

    def per(x: float, y: float, scale: float = 1.0) -> float | None:
        return round(scale * x / y, 4) if y else None

    return {
        "packets": packets,
        "syscalls": t.syscalls,
        "syscalls_per_packet": per(sum(t.syscalls.values()), packets),
        "mean_batch": per(packets, t.batches),
        "packets_per_send": per(t.eg_tx, sends),
        "packets_per_receive": per(t.ing_rx, receives),
        "packets_per_tun_read": per(t.eg_rx, t.syscalls.get("read", 0)),
        "packets_per_tun_write": per(t.ing_tx, t.syscalls.get("write", 0)),
        "gso_sends": t.gso,
        "gro_receives": t.gro,
        "tso_reads": t.tso,
        "tun_gro_writes": t.tun_gro,
        "wakeups_per_packet": per(wakeups, packets),
        "daemon_cpu_us_per_packet": per(cpu, packets, 1e6),
        # bytes crossing the user/kernel boundary per byte that entered the overlay: read from
        # the TUN + sent + received + written into the TUN = 4 on a loss-free path
        "user_kernel_copies_per_packet": per(t.copied, t.entered),
        "drops": t.drops,
    }


def counters_of(
    runs: Sequence[dict[str, Any]], udp64: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The rung's counters: "tcp", the median over runs of each per-run figure (drops
    summed); "udp64", over all of the rung's UDP 64 B searches."""
    with_counters = [r["counters"] for r in runs if r.get("counters")]
    if not with_counters:
        return None
    out: dict[str, Any] = {}
    for phase in ("tcp", "idle"):
        rows = [c[phase] for c in with_counters if phase in c]
        if rows:
            out[phase] = _median_phase(rows)
    if udp64 is not None:
        out["udp64"] = udp64
    return out


def _median_phase(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's figures over runs: the median of each, drops summed."""
    ph: dict[str, Any] = {}
    for key in PHASE_FIELDS:
        if key == "drops":
            drops: dict[str, int] = {}
            for row in rows:
                for k, v in row["drops"].items():
                    drops[k] = drops.get(k, 0) + v
            ph["drops"] = drops
        else:
            m = median([row.get(key) for row in rows])
            ph[key] = None if m is None else round(m, 4)
    syscalls: dict[str, float] = {}
    for k in {k for row in rows for k in row.get("syscalls", {})}:
        m = median([row["syscalls"].get(k, 0) for row in rows])
        syscalls[k] = m if m is not None else 0
    ph["syscalls"] = syscalls
    return ph
