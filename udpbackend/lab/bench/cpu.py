"""CPU time from /proc: all cores' busy time (/proc/stat) and the daemons' own (/proc/PID).

Lives here: the readers, the per-run "cpu" document (busy, user, system, softirq and daemon
seconds around the single TCP stream) and the daemons' voluntary context switches (wake-ups).
Must not: start traffic or read the daemons' stats files (counters.py does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stat() -> dict[str, int]:
    """Jiffies over all cores from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: parts[i] if i < len(parts) else 0 for i, n in enumerate(names)}


def cpu_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
    d = {k: (b[k] - a[k]) / CLK_TCK for k in a}
    return {
        "user_s": d["user"] + d["nice"],
        "system_s": d["system"] + d["irq"],
        "softirq_s": d["softirq"],
        "busy_s": d["user"] + d["nice"] + d["system"] + d["irq"] + d["softirq"],
    }


def pid_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def pid_wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of pid: each is a sleep (e.g. in epoll) that
    ended in a wake-up."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


@dataclass
class CpuSample:
    """All cores' jiffies and each daemon's CPU seconds at one moment."""

    jiffies: dict[str, int]
    daemons_s: list[float]


def sample(pids: Sequence[int]) -> CpuSample:
    return CpuSample(proc_stat(), [pid_cpu_s(pid) for pid in pids])


def cpu_doc(before: CpuSample, after: CpuSample, moved_bytes: int) -> dict[str, Any]:
    """A run's "cpu" document: the CPU spent between two samples while moving moved_bytes
    (daemon_s is None when no daemon was sampled: a kernel rung)."""
    cpu = cpu_delta(before.jiffies, after.jiffies)
    daemons = before.daemons_s and after.daemons_s
    return {
        **{k: round(v, 3) for k, v in cpu.items()},
        "daemon_s": round(sum(after.daemons_s) - sum(before.daemons_s), 3) if daemons else None,
        "bytes": moved_bytes,
    }
