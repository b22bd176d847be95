#!/usr/bin/env python3
# End-to-end overlay benchmark (performance-anchors.md §7 protocol, scaled down): one two-netns
# testbed, measured side by side in one run: plain veth, kernel VXLAN as flannel configures it,
# and udpbackend in batched / per-packet / python mode and batched with 10,000 extra routes.
# Must not: leave namespaces or processes behind (also on failure and Ctrl-C); needs root.
"""Usage: python benchmarks/bench_overlay.py [--seconds 5] [--runs 3] [--out benchmarks/results]

Prints a Markdown table (TCP single-stream throughput, idle ping RTT, daemon counters) and writes
results.json (machine, date, raw runs) and results.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from udpbackend.testbed import (
    TUN_ADDR,
    UNDERLAY_ADDR,
    VXLAN_ADDR,
    Node,
    PingResult,
    Testbed,
    TestbedError,
    missing_requirements,
)

DUMMY_ROUTES = 10_000
DUMMY_PEER = "198.18.0.3"  # nobody: the dummy routes are never used by the measured traffic
# /30s from 198.19.64.0 upward (12,288 fit below 198.20.0.0): clear of 198.19.1.0/24 and .2.0/24.
DUMMY_BASE = ipaddress.IPv4Address("198.19.64.0")

CONFIGS = ("veth", "vxlan", "batched", "per-packet", "python", "batched-10k")
LABELS = {
    "veth": "veth, no overlay (ceiling)",
    "vxlan": "kernel VXLAN (VNI 1, port 8472, MTU 1450)",
    "batched": "udpbackend batched",
    "per-packet": "udpbackend per-packet",
    "python": "udpbackend python",
    "batched-10k": "udpbackend batched + 10k routes",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- machine facts ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": model,
        "python": platform.python_version(),
        "iperf3": iperf.splitlines()[0] if iperf else "",
    }


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat (busy = user+nice+sys+irq+softirq)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = parts[:7]
    steal = parts[7] if len(parts) > 7 else 0
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


# --- measuring ----------------------------------------------------------------------------------


def write_dummy_peers(path: Path, count: int = DUMMY_ROUTES) -> None:
    lines = [f"# {count} dummy /30 routes to {DUMMY_PEER}: route-table size benchmark"]
    for i in range(count):
        net = ipaddress.IPv4Network((int(DUMMY_BASE) + 4 * i, 30))
        lines.append(f"{net}={DUMMY_PEER}")
    path.write_text("\n".join(lines) + "\n")


def ping_summary(res: PingResult) -> dict[str, Any]:
    return {
        "sent": res.sent,
        "received": res.received,
        "p50_ms": res.p50_ms,
        "avg_ms": res.avg_ms,
        "min_ms": res.min_ms,
        "p99_ms": res.percentile_ms(99),
        "max_ms": res.max_ms,
        "rtts_ms": res.rtts_ms,
    }


def measure(
    tb: Testbed, client_dst: str, args: argparse.Namespace, zerocopy: bool
) -> dict[str, Any]:
    """Idle ping first, then `runs` iperf3 TCP runs from A to client_dst."""
    res: dict[str, Any] = {}
    ping = tb.ping(
        "a", client_dst, count=args.pings, interval=args.ping_interval, timeout=args.pings + 30
    )
    res["ping"] = ping_summary(ping)
    runs = []
    for i in range(args.runs):
        busy0, total0 = cpu_times()
        r = tb.iperf3("a", client_dst, seconds=args.seconds, zerocopy=zerocopy)
        busy1, total1 = cpu_times()
        cpu = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        runs.append(
            {
                "bits_per_second": r.bits_per_second,
                "sent_bits_per_second": r.sent_bits_per_second,
                "retransmits": r.retransmits,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "zerocopy": r.zerocopy,
                "cpu_busy_fraction": cpu,
            }
        )
        log(f"    run {i + 1}: {r.gbps:.3f} Gbit/s, {r.retransmits} retransmits, cpu {cpu:.0%}")
    res["runs"] = runs
    bps = [x["bits_per_second"] for x in runs]
    res["median_bps"] = statistics.median(bps) if bps else 0.0
    res["median_retransmits"] = statistics.median([x["retransmits"] for x in runs]) if runs else 0
    return res


def counters(doc: dict[str, Any]) -> dict[str, Any]:
    """Per-daemon summary: packets each way, drops, mean batch per direction, syscalls/packet."""
    st = doc.get("stats", {})
    eg, ing = st.get("egress", {}), st.get("ingress", {})
    rx = eg.get("rx_packets", 0) + ing.get("rx_packets", 0)
    syscalls = st.get("syscalls", {})
    return {
        "routes": doc.get("routes"),
        "mode": doc.get("mode"),
        "egress_packets": eg.get("rx_packets", 0),
        "ingress_packets": ing.get("rx_packets", 0),
        "drops": sum(eg.get("drops", {}).values()) + sum(ing.get("drops", {}).values()),
        "mean_batch_egress": eg.get("rx_packets", 0) / eg["batches"] if eg.get("batches") else 0,
        "mean_batch_ingress": (
            ing.get("rx_packets", 0) / ing["batches"] if ing.get("batches") else 0
        ),
        "syscalls": syscalls,
        "syscalls_per_packet": sum(syscalls.values()) / rx if rx else 0.0,
    }


def run_daemon_config(
    tb: Testbed, mode: str, args: argparse.Namespace, zerocopy: bool, **kw: Any
) -> dict[str, Any]:
    nodes: dict[str, Node] = {}
    try:
        for n in ("a", "b"):
            nodes[n] = tb.start_node(n, mode, timeout=120, **kw)
        res = measure(tb, TUN_ADDR["b"], args, zerocopy)
    finally:
        errors = []
        for n, node in nodes.items():
            try:
                node.stop(timeout=15, check=True)
            except TestbedError as e:
                errors.append(f"{n}: {e}")
        if errors and not sys.exc_info()[0]:
            raise TestbedError("; ".join(errors))
    res["daemons"] = {}
    for n, node in nodes.items():
        doc = node.stats()
        res["daemons"][n] = {"summary": counters(doc), "stats": doc}
    return res


# --- reporting ----------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.2f}x"


def compute_ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def bps(name: str) -> float | None:
        r = results.get(name)
        return r["median_bps"] if r and "median_bps" in r else None

    def p50(name: str) -> float | None:
        r = results.get(name)
        return r["ping"]["p50_ms"] if r and "ping" in r else None

    veth, vx, ours = p50("veth"), p50("vxlan"), p50("batched")
    added = None
    if veth is not None and vx is not None and ours is not None and vx > veth:
        added = (ours - veth) / (vx - veth)
    return {
        "batched_vs_vxlan_tput": ratio(bps("batched"), bps("vxlan")),
        "batched_vs_per_packet_tput": ratio(bps("batched"), bps("per-packet")),
        "batched_vs_python_tput": ratio(bps("batched"), bps("python")),
        "routes10k_vs_1route_tput": ratio(bps("batched-10k"), bps("batched")),
        "routes10k_vs_1route_p50": ratio(p50("batched-10k"), p50("batched")),
        "added_latency_vs_vxlan_p50": added,
    }


def markdown(report: dict[str, Any]) -> str:
    results, m = report["results"], report["machine"]
    vx = results.get("vxlan", {}).get("median_bps")
    lines = [
        "# udpbackend overlay benchmark",
        "",
        f"{report['date']} - {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, {m['iperf3']}",
        f"iperf3 TCP single stream, {report['args']['seconds']} s x {report['args']['runs']} runs "
        f"(median){', -Z' if report['zerocopy'] else ''}; idle ping {report['args']['pings']} x "
        f"{report['args']['ping_interval']} s A -> B; underlay veth MTU 1500, TUN MTU 1472.",
        "",
        "| path | TCP Gbit/s | vs VXLAN | retrans | CPU busy | ping p50 ms | ping avg ms "
        "| syscalls/pkt A / B | mean batch A tx / B rx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONFIGS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {LABELS[name]} | error: {r['error'][:80]} |  |  |  |  |  |  |  |")
            continue
        cpu = statistics.median([x["cpu_busy_fraction"] for x in r["runs"]]) if r["runs"] else 0
        sysc = batch = "-"
        if "daemons" in r:
            a, b = r["daemons"]["a"]["summary"], r["daemons"]["b"]["summary"]
            sysc = f"{a['syscalls_per_packet']:.2f} / {b['syscalls_per_packet']:.2f}"
            batch = f"{a['mean_batch_egress']:.1f} / {b['mean_batch_ingress']:.1f}"
        ping = r["ping"]
        lines.append(
            f"| {LABELS[name]} | {r['median_bps'] / 1e9:.2f} | "
            f"{fmt_ratio(ratio(r['median_bps'], vx), pct=True)} | {r['median_retransmits']:.0f} | "
            f"{cpu:.0%} | {ping['p50_ms']:.3f} | {ping['avg_ms']:.3f} | {sysc} | {batch} |"
        )
    rt = report["ratios"]
    lines += [
        "",
        f"- batched / kernel VXLAN throughput: {fmt_ratio(rt['batched_vs_vxlan_tput'])}",
        f"- batched / per-packet throughput: {fmt_ratio(rt['batched_vs_per_packet_tput'])}",
        f"- batched / python throughput: {fmt_ratio(rt['batched_vs_python_tput'])}",
        f"- 10k routes / 1 route: throughput {fmt_ratio(rt['routes10k_vs_1route_tput'])}, "
        f"ping p50 {fmt_ratio(rt['routes10k_vs_1route_p50'])}",
        f"- added idle latency (p50 - veth) / (VXLAN p50 - veth): "
        f"{fmt_ratio(rt['added_latency_vs_vxlan_p50'])}",
    ]
    if m["nproc"] and m["nproc"] < 4:
        lines.append(
            f"- note: {m['nproc']} CPUs; iperf3 client, server and both daemons share them, "
            "so ratios are indicative only (anchors §7: report, do not gate, below 4 cores)."
        )
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper child must not unwind our stack
            os._exit(128 + signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 seconds per run (default 5)")
    p.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (default 3)")
    p.add_argument("--pings", type=int, default=100, help="idle pings per path (>= 50)")
    p.add_argument("--ping-interval", type=float, default=0.02, help="seconds between pings")
    p.add_argument("--out", default="benchmarks/results", help="directory for results.*")
    p.add_argument(
        "--only", nargs="*", choices=CONFIGS, default=list(CONFIGS), help="subset of paths"
    )
    p.add_argument("--no-zerocopy", action="store_true", help="do not use iperf3 -Z")
    args = p.parse_args(argv)
    if args.pings < 50:
        p.error("--pings must be >= 50")
    missing = missing_requirements()
    if missing:
        log(f"bench_overlay needs {', '.join(missing)}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "results": {},
    }
    results: dict[str, Any] = report["results"]
    failed = False
    try:
        with sigterm_as_interrupt(), Testbed(prefix="ubbench") as tb:
            zerocopy = not args.no_zerocopy and tb.iperf3_supports_zerocopy()
            report["zerocopy"] = zerocopy
            log(f"testbed {tb.ns['a']} / {tb.ns['b']}; iperf3 -Z {'on' if zerocopy else 'off'}")
            peers_file = tb.workdir / "peers-10k.txt"
            write_dummy_peers(peers_file)
            steps: dict[str, Callable[[], dict[str, Any]]] = {
                "veth": lambda: measure(tb, UNDERLAY_ADDR["b"], args, zerocopy),
                "vxlan": lambda: vxlan_step(tb, args, zerocopy),
                "batched": lambda: run_daemon_config(tb, "batched", args, zerocopy),
                "per-packet": lambda: run_daemon_config(tb, "per-packet", args, zerocopy),
                "python": lambda: run_daemon_config(tb, "python", args, zerocopy),
                "batched-10k": lambda: run_daemon_config(
                    tb, "batched", args, zerocopy, peers_file=peers_file
                ),
            }
            for name in CONFIGS:
                if name not in args.only:
                    continue
                log(f"== {LABELS[name]}")
                t0 = time.monotonic()
                try:
                    results[name] = steps[name]()
                except TestbedError as e:
                    failed = True
                    results[name] = {"error": str(e)}
                    log(f"   FAILED: {e}")
                    continue
                r = results[name]
                log(
                    f"   {r['median_bps'] / 1e9:.3f} Gbit/s median, ping p50 "
                    f"{r['ping']['p50_ms']:.3f} ms ({time.monotonic() - t0:.0f} s)"
                )
    except KeyboardInterrupt:
        log("interrupted: testbed removed, no results written")
        return 130
    report["ratios"] = compute_ratios(results)
    md = markdown(report)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 1 if failed else 0


def vxlan_step(tb: Testbed, args: argparse.Namespace, zerocopy: bool) -> dict[str, Any]:
    tb.add_vxlan()
    try:
        return measure(tb, VXLAN_ADDR["b"], args, zerocopy)
    finally:
        tb.del_vxlan()


if __name__ == "__main__":
    raise SystemExit(main())
