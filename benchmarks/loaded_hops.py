#!/usr/bin/env python3
# Where a ping waits under load, hop by hop (issue "Latency and CPU", item 3): two static nodes
# (udpbackend.lab.testbed.Testbed), one iperf3 TCP stream a -> b, a ping a -> b during it, and
# tcpdump on both flannel0 devices and both underlay veths. Each echo request and reply is found
# in the four captures by its ICMP id/seq (inside the outer UDP on the veths), so every round
# trip splits into: a's daemon (TUN -> UDP), the wire, b's daemon (UDP -> TUN), b's kernel, b's
# daemon back, the wire, a's daemon back. Not in CI. Must not: leave namespaces or processes
# behind (the Testbed ends every process it started, also on failure); needs root, iperf3, tcpdump.
"""Usage: python benchmarks/loaded_hops.py [--runs 3] [--seconds 6] [--pings 200]
                                        [--interval 0.02] [--config NAME=ARGS ...]
                                        [--out benchmarks/results]

--config takes a label and the daemon flags it adds, e.g. --config "rt=--rt-priority 1"
(repeatable; default: the default configuration, --queues 1 and --rt-priority 1).
Prints, per configuration, each hop's p50 / p90 / p99 in ms (medians over the runs), and
writes OUT/loaded-hops.json and OUT/loaded-hops.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from udpbackend.lab.testbed import Testbed

UDP_PORT = 8285
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
QS = ("p50", "p90", "p99")
DEFAULT_CONFIGS = ["default=", "queues-1=--queues 1", "rt-priority-1=--rt-priority 1"]
# (name, where the packet is seen first, where next): the request's and the reply's path
HOPS = [
    ("a daemon: TUN -> UDP", ("a", "tun", "req"), ("a", "wire", "req")),
    ("wire a -> b", ("a", "wire", "req"), ("b", "wire", "req")),
    ("b daemon: UDP -> TUN", ("b", "wire", "req"), ("b", "tun", "req")),
    ("b kernel: echo reply", ("b", "tun", "req"), ("b", "tun", "rep")),
    ("b daemon: TUN -> UDP", ("b", "tun", "rep"), ("b", "wire", "rep")),
    ("wire b -> a", ("b", "wire", "rep"), ("a", "wire", "rep")),
    ("a daemon: UDP -> TUN", ("a", "wire", "rep"), ("a", "tun", "rep")),
    ("round trip", ("a", "tun", "req"), ("a", "tun", "rep")),
]


def echoes(pcap: Path, outer: bool) -> dict[tuple[str, int], float]:
    """(kind, seq) -> first timestamp of each ICMP echo in a pcap: raw IPv4 (a TUN) or
    Ethernet + IPv4 + UDP/8285 carrying the packet (outer=True, an underlay veth)."""
    data = pcap.read_bytes()
    if len(data) < 24:
        return {}
    magic, linktype = struct.unpack_from("<I", data)[0], struct.unpack_from("<I", data, 20)[0]
    if magic != 0xA1B2C3D4:
        raise SystemExit(f"{pcap}: not a little-endian microsecond pcap")
    seen: dict[tuple[str, int], float] = {}
    off = 24
    while off + 16 <= len(data):
        sec, usec, caplen, _ = struct.unpack_from("<IIII", data, off)
        pkt = data[off + 16 : off + 16 + caplen]
        off += 16 + caplen
        p = pkt[14:] if linktype == 1 else pkt
        if outer:
            if len(p) < 28 or p[9] != 17:
                continue
            ihl = (p[0] & 15) * 4
            if struct.unpack_from("!H", p, ihl + 2)[0] != UDP_PORT:
                continue
            p = p[ihl + 8 :]
        if len(p) < 28 or p[0] >> 4 != 4 or p[9] != 1:
            continue
        ihl = (p[0] & 15) * 4
        kind = {ICMP_ECHO_REQUEST: "req", ICMP_ECHO_REPLY: "rep"}.get(p[ihl])
        if kind is None:
            continue
        seq = struct.unpack_from("!H", p, ihl + 6)[0]
        seen.setdefault((kind, seq), sec + usec / 1e6)
    return seen


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def split_hops(
    seen: dict[tuple[str, str], dict[tuple[str, int], float]],
) -> tuple[dict[str, list[float]], int]:
    """Each hop's delays in ms over the pings seen at all eight points (node, capture, kind),
    and how many those were; a ping missing anywhere (lost, or missed by a capture) is left out."""
    points = sorted({p for _, a, b in HOPS for p in (a, b)})
    hops: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    complete = 0
    for seq in sorted({seq for kind, seq in seen.get(("a", "tun"), {}) if kind == "req"}):
        stamps: dict[tuple[str, str, str], float] = {}
        for n, w, k in points:
            ts = seen.get((n, w), {}).get((k, seq))
            if ts is None:
                break
            stamps[(n, w, k)] = ts
        else:
            complete += 1
            for name, a, b in HOPS:
                hops[name].append((stamps[b] - stamps[a]) * 1e3)
    return hops, complete


def one_run(
    extra: list[str], seconds: int, pings: int, interval: float, work: Path
) -> dict[str, Any]:
    with Testbed() as tb:
        tb.start_pair(extra_args=extra)
        dst = tb.tun_addr("b")
        caps: list[tuple[subprocess.Popen[bytes], Path, str, str]] = []
        for node in ("a", "b"):
            for where, dev, flt in (
                ("tun", "flannel0", "icmp"),
                ("wire", tb.veth(node), f"udp port {UDP_PORT} and less 200"),
            ):
                path = work / f"{node}-{where}.pcap"
                argv = ["tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-s", "200",
                        "-w", str(path), flt]  # fmt: skip
                proc = tb.spawn(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                caps.append((proc, path, node, where))
        time.sleep(1.0)  # tcpdump attaches its filters
        result: dict[str, Any] = {}
        stream = threading.Thread(
            target=lambda: result.setdefault("tcp", tb.iperf3("a", dst, seconds=seconds))
        )
        stream.start()
        time.sleep(0.5)  # past iperf3's ramp-up
        ping = tb.ping_start("a", dst, count=pings, interval=interval)
        stream.join()
        pr = ping()
        time.sleep(0.3)
        for proc, *_ in caps:
            proc.send_signal(signal.SIGINT)
        for proc, *_ in caps:
            proc.wait(5)
        seen = {(node, where): echoes(path, where == "wire") for _, path, node, where in caps}
    hops, complete = split_hops(seen)
    return {
        "tcp_gbps": round(result["tcp"].bits_per_second / 1e9, 3),
        "retransmits": result["tcp"].retransmits,
        "ping_sent": pr.sent,
        "ping_received": pr.received,
        "matched": complete,
        "ping_p50_ms": round(statistics.median(pr.rtts_ms), 3) if pr.rtts_ms else None,
        "ping_p99_ms": round(pct(pr.rtts_ms, 0.99), 3) if pr.rtts_ms else None,
        "hops_ms": {
            name: {f"p{int(q * 100)}": round(pct(v, q), 3) for q in (0.5, 0.9, 0.99)}
            for name, v in hops.items()
            if v
        },
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Any) -> float | None:
        xs = [x for x in (get(r) for r in runs) if x is not None]
        return round(statistics.median(xs), 3) if xs else None

    out: dict[str, Any] = {
        k: med(lambda r, k=k: r[k]) for k in ("tcp_gbps", "ping_p50_ms", "ping_p99_ms")
    }
    out["hops_ms"] = {
        name: {q: med(lambda r, name=name, q=q: r["hops_ms"].get(name, {}).get(q)) for q in QS}
        for name, _, _ in HOPS
    }
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Where a ping waits under one TCP stream, hop by hop",
        "",
        f"{doc['date']}: {doc['machine']}. {doc['runs']} runs per configuration: iperf3 a -> b "
        f"{doc['seconds']} s, {doc['pings']} pings every {doc['interval']} s during it; tcpdump "
        "on both flannel0 and both veths, each echo found by its ICMP id/seq. Figures: ms, "
        "p50 / p90 / p99 over each run's pings, median over the runs.",
        "",
    ]
    names = list(doc["configs"])
    lines.append("| hop | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for name, _, _ in HOPS:
        cells = []
        for c in names:
            h = doc["configs"][c]["summary"]["hops_ms"][name]
            cells.append(" / ".join("-" if h[q] is None else f"{h[q]:.3f}" for q in QS))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, label in (("tcp_gbps", "TCP Gbit/s"), ("ping_p99_ms", "ping p99 ms (ping's own)")):
        row = [str(doc["configs"][c]["summary"][key]) for c in names]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("")
    given = [f"`{c}`: `{doc['configs'][c]['args'] or '(none)'}`" for c in names]
    lines.append("Configurations: " + "; ".join(given) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--config", action="append", metavar="NAME=ARGS")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    if a.runs < 1 or a.seconds < 2 or a.pings < 10 or not 0.002 <= a.interval <= 1:
        ap.error("--runs >= 1, --seconds >= 2, --pings >= 10, --interval in [0.002, 1]")
    if a.pings * a.interval > a.seconds - 1:
        ap.error("the pings must fit inside the stream: --pings x --interval <= --seconds - 1")
    configs: dict[str, list[str]] = {}
    for spec in a.config or DEFAULT_CONFIGS:
        name, sep, args = spec.partition("=")
        if not sep or not name:
            ap.error(f"--config {spec!r}: expected NAME=ARGS")
        configs[name] = shlex.split(args)
    work = a.out / ".loaded-hops-pcaps"
    work.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{len(os.sched_getaffinity(0))} cores, kernel {platform.release()}",
        "runs": a.runs, "seconds": a.seconds, "pings": a.pings, "interval": a.interval,
        "configs": {},
    }  # fmt: skip
    try:
        for run in range(a.runs):  # interleaved: each run of every configuration, then the next
            for name, extra in configs.items():
                r = one_run(extra, a.seconds, a.pings, a.interval, work)
                entry = doc["configs"].setdefault(name, {"args": shlex.join(extra), "runs": []})
                entry["runs"].append(r)
                rt = r["hops_ms"].get("round trip", {})
                print(f"run {run + 1} {name}: TCP {r['tcp_gbps']} Gbit/s, {r['matched']} of "
                      f"{r['ping_sent']} pings matched, round trip p50/p99 "
                      f"{rt.get('p50')}/{rt.get('p99')} ms", flush=True)  # fmt: skip
    finally:
        for p in work.glob("*.pcap"):
            p.unlink()
        work.rmdir()
    for entry in doc["configs"].values():
        entry["summary"] = summary(entry["runs"])
    md = markdown(doc)
    (a.out / "loaded-hops.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / "loaded-hops.md").write_text(md)
    print(md)
    print(f"wrote {a.out / 'loaded-hops.json'}, {a.out / 'loaded-hops.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
