"""Throughput with iperf3: TCP 1 and 4 streams, and the UDP packet rate at <= 1 % loss.

Lives here: running iperf3 for a rung (a fresh server port per run, UDP probes on a quiet
path, a run whose test never started run again after the path drained, each retry recorded),
one TCP run and its "tcp" document, one UDP probe, and the search for the highest rate within
LOSS_MAX. Must not: read CPU or pings, or report a run that started and then failed as a retry.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..addressing import IPERF_PORT
from ..tools import IperfResult, IperfSetupError
from .drain import drain, wait_quiet
from .progress import Reporter
from .rungs import RungEnv

if TYPE_CHECKING:
    from ..testbed import Testbed

LOSS_MAX = 0.01  # UDP packet rate: highest rate delivered at <= 1 % loss
# iperf3 -w for the UDP runs: without it the receiver's default socket buffer overflows on
# iperf3's 1 ms send bursts and "loss" measures the receiving iperf3, not the path. The
# daemons' own UDP sockets have 4 MB buffers too.
UDP_WINDOW = "4M"
SETUP_RETRIES = 2  # a run whose iperf3 test never started is run again at most this often
# Each iperf3 run gets a server port the runs just before it did not use: with several queues a
# new flow can overtake the backlog of the one before, whose late datagrams iperf3 3.12's
# server would otherwise take for the new stream's set-up (and answer the old client).
_PORTS = itertools.cycle(range(IPERF_PORT, IPERF_PORT + 16))


@dataclass
class IperfRunner:
    """iperf3 from node a to a rung's address, with the retries of runs that never started."""

    tb: Testbed
    env: RungEnv
    rep: Reporter
    retries: list[dict[str, Any]] = field(default_factory=list)

    def run(
        self,
        what: dict[str, Any],
        label: str,
        seconds: int,
        zerocopy: bool = False,
        extra: Sequence[str] = (),
    ) -> IperfResult:
        """One iperf3 run. If its test never started (IperfSetupError: a failure of the tool's
        set-up, not a measurement), wait until the path has drained and run it again, at most
        SETUP_RETRIES times; each retry is logged and recorded (what + reason + drain)."""
        attempt = 1
        while True:
            try:
                return self.tb.iperf3(
                    "a",
                    self.env.dst,
                    seconds=seconds,
                    zerocopy=zerocopy,
                    extra=extra,
                    port=next(_PORTS),
                )
            except IperfSetupError as e:
                if attempt > SETUP_RETRIES:
                    raise
                drained = drain(self.tb, self.env.dst, self.env.nodes)
                self.retries.append({**what, "attempt": attempt, "reason": e.reason, **drained})
                self.rep.log(
                    f"[yellow]{label}: iperf3 never started ({e.reason}); retry {attempt} of "
                    f"{SETUP_RETRIES} after the path drained ({drained['drain']}, "
                    f"{drained['drain_s']} s)[/yellow]"
                )
                attempt += 1


def tcp_run(
    ip: IperfRunner, run: int, seconds: int, zerocopy: bool, streams: int, label: str
) -> tuple[IperfResult, dict[str, Any]]:
    """One iperf3 TCP run of run number `run`: the result and its "tcp" document."""
    extra = ["-P", str(streams)] if streams > 1 else []
    what = {"step": f"tcp{streams}", "run": run, "offered_pps": None}
    r = ip.run(what, label, seconds, zerocopy=zerocopy, extra=extra)
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
    ip: IperfRunner, run: int, size: int, seconds: int, label: str
) -> Callable[[float | None], dict[str, Any]]:
    """A probe for udp_search: one iperf3 UDP run offering pps packets/s (None: unlimited),
    started once the previous probe's backlog has left the path."""

    def probe(pps: float | None) -> dict[str, Any]:
        rate = 0 if pps is None else int(pps * size * 8)
        what = "unlimited" if pps is None else f"{pps / 1e3:.0f} kpps"
        ip.rep.status(f"{label}: UDP {size} B, offered {what}")
        settle = wait_quiet(ip.tb)
        step = {"step": f"udp{size}", "run": run, "offered_pps": _offered(pps)}
        extra = ["-u", "-b", str(rate), "-l", str(size), "-w", UDP_WINDOW]
        r = ip.run(step, label, seconds, extra=extra)
        return {**probe_doc(r, pps, seconds), "settle_s": settle}

    return probe


def _offered(pps: float | None) -> float | None:
    return None if pps is None else round(pps, 1)


def probe_doc(r: IperfResult, pps: float | None, seconds: int) -> dict[str, Any]:
    """One UDP probe's rates and loss from iperf3's JSON (offered_pps None: unlimited)."""
    end = r.raw.get("end", {})
    sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
    n = int(recv.get("packets", 0))
    lost = max(0, int(recv.get("lost_packets", 0)))
    secs = float(recv.get("seconds") or seconds)
    ssecs = float(sent.get("seconds") or seconds)
    return {
        "offered_pps": _offered(pps),
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
