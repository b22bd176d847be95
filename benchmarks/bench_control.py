#!/usr/bin/env python3
# Control-plane benchmark on a real etcd (udpbackend.lab.cluster.Cluster: etcd in a hub netns,
# daemons in etcd mode in node namespaces): (a) lease put -> route programmed on the peers, one join
# at a time, and lease delete -> route removed; (b) daemon start to /readyz 200 and to all routes
# programmed with 1,000 leases already in etcd. Must not: leave namespaces or processes behind
# (also on failure and Ctrl-C); needs root and Debian's etcd-server/etcd-client.
"""Usage: python benchmarks/bench_control.py [--joins 100] [--leases 1000] [--starts 3]
                                          [--out benchmarks/results]

(a) For each of --joins fake leases (flannel's exact value, distinct /24s): wall clock just before
    `etcdctl put`, then the `peer added` log timestamp on every peer; latency = the difference
    (it includes starting etcdctl in the hub namespace, reported separately). Then the same for
    `etcdctl del` -> `peer removed`.
(b) --leases fake /28 leases put into etcd under their own prefix; then --starts times: spawn a
    daemon on a fresh node, time to /readyz 200 and to the last of the --leases `peer added`
    lines; stop it (SIGTERM) before the next start (which reuses its lease).

Writes results-control.json (machine, date, raw samples) and results-control.md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout first

from udpbackend.lab.addressing import OVERLAY_NETWORK
from udpbackend.lab.bench.machine import machine_info
from udpbackend.lab.bench.progress import sigterm_as_interrupt
from udpbackend.lab.cluster import (
    Cluster,
    cluster_missing_requirements,
    lease_value,
    subnet_key,
)
from udpbackend.lab.daemons import EtcdNode
from udpbackend.lab.errors import TestbedError
from udpbackend.lab.etcdproc import ETCD

JOIN_BASE = ipaddress.IPv4Network("198.19.150.0/24")  # /24s 198.19.150.0 .. 198.19.249.0
BULK_PREFIX = "/bench1k/network"
BULK_CONFIG = {"Network": OVERLAY_NETWORK, "SubnetLen": 28, "Backend": {"Type": "udp"}}
# /28s from 198.19.64.0 up: far above where a new node allocates (the first free /28s from
# SubnetMin 198.19.0.16), so the measured node never collides with them.
BULK_BASE = ipaddress.IPv4Address("198.19.64.0")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fake_public_ip(k: int) -> str:
    return f"198.18.0.{200 + k % 50}"  # 198.18.0.200-249: nobody answers there


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": pct(values, 50),
        "p99_s": pct(values, 99),
        "max_s": max(values) if values else math.nan,
        "mean_s": statistics.fmean(values) if values else math.nan,
    }


# --- (a) joins and leaves -------------------------------------------------------------------


def joins(cl: Cluster, peers: list[EtcdNode], count: int) -> dict[str, Any]:
    add: list[float] = []
    remove: list[float] = []
    put_cmd: list[float] = []
    per_peer: dict[str, list[float]] = {f"n{p.index}": [] for p in peers}
    subnets = [
        ipaddress.IPv4Network((int(JOIN_BASE.network_address) + (k << 8), 24)) for k in range(count)
    ]
    for k, net in enumerate(subnets):
        key, ip = subnet_key(str(net)), fake_public_ip(k)
        t0 = time.time()
        cl.etcdctl("put", key, lease_value(ip))
        put_cmd.append(time.time() - t0)
        for p in peers:
            ev = p.wait_event("peer added", f"{net} via {ip}", timeout=10, after=t0)
            add.append(ev.ts - t0)
            per_peer[f"n{p.index}"].append(ev.ts - t0)
        if (k + 1) % 25 == 0:
            log(f"   {k + 1}/{count} joins, p50 so far {pct(add, 50) * 1e3:.1f} ms")
    for net in subnets:
        t0 = time.time()
        cl.etcdctl("del", subnet_key(str(net)))
        for p in peers:
            ev = p.wait_event("peer removed", str(net), timeout=10, after=t0)
            remove.append(ev.ts - t0)
    return {
        "put_to_route": summary(add),
        "del_to_route_removed": summary(remove),
        "etcdctl_put_command": summary(put_cmd),
        "per_peer_put_to_route": {k: summary(v) for k, v in per_peer.items()},
        "samples_put_to_route_s": add,
        "samples_del_to_removed_s": remove,
    }


# --- (b) start with many leases ---------------------------------------------------------------


def startup(cl: Cluster, leases: int, starts: int) -> dict[str, Any]:
    cl.put_config(BULK_CONFIG, prefix=BULK_PREFIX)
    nets = [ipaddress.IPv4Network((int(BULK_BASE) + 16 * k, 28)) for k in range(leases)]
    t0 = time.monotonic()
    cl.etcd.put_many(
        (subnet_key(str(n), BULK_PREFIX), lease_value(fake_public_ip(k)))
        for k, n in enumerate(nets)
    )
    log(f"   {leases} leases put in {time.monotonic() - t0:.1f} s (etcd JSON gateway)")
    fakes = {str(n) for n in nets}
    idx = max(cl.indices) + 1
    runs = []
    for r in range(starts):
        node = cl.start_etcd_node(idx, extra_args=["--etcd-prefix", BULK_PREFIX], timeout=60)
        assert node.ready_at is not None
        deadline = time.monotonic() + 120
        while True:
            added = [e for e in node.events("peer added") if e.text.split()[0] in fakes]
            if len({e.text.split()[0] for e in added}) >= leases:
                break
            if not node.alive or time.monotonic() > deadline:
                raise TestbedError(
                    f"only {len(added)}/{leases} routes after 120 s\n{node.log_tail()}"
                )
            time.sleep(0.05)
        last = max(e.ts for e in added)
        ready_line = node.wait_event("ready", timeout=1).ts  # daemon clock, like `last`
        run = {
            "subnet": node.subnet(),
            "spawn_to_ready_s": node.ready_at - node.spawned_at,
            "spawn_to_all_routes_s": last - node.spawned_at,
            "ready_line_to_all_routes_s": last - ready_line,
        }
        runs.append(run)
        log(
            f"   start {r + 1}/{starts}: ready {run['spawn_to_ready_s']:.3f} s, all {leases} "
            f"routes {run['spawn_to_all_routes_s']:.3f} s after spawn"
        )
        rc = node.stop()
        if rc != 0:
            raise TestbedError(f"daemon exited {rc}\n{node.log_tail()}")

    def med(k: str) -> float:
        return statistics.median(run[k] for run in runs)

    return {
        "leases": leases,
        "runs": runs,
        "median_spawn_to_ready_s": med("spawn_to_ready_s"),
        "median_spawn_to_all_routes_s": med("spawn_to_all_routes_s"),
        "median_ready_line_to_all_routes_s": med("ready_line_to_all_routes_s"),
    }


# --- report -----------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if not math.isnan(x) else "n/a"


def markdown(report: dict[str, Any]) -> str:
    m, a, b = report["machine"], report["results"]["joins"], report["results"]["startup"]
    lines = [
        "# udpbackend control-plane benchmark",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['nproc']} CPUs, {m['cpu_model'] or 'unknown CPU'}, "
        f"kernel {m['kernel']}, Python {m['python']}",
        f"- etcd: {report['etcd_version']} in a hub netns, fast-election flags, tmpfs data dir",
        "",
        f"## (a) lease put -> route programmed on a peer ({a['put_to_route']['n']} samples: "
        f"{report['args']['joins']} joins x {len(a['per_peer_put_to_route'])} peers)",
        "",
        "| | p50 | p99 | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, s in (
        ("`etcdctl put` -> `peer added` logged", a["put_to_route"]),
        ("`etcdctl del` -> `peer removed` logged", a["del_to_route_removed"]),
        ("(`etcdctl put` command itself, incl. process start)", a["etcdctl_put_command"]),
    ):
        lines.append(f"| {label} | {ms(s['p50_s'])} | {ms(s['p99_s'])} | {ms(s['max_s'])} |")
    lines += [
        "",
        f"## (b) daemon start with {b['leases']:,} leases in etcd (median of "
        f"{len(b['runs'])} starts)",
        "",
        "| | median | runs |",
        "| --- | ---: | --- |",
    ]
    for label, key in (
        ("spawn -> /readyz 200", "spawn_to_ready_s"),
        (f"spawn -> all {b['leases']:,} routes programmed", "spawn_to_all_routes_s"),
        ("`ready` log line -> all routes programmed", "ready_line_to_all_routes_s"),
    ):
        runs = ", ".join(ms(r[key]) for r in b["runs"])
        lines.append(f"| {label} | {ms(b['median_' + key])} | {runs} |")
    lines += [
        "",
        "Latencies come from the daemon's own log timestamps (ms resolution) against the wall "
        "clock taken just before the etcdctl command (a) or the process spawn (b); the put "
        "latency therefore includes starting etcdctl via `ip netns exec` (row 3). /readyz is "
        "polled every 10 ms from the node's namespace.",
    ]
    if m["nproc"] and m["nproc"] < 4:
        lines.append(
            f"- note: {m['nproc']} CPUs shared by etcd, etcdctl and the daemons; "
            "indicative numbers only."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--joins", type=int, default=100, help="fake leases put one at a time (≤100)")
    p.add_argument("--leases", type=int, default=1000, help="leases in etcd for the start test")
    p.add_argument("--starts", type=int, default=3, help="daemon starts with those leases")
    p.add_argument("--out", default="benchmarks/results", help="directory for results-control.*")
    args = p.parse_args(argv)
    if not 1 <= args.joins <= 100:
        p.error("--joins must be 1..100")
    if not 1 <= args.leases <= 4000:
        p.error("--leases must be 1..4000")
    missing = cluster_missing_requirements()
    if missing:
        log(f"bench_control needs {', '.join(missing)}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "results": {},
    }
    try:
        with sigterm_as_interrupt(), Cluster(nodes=2, prefix="ubbenchc") as cl:
            version = cl.run("hub", [ETCD, "--version"]).stdout.decode().splitlines()
            report["etcd_version"] = version[0].split(":")[-1].strip() if version else "?"
            cl.put_config()
            peers = [cl.start_etcd_node(i) for i in (0, 1)]
            cl.wait_converged()
            log(f"== (a) {args.joins} joins, peers n0 and n1")
            report["results"]["joins"] = joins(cl, peers, args.joins)
            log(f"== (b) {args.starts} starts with {args.leases} leases in etcd")
            report["results"]["startup"] = startup(cl, args.leases, args.starts)
            for node in peers:
                if node.stop() != 0:
                    raise TestbedError(f"n{node.index} did not exit 0\n{node.log_tail()}")
    except KeyboardInterrupt:
        log("interrupted: cluster removed, no results written")
        return 130
    except TestbedError as e:
        log(f"FAILED: {e}")
        return 1
    md = markdown(report)
    (out / "results-control.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results-control.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results-control.json'} and {out / 'results-control.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
