"""The results for people: the Markdown table (results.md), the terminal table, and the files.

Lives here: one row per rung with each figure and its ratio to kernel VXLAN, the one-paragraph
description of how it was measured, the Markdown document (with notes and --explain text),
the rich table, and writing results.json, results.md and ladder.png. Must not: measure, or
import rich/matplotlib at module import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chart import chart


def fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(x: float | None, sep: str = " ") -> str:
    if x is None:
        return ""
    return f"{sep}({x:.2f}x)" if x < 10 else f"{sep}({x:.0f}x)"


TABLE_COLUMNS = (
    "rung",
    "TCP 1 stream Gbit/s",
    "TCP 4 streams Gbit/s",
    "UDP 64 B kpps",
    "UDP 1400 B kpps",
    "RTT idle p50 / p99 ms",
    "RTT loaded p50 / p99 ms",
    "CPU s/GB",
    "syscalls/pkt",
    "mean batch",
    "retrans 1 / 4",
)


# the same columns, narrower, for the terminal (rung names instead of labels)
RICH_COLUMNS = (
    "rung",
    "TCP x1\nGbit/s",
    "TCP x4\nGbit/s",
    "UDP 64 B\nkpps",
    "UDP 1400 B\nkpps",
    "RTT idle\np50 / p99 ms",
    "RTT loaded\np50 / p99 ms",
    "CPU\ns/GB",
    "sys-\ncalls\n/pkt",
    "mean\nbatch",
    "retrans\n1 / 4",
)


def _lb(rung: dict[str, Any], key: str) -> str:
    return ">= " if key in rung.get("lower_bounds", []) else ""


def table_rows(doc: dict[str, Any], sep: str = " ", short: bool = False) -> list[list[str]]:
    """One row per rung: each figure with its ratio to kernel VXLAN in parentheses (after
    `sep`); short: the rung's name instead of its label."""
    rows = []
    for r in doc["rungs"]:
        name = r["name"] if short else r["label"]
        if r["status"] != "ok":
            rows.append([name, f"error: {r['error']}"] + [""] * (len(TABLE_COLUMNS) - 2))
            continue
        f, q = r["figures"], r["ratios_vs_vxlan"]

        def cell(key: str, digits: int, r: dict[str, Any] = r) -> str:
            f, q = r["figures"], r["ratios_vs_vxlan"]
            return _lb(r, key) + fmt(f[key], digits) + _ratio(q[key], sep)

        rows.append(
            [
                name,
                cell("tcp1_gbps", 2),
                cell("tcp4_gbps", 2),
                cell("udp64_kpps", 0),
                cell("udp1400_kpps", 0),
                f"{fmt(f['rtt_idle_p50_ms'], 3)} / {fmt(f['rtt_idle_p99_ms'], 3)}"
                + _ratio(q["rtt_idle_p50_ms"], sep),
                f"{fmt(f['rtt_loaded_p50_ms'], 2)} / {fmt(f['rtt_loaded_p99_ms'], 2)}"
                + _ratio(q["rtt_loaded_p99_ms"], sep),
                cell("cpu_s_per_gb", 2),
                "-" if f["syscalls_per_packet"] is None else fmt(f["syscalls_per_packet"], 2),
                "-" if f["mean_batch"] is None else fmt(f["mean_batch"], 1),
                f"{fmt(f['tcp1_retransmits'], 0)} / {fmt(f['tcp4_retransmits'], 0)}",
            ]
        )
    return rows


def describe(doc: dict[str, Any]) -> str:
    m, s, v = doc["machine"], doc["settings"], doc["versions"]
    return (
        f"{doc['date']}: {m['cores']} cores ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {v['python']}, {v['iperf3']}. Median of {s['runs']} runs; TCP {s['tcp_seconds']} s"
        f"{' with -Z' if s['zerocopy'] else ''}; UDP rate: at most {s['udp_probes']} probes of "
        f"{s['udp_seconds']} s (iperf3 -w {s.get('udp_window', '?')}), highest rate delivered at "
        f"<= {s['udp_loss_max']:.0%} loss; RTT: "
        f"ping {s['pings_idle']} x {s['ping_interval_s'] * 1000:g} ms idle, every "
        f"{s['loaded_ping_interval_s'] * 1000:g} ms during the TCP stream; underlay veth MTU "
        f"{s['underlay_mtu']}. (n.nnx) = ratio to kernel VXLAN in the same run."
    )


def markdown(doc: dict[str, Any], explain_text: bool = True) -> str:
    lines = [
        "# udpbackend overlay benchmark",
        "",
        describe(doc),
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(doc)]
    lines += [
        "",
        "CPU s/GB: busy CPU time of all cores (user + system + softirq, from /proc/stat) per GB "
        "moved by the single TCP stream. syscalls/pkt and mean batch: both daemons' own "
        "counters over the TCP runs. RTT ratios: p50 idle, p99 loaded. `>=`: one iperf3 sender "
        "could not overload the path (the rate is the sender's, a lower bound).",
    ]
    for note in doc.get("notes", []):
        lines.append(f"\nNote: {note}")
    if explain_text and doc.get("explain"):
        lines += ["", "## What each step of the ladder changes", ""]
        lines += [f"- {p}" for p in doc["explain"]]
    return "\n".join(lines) + "\n"


def render_rich_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="udpbackend overlay ladder (ratio to kernel VXLAN)", show_lines=True)
    for i, col in enumerate(RICH_COLUMNS):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(doc, sep="\n", short=True):
        t.add_row(*row)
    return t


def write_outputs(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "ladder.png"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown(doc))
    chart(doc, paths[2])
    return paths
