"""What results.json says about where it was measured: the machine and the versions.

Lives here: cores, kernel, CPU model and memory from /proc, the versions of udpbackend, Python,
its libraries and iperf3, and iperf3's optional features (is -Z there). Must not: measure.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from typing import Any


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
                break
    return {
        "cores": os.cpu_count() or 1,
        "kernel": platform.release(),
        "cpu_model": model or platform.processor() or "unknown",
        "memory_gib": mem,
        "arch": platform.machine(),
    }


def versions() -> dict[str, str]:
    from ... import __version__

    out = {"udpbackend": str(__version__), "python": platform.python_version()}
    for dist in ("cffi", "uvloop", "pyroute2"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        text = subprocess.run(
            ["iperf3", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        out["iperf3"] = text.splitlines()[0].strip() if text else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["iperf3"] = "missing"
    return out


def iperf3_features() -> str:
    """iperf3's "Optional features available" line (e.g. "sendfile / zerocopy")."""
    try:
        text = subprocess.run(
            ["iperf3", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in text.splitlines():
        if line.startswith("Optional features"):
            return line
    return ""
