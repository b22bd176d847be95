"""The chart: ladder.png, TCP throughput and UDP packet rate per rung as horizontal bars.

Kernel VXLAN is drawn as a reference line and each bar is labelled with its value and its ratio
to VXLAN. Must not: import matplotlib at module import time (only inside chart()).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .figures import ok_rung

# (title, unit, ((figure key, series name), ...), digits)
Panel = tuple[str, str, tuple[tuple[str, str], ...], int]
PANELS: tuple[Panel, ...] = (
    (
        "TCP throughput (iperf3)",
        "Gbit/s",
        (("tcp1_gbps", "1 stream"), ("tcp4_gbps", "4 streams")),
        2,
    ),
    (
        "UDP packet rate at \u2264 1 % loss",
        "thousand packets/s (kpps)",
        (("udp64_kpps", "64 B payload"), ("udp1400_kpps", "1400 B payload")),
        0,
    ),
)
COLORS = ("#2b6cb0", "#90cdf4")
BAR_H = 0.38


def chart(doc: dict[str, Any], path: Path) -> None:
    """ladder.png: TCP throughput and UDP packet rate per rung, horizontal bars, kernel VXLAN
    as a dashed reference line, each bar labelled with its value and ratio to VXLAN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = [r for r in doc["rungs"] if r["status"] == "ok"]
    vx = ok_rung(doc, "vxlan")
    height = 1.2 + 0.75 * max(1, len(rungs))
    fig, axes = plt.subplots(1, 2, figsize=(15, height + 2.0), sharey=True)
    for ax, panel in zip(axes, PANELS, strict=True):
        _panel(ax, panel, rungs, vx)
    axes[0].set_yticks(list(range(len(rungs))), [r["label"] for r in rungs])
    axes[0].invert_yaxis()
    _captions(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, panel: Panel, rungs: list[dict[str, Any]], vx: dict[str, Any] | None) -> None:
    """One panel: two bar series, VXLAN's reference lines, the kernel/user-space divider."""
    title, unit, series, digits = panel
    xmax = 0.0
    for j, (key, name) in enumerate(series):
        xmax = max(xmax, _bars(ax, rungs, vx, key, name, j, digits))
    if vx:
        _vxlan_lines(ax, vx, series)
    # kernel paths above the line, udpbackend's user-space modes below it
    kernel = [i for i, r in enumerate(rungs) if r["kind"] == "kernel"]
    if kernel and len(kernel) < len(rungs):
        ax.axhline(max(kernel) + 0.5, color="#a0aec0", linewidth=0.8, zorder=1)
    ax.set_xlim(0, xmax * 1.32 if xmax else 1)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(f"{unit}, higher is better")
    ax.grid(axis="x", color="#e2e8f0", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    # under the axes: inside, it would cover the labels of the longest bars
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)


def _bars(
    ax: Any,
    rungs: list[dict[str, Any]],
    vx: dict[str, Any] | None,
    key: str,
    name: str,
    j: int,
    digits: int,
) -> float:
    """Series j of a panel: one labelled bar per rung; returns the longest bar's value."""
    vals = [r["figures"][key] or 0.0 for r in rungs]
    ys = [y + (j - 0.5) * BAR_H for y in range(len(rungs))]
    ax.barh(ys, vals, height=BAR_H, color=COLORS[j], label=name, zorder=2)
    for y, r, v in zip(ys, rungs, vals, strict=True):
        q = r["ratios_vs_vxlan"].get(key)
        bound = "\u2265 " if key in r.get("lower_bounds", []) else ""
        text = f"{bound}{v:.{digits}f}" + (f"  ({q:.2f}x)" if q is not None and r is not vx else "")
        ax.text(
            v,
            y,
            " " + text,
            va="center",
            ha="left",
            fontsize=8.5,
            zorder=3,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85},
        )
    return max([0.0, *vals])


def _vxlan_lines(ax: Any, vx: dict[str, Any], series: tuple[tuple[str, str], ...]) -> None:
    for j, (key, name) in enumerate(series):
        ref = vx["figures"].get(key)
        if ref:
            bound = " (\u2265, sender-bound)" if key in vx["lower_bounds"] else ""
            ax.axvline(
                ref,
                color="#c53030",
                linestyle="--" if j == 0 else ":",
                linewidth=1.3,
                zorder=1,
                label=f"kernel VXLAN, {name}{bound}",
            )


def _captions(fig: Any, doc: dict[str, Any]) -> None:
    m, s = doc["machine"], doc["settings"]
    fig.suptitle(
        f"udpbackend overlay ladder: median of {s['runs']} runs, (n.nnx) = ratio to kernel VXLAN",
        fontsize=12,
        x=0.01,
        y=0.985,
        ha="left",
    )
    fig.text(
        0.01,
        0.01,
        f"{m['cores']} cores, {m['cpu_model']}, kernel {m['kernel']}, {doc['date'][:10]}; two "
        f"netns on a veth pair (MTU {s['underlay_mtu']}); iperf3 and the daemons share the "
        "cores. \u2265: one iperf3 sender could not overload the path (a lower bound).",
        fontsize=8,
        color="#4a5568",
    )
