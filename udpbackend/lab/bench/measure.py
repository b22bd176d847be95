"""The measuring protocol of one rung, the same on every rung (performance-anchors.md §7).

Per run: TCP 1 stream with a ping alongside and CPU around it, TCP 4 streams, the idle ping
between two reads of the daemons' counters; then the UDP 64 B searches of all runs, one counter
read, the UDP 1400 B searches. Must not: set a rung up (rungs.py) or judge the results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .counters import Snapshot, phase_counters, snapshot
from .cpu import cpu_doc, sample
from .iperf import IperfRunner, tcp_run, udp_probe, udp_search
from .progress import Reporter
from .rtt import loaded_doc, ping_doc, start_idle, start_loaded
from .rungs import RungEnv
from .settings import Settings

if TYPE_CHECKING:
    from ..testbed import Testbed

STEPS_PER_RUN = 4  # rep.advance() calls per run in measure_rung
STEP_KEYS = ("tcp1", "ping_idle", "udp64", "udp1400")  # a run's document has one per step


def steps_done(run: dict[str, Any]) -> int:
    return sum(k in run for k in STEP_KEYS)


def measure_rung(
    tb: Testbed,
    env: RungEnv,
    s: Settings,
    rep: Reporter,
    name: str,
    runs: list[dict[str, Any]],
    retries: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Fill `runs` (s.runs empty dicts) with every figure of one rung; returns the rung-level
    counters of the UDP 64 B searches (None for a kernel rung). An iperf3 run whose test never
    started is run again (iperf.IperfRunner); `retries` receives a record of each.

    Stage 1, per run: TCP 1 stream (a ping every 10 ms alongside for the loaded RTT, CPU from
    /proc around it), TCP 4 streams, then the idle pings between two fresh reads of the stats
    files: since the run before, that run's "tcp" phase; across the pings, its "idle" phase.
    Stage 2: the UDP 64 B search of each run (warm-started from the previous run's result),
    then one counter read: the "udp64" phase. Stage 3: the UDP 1400 B searches. Grouping the
    stages keeps counter reads, each up to a second of waiting, to one per run plus one."""
    ip = IperfRunner(tb, env, rep, retries if retries is not None else [])
    snap = snapshot(env.nodes, fresh=False) if env.nodes else None
    for i, run in enumerate(runs):
        snap = _tcp_and_rtt(ip, s, i + 1, f"{name} run {i + 1}/{s.runs}", run, snap)
    udp64: dict[str, Any] | None = None
    for size in (64, 1400):
        _udp_searches(ip, s, name, runs, size)
        if size == 64 and snap is not None:
            rep.status(f"{name}: reading counters")
            post = snapshot(env.nodes)
            udp64 = phase_counters(snap, post)
            snap = post
    return udp64


def _tcp_and_rtt(
    ip: IperfRunner,
    s: Settings,
    n: int,
    label: str,
    run: dict[str, Any],
    snap: Snapshot | None,
) -> Snapshot | None:
    """Stage 1 of run number n: tcp1, cpu, ping_loaded, tcp4, ping_idle and the "tcp"
    counters since `snap`; returns the daemons' snapshot taken at its end (None: no daemons)."""
    tb, env, rep = ip.tb, ip.env, ip.rep
    nodes = env.nodes
    rep.status(f"{label}: TCP 1 stream, {s.tcp_seconds} s, ping alongside")
    wait_ping = start_loaded(tb, env.dst, s)
    cpu0 = sample([n.pid for n in nodes])
    r1, run["tcp1"] = tcp_run(ip, n, s.tcp_seconds, s.zerocopy, 1, label)
    cpu1 = sample([n.pid for n in nodes])
    loaded = wait_ping()
    run["cpu"] = cpu_doc(cpu0, cpu1, r1.bytes)
    run["ping_loaded"] = loaded_doc(loaded, s)
    rep.advance()

    rep.status(f"{label}: TCP 4 streams, {s.tcp_seconds} s")
    _, run["tcp4"] = tcp_run(ip, n, s.tcp_seconds, s.zerocopy, 4, label)

    rep.status(f"{label}: idle ping x {s.pings_idle}" + (", counters" if nodes else ""))
    pre = snapshot(nodes) if nodes else None  # the TCP phase ends here
    wait_idle = start_idle(tb, env.dst, s)
    run["ping_idle"] = ping_doc(wait_idle())
    post = snapshot(nodes) if nodes else None  # and this holds the idle pings alone
    if snap and pre and post:
        run["counters"] = {"tcp": phase_counters(snap, pre), "idle": phase_counters(pre, post)}
    else:
        run["counters"] = None
    rep.advance()
    return post


def _udp_searches(
    ip: IperfRunner, s: Settings, name: str, runs: list[dict[str, Any]], size: int
) -> None:
    """The UDP packet-rate search at one payload size, for every run in turn."""
    key = f"udp{size}"
    for i, run in enumerate(runs):
        label = f"{name} run {i + 1}/{s.runs}"
        probe = udp_probe(ip, i + 1, size, s.udp_seconds, label)
        # warm start from the latest earlier run that found a rate
        found = [r[key] for r in runs[:i] if (r.get(key) or {}).get("pps")]
        hint = found[-1] if found else None
        run[key] = udp_search(probe, s.udp_probes, size, hint)
        ip.rep.advance()
