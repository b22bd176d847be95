"""Throughput with iperf3: TCP 1 and 4 streams, and the UDP packet rate at <= 1 % loss.

Lives here: one TCP run and its "tcp" document, one UDP probe at an offered packet rate, and
the search for the highest rate delivered within LOSS_MAX (cold: an unlimited probe first;
warm: from the previous run's result). Must not: read CPU, pings or the daemons' counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..tools import IperfResult
from .progress import Reporter

if TYPE_CHECKING:
    from ..testbed import Testbed

LOSS_MAX = 0.01  # UDP packet rate: highest rate delivered at <= 1 % loss
# iperf3 -w for the UDP runs: without it the receiver's default socket buffer overflows on
# iperf3's 1 ms send bursts and "loss" measures the receiving iperf3, not the path. The
# daemons' own UDP sockets have 4 MB buffers too.
UDP_WINDOW = "4M"


def tcp_run(
    tb: Testbed, dst: str, seconds: int, zerocopy: bool, streams: int
) -> tuple[IperfResult, dict[str, Any]]:
    """One iperf3 TCP run from node a to dst: the result and its "tcp" document."""
    extra = ["-P", str(streams)] if streams > 1 else []
    r = tb.iperf3("a", dst, seconds=seconds, zerocopy=zerocopy, extra=extra)
    return r, tcp_doc(r, streams)


def tcp_doc(r: IperfResult, streams: int) -> dict[str, Any]:
    return {
        "bits_per_second": r.bits_per_second,
        "sent_bits_per_second": r.sent_bits_per_second,
        "retransmits": r.retransmits,
        "bytes": r.bytes,
        "seconds": r.seconds,
        "streams": streams,
    }


def udp_probe(
    tb: Testbed, dst: str, size: int, seconds: int, rep: Reporter, label: str
) -> Callable[[float | None], dict[str, Any]]:
    """A probe for udp_search: one iperf3 UDP run offering pps packets/s (None: unlimited)."""

    def probe(pps: float | None) -> dict[str, Any]:
        rate = 0 if pps is None else int(pps * size * 8)
        what = "unlimited" if pps is None else f"{pps / 1e3:.0f} kpps"
        rep.status(f"{label}: UDP {size} B, offered {what}")
        r = tb.iperf3(
            "a",
            dst,
            seconds=seconds,
            extra=["-u", "-b", str(rate), "-l", str(size), "-w", UDP_WINDOW],
        )
        return probe_doc(r, pps, seconds)

    return probe


def probe_doc(r: IperfResult, pps: float | None, seconds: int) -> dict[str, Any]:
    """One UDP probe's rates and loss from iperf3's JSON (offered_pps None: unlimited)."""
    end = r.raw.get("end", {})
    sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
    n = int(recv.get("packets", 0))
    lost = max(0, int(recv.get("lost_packets", 0)))
    secs = float(recv.get("seconds") or seconds)
    ssecs = float(sent.get("seconds") or seconds)
    return {
        "offered_pps": None if pps is None else round(pps, 1),
        "sent_pps": round(int(sent.get("packets", 0)) / ssecs, 1),
        "received_pps": round(max(0, n - lost) / secs, 1),
        "loss": round(lost / n, 5) if n else 1.0,
    }


def udp_search(
    probe: Callable[[float | None], dict[str, Any]],
    probes: int,
    size: int,
    hint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Highest UDP packet rate delivered at <= LOSS_MAX loss, in at most `probes` iperf3 runs.

    Cold (no hint, or the hint was sender-bound): one unlimited run (-b 0) first. If it stays
    within the loss limit the path is faster than one sender (``sender_bound``: the figure is
    a lower bound). Otherwise the overloaded path still delivered some rate R; the next probe
    offers 0.7 R (usually within the limit), then the offered rate is bisected between the best
    passing and the lowest failing rate (at first 1.1 R). Warm (hint = the previous run's
    search on the same rung): the first probe offers the previous result and bisection goes on
    from there, with one probe fewer."""
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    warm = hint is not None and hint.get("pps") and not hint.get("sender_bound")
    if warm:
        assert hint is not None
        lo, hi = 0.0, float(hint["pps"]) * 1.15
        target, budget = float(hint["pps"]), max(1, probes - 1)
    else:
        first = probe(None)
        trials.append(first)
        if first["loss"] <= LOSS_MAX:
            return _search_doc(size, first, True, trials)
        lo, hi = 0.0, max(first["received_pps"] * 1.1, 1000.0)
        target, budget = max(first["received_pps"] * 0.7, 500.0), probes - 1
    for _ in range(budget):
        p = probe(target)
        trials.append(p)
        if p["loss"] <= LOSS_MAX:
            lo = target
            if best is None or p["received_pps"] > best["received_pps"]:
                best = p
        else:
            hi = target
        target = (lo + hi) / 2 if lo > 0 else target * 0.6
    return _search_doc(size, best, False, trials)


def _search_doc(
    size: int, best: dict[str, Any] | None, sender_bound: bool, trials: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "size": size,
        "pps": round(best["received_pps"], 1) if best else None,
        "loss": best["loss"] if best else None,
        "sender_bound": sender_bound,
        "probes": trials,
    }
