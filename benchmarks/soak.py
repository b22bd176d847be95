#!/usr/bin/env python3
# Soak (issue "Trust", item 7): two etcd-mode daemons (udpbackend.lab.cluster.Cluster: a real etcd
# in a hub netns, nodes in their own namespaces) under TCP (iperf3, back-to-back runs) and ping for
# 10 minutes, their RSS, open fds and threads sampled from /proc every few seconds. Not in CI.
# Must not: leave namespaces or processes behind (also on failure and Ctrl-C); needs root,
# iperf3 and Debian's etcd-server/etcd-client.
"""Usage: python benchmarks/soak.py [--minutes 10] [--warmup 30] [--every 5] [--mode batched]
                                 [--run-seconds 60] [--bitrate 0] [--ping-interval 0.1]
                                 [--churn-every 10] [--renew-margin 1439]
                                 [--out benchmarks/results]

Two nodes n0, n1. iperf3 TCP n0 -> n1's flannel0 in back-to-back runs of --run-seconds (a new
connection each run; --bitrate caps it, 0 = as fast as it goes), ping n0 -> n1 every
--ping-interval all along. The control plane works too: every --churn-every seconds a flannel
lease is put or deleted with etcdctl (a route added / removed on both nodes), and with
--renew-margin 1439 (minutes before the 24 h expiry) each node renews its lease every minute.

Every --every seconds, for each daemon (the python process itself: `ip netns exec` execs it):
VmRSS, VmHWM and Threads from /proc/<pid>/status, the entries of /proc/<pid>/fd, CPU seconds
from /proc/<pid>/stat. The first --warmup seconds of traffic are sampled but not judged; the
bars apply to the --minutes after them: RSS growth <= 1 MiB (last sample - first one), open
fds flat (the last sample holds the first's count: a transient fd is listed, not failed).

Writes soak.json (machine, load, every sample) and soak.md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout first

from udpbackend.lab.addressing import IPERF_PORT, OVERLAY_NETWORK
from udpbackend.lab.bench.machine import machine_info, versions
from udpbackend.lab.bench.progress import sigterm_as_interrupt
from udpbackend.lab.cluster import Cluster, cluster_missing_requirements, lease_value
from udpbackend.lab.daemons import EtcdNode
from udpbackend.lab.errors import TestbedError
from udpbackend.lab.tools import IperfSetupError, iperf3_client_argv, parse_iperf3, wait_listen

RSS_BAR_KIB = 1024  # RSS growth over the judged window
CHURN_SUBNET = "198.19.244.0/24"  # above the allocation window: never a node's own lease
CHURN_IP = "198.18.0.80"  # nobody there
_REPLY = re.compile(
    r"^\[(\d+\.\d+)\] \d+ bytes from [^:]+: icmp_seq=(\d+) ttl=\d+ time=([0-9.]+)", re.MULTILINE
)
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- /proc ------------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any]:
    """RSS / HWM (KiB), threads, open fds and CPU seconds of one process, from /proc."""
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "hwm_kib": int(status["VmHWM"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": round((utime + stime) / _CLK_TCK, 2),
    }


def fd_targets(pid: int) -> dict[str, str]:
    """fd number -> what it is (readlink of /proc/<pid>/fd/<n>: socket:[inode], a path...)."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[name] = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed in between
    return out


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return res.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- the figures ------------------------------------------------------------------------------


def slope_kib_per_10min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, KiB) in KiB per 10 minutes."""
    if len(points) < 2:
        return math.nan
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 600


def node_summary(samples: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any]:
    """The figures and bars of one daemon over the judged window (t >= warmup)."""
    mine = [(s["t"], s[key]) for s in samples if key in s]
    judged = [(t, v) for t, v in mine if t >= warmup]
    if not judged:
        raise TestbedError(f"no samples of {key} after the warm-up")
    first, last = judged[0][1], judged[-1][1]
    rss = [v["rss_kib"] for _, v in judged]
    fds = [v["fds"] for _, v in judged]
    threads = [v["threads"] for _, v in judged]
    growth = last["rss_kib"] - first["rss_kib"]
    return {
        "pid": first.get("pid"),
        "window_s": round(judged[-1][0] - judged[0][0], 1),
        "samples": len(judged),
        "rss_kib": {
            "traffic_start": mine[0][1]["rss_kib"],
            "start": first["rss_kib"],
            "end": last["rss_kib"],
            "min": min(rss),
            "max": max(rss),
            "growth": growth,
            "slope_per_10min": round(slope_kib_per_10min([(t, v["rss_kib"]) for t, v in judged])),
            "hwm_end": last["hwm_kib"],
        },
        "fds": {"start": fds[0], "end": fds[-1], "min": min(fds), "max": max(fds)},
        "threads": {
            "start": threads[0],
            "end": threads[-1],
            "min": min(threads),
            "max": max(threads),
        },
        "cpu_s": round(last["cpu_s"] - first["cpu_s"], 1),
        # fds flat: none gained for good (the last sample is the first's); one that comes and
        # goes between two samples (a resync subprocess's pipe) is listed under fd changes
        "bars": {"rss_growth_le_1mib": growth <= RSS_BAR_KIB, "fds_flat": fds[-1] == fds[0]},
    }


def ping_summary(text: str, interval: float) -> dict[str, Any]:
    replies = {int(m.group(2)): float(m.group(3)) for m in _REPLY.finditer(text)}
    m = _SUMMARY.search(text)
    last = max(replies, default=0)
    lost = [seq for seq in range(1, last + 1) if seq not in replies]  # the one in flight at stop
    rtts = sorted(replies.values())  # is not lost
    return {
        "interval_s": interval,
        "transmitted": int(m.group(1)) if m else None,
        "received": len(replies),
        "lost": len(lost),
        "lost_seqs": lost[:50],
        "rtt_ms": {
            "p50": rtts[len(rtts) // 2] if rtts else None,
            "p99": rtts[min(len(rtts) - 1, math.ceil(0.99 * len(rtts)) - 1)] if rtts else None,
            "max": rtts[-1] if rtts else None,
        },
    }


# --- the run ----------------------------------------------------------------------------------


class Soak:
    def __init__(self, cl: Cluster, args: argparse.Namespace) -> None:
        self.cl = cl
        self.args = args
        self.samples: list[dict[str, Any]] = []
        self.iperf_runs: list[dict[str, Any]] = []
        self.churn = {"puts": 0, "deletes": 0}
        self.client: subprocess.Popen[bytes] | None = None
        self.client_out: Path | None = None
        self.client_argv: list[str] = []
        self.runs_started = 0
        self.fd_baseline: dict[str, dict[str, str]] = {}
        self.fd_changes: list[dict[str, Any]] = []

    def start_daemons(self) -> list[EtcdNode]:
        extra = ["--subnet-lease-renew-margin", str(self.args.renew_margin)]
        nodes = [self.cl.start_etcd_node(i, extra_args=extra, mode=self.args.mode) for i in (0, 1)]
        self.cl.wait_converged()
        return nodes

    def start_client(self, seconds: int) -> None:
        k = self.runs_started
        self.runs_started += 1
        self.client_out = self.cl.workdir / f"iperf3-client-{k}.json"
        argv = iperf3_client_argv(self.cl.tun_addr(1), IPERF_PORT, seconds, False, [])
        if self.args.bitrate:
            argv += ["-b", self.args.bitrate]
        self.client_argv = argv
        with open(self.client_out, "wb") as f:
            self.client = self.cl.spawn(0, argv, stdout=f, stderr=subprocess.STDOUT)

    def reap_client(self, t: float) -> None:
        """Parse a finished iperf3 client run (a run that never started is noted, not fatal)."""
        proc, out = self.client, self.client_out
        if proc is None or out is None or proc.poll() is None:
            return
        self.client = None
        res = subprocess.CompletedProcess(self.client_argv, proc.returncode, out.read_bytes(), b"")
        try:
            r = parse_iperf3(res, self.cl.tun_addr(1), False)
            self.iperf_runs.append(
                {
                    "t": round(t, 1),
                    "seconds": round(r.seconds, 1),
                    "gbps": round(r.gbps, 3),
                    "retransmits": r.retransmits,
                }
            )
        except IperfSetupError as e:
            self.iperf_runs.append({"t": round(t, 1), "error": f"never started: {e.reason}"})
        except TestbedError as e:
            self.iperf_runs.append({"t": round(t, 1), "error": str(e)[:300]})

    def sample(self, t: float, nodes: list[EtcdNode]) -> None:
        row: dict[str, Any] = {"t": round(t, 1)}
        for n in nodes:
            if not n.alive:
                raise TestbedError(f"daemon n{n.index} died\n{n.log_tail()}")
            s = proc_sample(n.pid)
            s["pid"] = n.pid
            row[f"n{n.index}"] = s
            self.note_fds(t, n)
        self.samples.append(row)

    def note_fds(self, t: float, n: EtcdNode) -> None:
        """Keep the daemon's fd table of the first sample; log every later difference from it
        (which fds came or went, and what they point to), so a change can be told apart."""
        name = f"n{n.index}"
        now = fd_targets(n.pid)
        base = self.fd_baseline.setdefault(name, now)
        if now != base:
            self.fd_changes.append(
                {
                    "t": round(t, 1),
                    "node": name,
                    "new": {k: v for k, v in now.items() if base.get(k) != v},
                    "gone": {k: v for k, v in base.items() if now.get(k) != v},
                }
            )

    def churn_step(self) -> None:
        key = self.cl.subnet_key(CHURN_SUBNET)
        if self.churn["puts"] == self.churn["deletes"]:
            self.cl.etcdctl("put", key, lease_value(CHURN_IP))
            self.churn["puts"] += 1
        else:
            self.cl.etcdctl("del", key)
            self.churn["deletes"] += 1

    def run(self) -> dict[str, Any]:
        a = self.args
        cl = self.cl
        nodes = self.start_daemons()
        total = a.warmup + a.minutes * 60
        server = cl.spawn(
            1,
            ["iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listen(server, IPERF_PORT)
        ping_out = cl.workdir / "ping.txt"
        ping_argv = ["ping", "-n", "-D", "-i", f"{a.ping_interval:g}", "-W", "1"]
        ping_argv += ["-w", str(int(total + 120)), cl.tun_addr(1)]
        with open(ping_out, "wb") as f:
            ping = cl.spawn(0, ping_argv, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        log(f"traffic on: {a.warmup:g} s warm-up, then {a.minutes:g} min judged")
        next_sample = next_churn = 0.0
        next_report = 60.0
        while True:
            t = time.monotonic() - t0
            if t >= total:
                break
            self.reap_client(t)
            if self.client is None:
                left = total - t
                if left >= 2:
                    self.start_client(int(min(a.run_seconds, left)))
            if t >= next_sample:
                self.sample(t, nodes)
                next_sample += a.every
            if a.churn_every and t >= next_churn:
                self.churn_step()
                next_churn += a.churn_every
            if t >= next_report:
                last = self.samples[-1]
                log(
                    f"  {t:5.0f} s: "
                    + ", ".join(
                        f"n{n.index} rss {last[f'n{n.index}']['rss_kib']} KiB "
                        f"fds {last[f'n{n.index}']['fds']} "
                        f"threads {last[f'n{n.index}']['threads']}"
                        for n in nodes
                    )
                    + f", load {loadavg()[0]:.2f}"
                )
                next_report += 60.0
            time.sleep(0.2)
        self.sample(time.monotonic() - t0, nodes)
        # Wind down: the last client run, then ping (SIGINT: it prints its statistics).
        if self.client is not None:
            try:
                self.client.wait(timeout=a.run_seconds + 30)
            except subprocess.TimeoutExpired:
                self.client.kill()
                self.client.wait()
            self.reap_client(time.monotonic() - t0)
        ping.send_signal(signal.SIGINT)
        ping.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)
        if self.churn["puts"] > self.churn["deletes"]:
            self.churn_step()
        renewals = {f"n{n.index}": len(n.events("lease renewed")) for n in nodes}
        churn_seen = {
            f"n{n.index}": len(
                [ev for ev in n.events("peer added") if ev.text.startswith(CHURN_SUBNET)]
            )
            for n in nodes
        }
        codes = {f"n{n.index}": n.stop(check=False) for n in nodes}
        return {
            "nodes": {
                f"n{n.index}": node_summary(self.samples, f"n{n.index}", a.warmup) for n in nodes
            },
            "ping": ping_summary(ping_out.read_text(errors="replace"), a.ping_interval),
            "iperf3": self.iperf_runs,
            "churn": {**self.churn, "peer_added_seen": churn_seen},
            "renewals": renewals,
            "exit_codes": codes,
            "fd_baseline": self.fd_baseline,
            "fd_changes": self.fd_changes[:200],
            "samples": self.samples,
        }


# --- report -----------------------------------------------------------------------------------


def fd_line(r: dict[str, Any]) -> str:
    """The samples whose fd table differed from the first one, and what the difference was."""
    changes = r.get("fd_changes", [])
    if not changes:
        return f"- fd tables: every one of the {len(r['samples'])} samples as the first one"

    def kinds(fds: dict[str, str]) -> str:
        return ", ".join(sorted({v.split(":")[0] for v in fds.values()})) or "-"

    parts = [
        f"{c['node']} at {c['t']:g} s: +{len(c['new'])} ({kinds(c['new'])}) "
        f"-{len(c['gone'])} ({kinds(c['gone'])})"
        for c in changes[:10]
    ]
    more = f" and {len(changes) - 10} more" if len(changes) > 10 else ""
    return (
        f"- fd tables differing from the first sample, in {len(changes)} of "
        f"{len(r['samples'])} samples: " + "; ".join(parts) + more
    )


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    a = report["args"]
    m = report["machine"]
    lines = [
        "# udpbackend soak",
        "",
        f"- date: {report['date']}, commit {report['commit']}",
        f"- machine: {m['cores']} CPUs, {m['cpu_model']}, kernel {m['kernel']}",
        f"- load average: {report['load_start']} at the start, {report['load_end']} at the end; "
        f"run at nice {report['nice']}",
        f"- {a['minutes']:g} min judged after a {a['warmup']:g} s warm-up; two etcd-mode daemons "
        f"(mode {a['mode']}), iperf3 TCP n0 -> n1 in {a['run_seconds']} s runs"
        f"{' at ' + a['bitrate'] if a['bitrate'] else ''}, ping every {a['ping_interval']:g} s, "
        f"a lease put/deleted every {a['churn_every']:g} s, renewal margin {a['renew_margin']} min",
        "",
        "| daemon | RSS start | RSS end | growth | slope /10 min | fds (min-max) | threads "
        "(min-max) | CPU s | bars |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, s in r["nodes"].items():
        rss, fds, th = s["rss_kib"], s["fds"], s["threads"]
        bars = s["bars"]
        ok = (
            "pass"
            if all(bars.values())
            else "FAIL " + ", ".join(k for k, v in bars.items() if not v)
        )
        lines.append(
            f"| {name} | {rss['start']} KiB | {rss['end']} KiB | {rss['growth']:+d} KiB | "
            f"{rss['slope_per_10min']:+d} KiB | {fds['min']}-{fds['max']} | "
            f"{th['min']}-{th['max']} | {s['cpu_s']} | {ok} |"
        )
    runs = [x for x in r["iperf3"] if "gbps" in x]
    errors = [x for x in r["iperf3"] if "error" in x]
    p = r["ping"]
    if runs:
        gbps = [x["gbps"] for x in runs]
        iperf = (
            f"- iperf3: {len(runs)} runs, median {statistics.median(gbps):.2f} Gbit/s "
            f"(min {min(gbps):.2f}, max {max(gbps):.2f}), "
            f"{sum(x['retransmits'] for x in runs)} retransmits"
        )
        if errors:
            iperf += f"; {len(errors)} runs failed"
    else:
        iperf = "- iperf3: no run completed"
    lines += [
        "",
        "- RSS when traffic started (before the warm-up): "
        + ", ".join(f"{k} {v['rss_kib']['traffic_start']} KiB" for k, v in r["nodes"].items()),
        iperf,
        f"- ping: {p['received']} replies, {p['lost']} lost; RTT p50 {p['rtt_ms']['p50']} ms, "
        f"p99 {p['rtt_ms']['p99']} ms, max {p['rtt_ms']['max']} ms (under the TCP load)",
        f"- control plane: {r['churn']['puts']} lease puts, {r['churn']['deletes']} deletes; "
        f"renewals {r['renewals']}; exit codes {r['exit_codes']}",
        fd_line(r),
        "",
        "RSS is VmRSS of the daemon process, sampled every "
        f"{a['every']:g} s; growth is the last judged sample minus the first, the slope a "
        "least-squares fit over the judged window. Bars: growth <= 1 MiB, open fds at the end "
        "as at the start (transient ones listed above).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="the judged window")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic not judged")
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--mode", default="batched", help="the daemons' --mode")
    p.add_argument("--run-seconds", type=int, default=60, help="length of one iperf3 run")
    p.add_argument("--bitrate", default="", help="iperf3 -b (e.g. 500M); empty: unlimited")
    p.add_argument("--ping-interval", type=float, default=0.1)
    p.add_argument("--churn-every", type=float, default=10.0, help="0: no lease churn")
    p.add_argument("--renew-margin", type=int, default=1439, help="minutes (1..1439)")
    p.add_argument("--out", default="benchmarks/results", help="directory for soak.*")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.every <= 0 or args.run_seconds < 2:
        p.error("--minutes and --every must be > 0, --run-seconds >= 2")
    missing = cluster_missing_requirements()
    if missing:
        log(f"soak needs {', '.join(missing)}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_info(),
        "versions": versions(),
        "nice": os.nice(0),
        "load_start": loadavg(),
        "args": vars(args),
        "config": {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}},
    }
    try:
        with sigterm_as_interrupt(), Cluster(nodes=2, prefix="ubsoak") as cl:
            cl.put_config(report["config"])
            report["results"] = Soak(cl, args).run()
    except KeyboardInterrupt:
        log("interrupted: cluster removed, no results written")
        return 130
    except TestbedError as e:
        log(f"FAILED: {e}")
        return 1
    report["load_end"] = loadavg()
    md = markdown(report)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "soak.md").write_text(md)
    print(md)
    log(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    bars = [all(n["bars"].values()) for n in report["results"]["nodes"].values()]
    return 0 if all(bars) else 3


if __name__ == "__main__":
    raise SystemExit(main())
