"""The figures a rung is judged by, their medians over runs and their ratios to kernel VXLAN.

Lives here: FIGURES (key, label, unit, which way is better), the median of each figure over a
rung's runs, which UDP figures are lower bounds (sender-bound), and ratios_vs_vxlan against
VXLAN measured in the same invocation. Must not: measure, or format for people (report.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    daemon_only: bool = False


FIGURES: tuple[Figure, ...] = (
    Figure("tcp1_gbps", "TCP, 1 stream", "Gbit/s", "higher"),
    Figure("tcp4_gbps", "TCP, 4 streams", "Gbit/s", "higher"),
    Figure("udp64_kpps", "UDP 64 B at <= 1 % loss", "kpps", "higher"),
    Figure("udp1400_kpps", "UDP 1400 B at <= 1 % loss", "kpps", "higher"),
    Figure("rtt_idle_p50_ms", "RTT idle p50", "ms", "lower"),
    Figure("rtt_idle_p99_ms", "RTT idle p99", "ms", "lower"),
    Figure("rtt_loaded_p50_ms", "RTT under a TCP stream p50", "ms", "lower"),
    Figure("rtt_loaded_p99_ms", "RTT under a TCP stream p99", "ms", "lower"),
    Figure("cpu_s_per_gb", "CPU of all cores per GB, TCP 1 stream", "s/GB", "lower"),
    Figure("daemon_cpu_s_per_gb", "daemons' CPU per GB, TCP 1 stream", "s/GB", "lower", True),
    Figure("syscalls_per_packet", "daemon syscalls per packet, TCP", "1/pkt", "lower", True),
    Figure("mean_batch", "mean batch (packets per pump round), TCP", "pkt", "higher", True),
    Figure("tcp1_retransmits", "TCP retransmits, 1 stream", "segments", "lower"),
    Figure("tcp4_retransmits", "TCP retransmits, 4 streams", "segments", "lower"),
)
FIGURE_KEYS = tuple(f.key for f in FIGURES)


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are there (None and NaN left out); None if none is."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def figures_of(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median over runs of every figure."""

    def med(fn: Callable[[dict[str, Any]], float | None]) -> float | None:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append(None)
        m = median(vals)
        return None if m is None else round(m, 4)

    def tcp_phase(key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda r: r["counters"]["tcp"][key] if r.get("counters") else None

    def per_gb(r: dict[str, Any], key: str) -> float | None:
        b = r["cpu"]["bytes"]
        v = r["cpu"][key]
        return None if v is None or not b else v / (b / 1e9)

    return {
        "tcp1_gbps": med(lambda r: r["tcp1"]["bits_per_second"] / 1e9),
        "tcp4_gbps": med(lambda r: r["tcp4"]["bits_per_second"] / 1e9),
        "udp64_kpps": med(lambda r: r["udp64"]["pps"] / 1e3),
        "udp1400_kpps": med(lambda r: r["udp1400"]["pps"] / 1e3),
        "rtt_idle_p50_ms": med(lambda r: r["ping_idle"]["p50_ms"]),
        "rtt_idle_p99_ms": med(lambda r: r["ping_idle"]["p99_ms"]),
        "rtt_loaded_p50_ms": med(lambda r: r["ping_loaded"]["p50_ms"]),
        "rtt_loaded_p99_ms": med(lambda r: r["ping_loaded"]["p99_ms"]),
        "cpu_s_per_gb": med(lambda r: per_gb(r, "busy_s")),
        "daemon_cpu_s_per_gb": med(lambda r: per_gb(r, "daemon_s")),
        "syscalls_per_packet": med(tcp_phase("syscalls_per_packet")),
        "mean_batch": med(tcp_phase("mean_batch")),
        "tcp1_retransmits": med(lambda r: r["tcp1"]["retransmits"]),
        "tcp4_retransmits": med(lambda r: r["tcp4"]["retransmits"]),
    }


def lower_bounds(runs: Sequence[dict[str, Any]]) -> list[str]:
    """UDP figures where most runs were sender-bound: the path took everything one iperf3
    sender could offer, so the figure is a lower bound of the path's rate."""
    out = []
    for size in (64, 1400):
        flags = [bool(r[f"udp{size}"].get("sender_bound")) for r in runs if f"udp{size}" in r]
        if flags and sum(flags) * 2 > len(flags):
            out.append(f"udp{size}_kpps")
    return out


def add_ratios(rungs: list[dict[str, Any]]) -> None:
    """ratios_vs_vxlan of every rung: figure / VXLAN's figure from the same invocation."""
    vx = next((r for r in rungs if r["name"] == "vxlan" and r["status"] == "ok"), None)
    for r in rungs:
        ratios: dict[str, float | None] = {}
        for k in FIGURE_KEYS:
            a = r["figures"].get(k)
            b = vx["figures"].get(k) if vx else None
            ratios[k] = round(a / b, 4) if a is not None and b else None
        r["ratios_vs_vxlan"] = ratios


def ok_rung(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The rung called name, if it was measured without error."""
    return next((r for r in doc["rungs"] if r["name"] == name and r["status"] == "ok"), None)
