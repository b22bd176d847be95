"""The whole invocation: build the Testbed, measure each rung of s.rungs, remove the Testbed.

Lives here: the results document (header, settings, one entry per rung with its figures,
counters, lower bounds and runs, notes), a failing rung recorded with its error while the
ladder goes on, and Ctrl-C / SIGTERM ending it with nothing left behind. Must not: measure by
itself (measure.py) or format for people (report.py).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import TestbedError
from .counters import counters_of
from .explain import explain
from .figures import FIGURES, add_ratios, figures_of, lower_bounds
from .iperf import LOSS_MAX, UDP_WINDOW
from .machine import iperf3_features, machine_info, versions
from .measure import STEPS_PER_RUN, measure_rung, steps_done
from .progress import Checked, Reporter, sigterm_as_interrupt
from .report import fmt
from .rungs import RUNG_BY_NAME, Rung
from .schema import RUN, SCHEMA_ID
from .settings import NS_PREFIX, Settings

if TYPE_CHECKING:
    from ..testbed import Testbed


def run_ladder(
    s: Settings, rep: Reporter | None = None, ns_prefix: str = NS_PREFIX
) -> dict[str, Any]:
    """Build a testbed, measure every rung of s.rungs, remove the testbed; the results document.

    A rung that fails is recorded with its error and the ladder goes on; KeyboardInterrupt
    (Ctrl-C, SIGTERM) propagates after the testbed is gone."""
    from ..testbed import Testbed

    rep = rep or Reporter()
    t0 = time.monotonic()
    doc = new_document()
    with (
        sigterm_as_interrupt() as stopped,
        Testbed(underlay_mtu=s.underlay_mtu, prefix=ns_prefix) as tb,
    ):
        rep = Checked(rep, stopped)
        if s.zerocopy:
            s.zerocopy = "zerocopy" in iperf3_features()
        doc["settings"] = settings_doc(s)
        for name in s.rungs:
            entry = rung_entry(RUNG_BY_NAME[name])
            doc["rungs"].append(entry)
            _measure_into(entry, RUNG_BY_NAME[name], tb, s, rep, stopped)
        if stopped.is_set():
            raise KeyboardInterrupt
    add_ratios(doc["rungs"])
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["explain"] = explain(doc)
    doc["retries"] = retry_summary(doc["rungs"])
    doc["notes"] += notes(doc)
    return doc


def new_document() -> dict[str, Any]:
    """The results document before anything was measured."""
    return {
        "schema": SCHEMA_ID,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": 0.0,
        "machine": machine_info(),
        "versions": versions(),
        "settings": {},
        "figures": [
            {"key": f.key, "label": f.label, "unit": f.unit, "better": f.better} for f in FIGURES
        ],
        "rungs": [],
        "explain": [],
        "notes": [],
        "retries": retry_summary([]),
    }


def settings_doc(s: Settings) -> dict[str, Any]:
    return {
        "quick": s.quick,
        "runs": s.runs,
        "tcp_seconds": s.tcp_seconds,
        "udp_seconds": s.udp_seconds,
        "udp_probes": s.udp_probes,
        "udp_loss_max": LOSS_MAX,
        "udp_window": UDP_WINDOW,
        "pings_idle": s.pings_idle,
        "ping_interval_s": s.ping_interval,
        "loaded_ping_interval_s": s.loaded_ping_interval,
        "zerocopy": s.zerocopy,
        "underlay_mtu": s.underlay_mtu,
        "rungs": list(s.rungs),
    }


def rung_entry(rung: Rung) -> dict[str, Any]:
    """A rung's entry in the document, before it was measured."""
    return {
        "name": rung.name,
        "label": rung.label,
        "kind": rung.kind,
        "status": "ok",
        "error": None,
        "figures": {},
        "ratios_vs_vxlan": {},
        "counters": None,
        "lower_bounds": [],
        "retries": [],
        "runs": [],
    }


def _measure_into(
    entry: dict[str, Any],
    rung: Rung,
    tb: Testbed,
    s: Settings,
    rep: Reporter,
    stopped: threading.Event,
) -> None:
    """Set the rung up, measure it, tear it down and fill its entry; a failure becomes the
    entry's error (the runs that completed are kept)."""
    r0 = time.monotonic()
    runs: list[dict[str, Any]] = [{} for _ in range(s.runs)]
    udp64 = None
    try:
        rep.status(f"{rung.name}: setting up")
        with rung.setup(tb) as env:
            udp64 = measure_rung(tb, env, s, rep, rung.name, runs, entry["retries"])
    except Exception as e:  # one rung failing must not cost the others
        if stopped.is_set():  # a swallowed Ctrl-C resurfacing as some other error
            raise KeyboardInterrupt from e
        entry["status"] = "error"
        entry["error"] = _error_text(e)
        rep.log(f"[red]{rung.name}: FAILED[/red] {entry['error']}")
    entry["runs"] = [r for r in runs if all(k in r for k in RUN["required"])]
    rep.advance(s.runs * STEPS_PER_RUN - sum(steps_done(r) for r in runs))
    entry["figures"] = figures_of(entry["runs"])
    entry["counters"] = counters_of(entry["runs"], udp64)
    entry["lower_bounds"] = lower_bounds(entry["runs"])
    if entry["status"] == "ok":
        f = entry["figures"]
        rep.log(
            f"{rung.label}: TCP {fmt(f['tcp1_gbps'], 2)} Gbit/s, "
            f"UDP 64 B {fmt(f['udp64_kpps'], 0)} kpps, RTT p50 "
            f"{fmt(f['rtt_idle_p50_ms'], 3)} ms ({time.monotonic() - r0:.0f} s)"
        )


def _error_text(e: Exception) -> str:
    """The first line of an error (its type too unless it is the testbed's own)."""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    if not isinstance(e, TestbedError):
        text = f"{type(e).__name__}: {text}"
    return text or type(e).__name__


def retry_summary(rungs: list[dict[str, Any]]) -> dict[str, Any]:
    """How many iperf3 runs never started and were run again, in all, per rung, per reason."""
    records = [(r["name"], x) for r in rungs for x in r.get("retries", [])]
    reasons: dict[str, int] = {}
    per_rung: dict[str, int] = {}
    for name, x in records:
        reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
        per_rung[name] = per_rung.get(name, 0) + 1
    return {"count": len(records), "rungs": per_rung, "reasons": reasons}


def notes(doc: dict[str, Any]) -> list[str]:
    """What a reader must know to weigh the figures (few cores, no VXLAN to compare with,
    runs that were repeated)."""
    out = []
    retries = doc.get("retries") or {}
    if retries.get("count"):
        where = ", ".join(f"{name} {n}" for name, n in retries["rungs"].items())
        why = "; ".join(f"{reason!r} x{n}" for reason, n in retries["reasons"].items())
        out.append(
            f"{retries['count']} iperf3 run(s) never started and were run again once the path "
            f"had drained ({where}): {why}. Set-up failures of the tool, not measurements; the "
            "figures are from the runs that did start."
        )
    if doc["machine"]["cores"] < 4:
        out.append(
            f"{doc['machine']['cores']} cores: iperf3 client and server, both daemons and the "
            "kernel's softirq work share them, so the ratios are indicative (anchors §7: report, "
            "do not gate, below 4 cores)."
        )
    if not any(r["name"] == "vxlan" and r["status"] == "ok" for r in doc["rungs"]):
        out.append("kernel VXLAN was not measured: no ratios.")
    return out
