"""`udpbackend bench`: the overlay benchmark ladder, measured side by side in one invocation.

Lives here: the rungs (veth ceiling, kernel VXLAN as flannel configures it, and udpbackend's
modes), the measuring protocol of performance-anchors.md §7 scaled to this machine (iperf3 TCP
1 and 4 streams, UDP packet rate at <= 1 % loss by bisection, ping RTT idle and under load, CPU
from /proc, the daemons' own counters), medians and ratios against VXLAN, the JSON schema of
results.json and its validator, the Markdown/terminal table, the PNG chart and the --explain
text. Must not: touch anything outside the namespaces its Testbed creates, leave a namespace or
a process behind (also on Ctrl-C or failure), or import rich/matplotlib at module import time.

Adding a rung: append ``Rung(name, label, setup)`` to RUNGS, where ``setup(tb)`` is a context
manager that yields a RungEnv (the address to measure against, the daemons to read counters
from) and undoes its set-up on exit; :func:`daemon_rung` builds one for a daemon mode + flags.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import ipaddress
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .testbed import Node, Testbed

SCHEMA_ID = "udpbackend-bench/1"


class BenchError(Exception):
    """A user-facing problem (bad flag, missing tool): one line, exit code 2."""


LOSS_MAX = 0.01  # UDP packet rate: highest rate delivered at <= 1 % loss
# iperf3 -w for the UDP runs: without it the receiver's default socket buffer overflows on
# iperf3's 1 ms send bursts and "loss" measures the receiving iperf3, not the path. The
# daemons' own UDP sockets have 4 MB buffers too.
UDP_WINDOW = "4M"
NS_PREFIX = "ubbench"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# --- the figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    daemon_only: bool = False


FIGURES: tuple[Figure, ...] = (
    Figure("tcp1_gbps", "TCP, 1 stream", "Gbit/s", "higher"),
    Figure("tcp4_gbps", "TCP, 4 streams", "Gbit/s", "higher"),
    Figure("udp64_kpps", "UDP 64 B at <= 1 % loss", "kpps", "higher"),
    Figure("udp1400_kpps", "UDP 1400 B at <= 1 % loss", "kpps", "higher"),
    Figure("rtt_idle_p50_ms", "RTT idle p50", "ms", "lower"),
    Figure("rtt_idle_p99_ms", "RTT idle p99", "ms", "lower"),
    Figure("rtt_loaded_p50_ms", "RTT under a TCP stream p50", "ms", "lower"),
    Figure("rtt_loaded_p99_ms", "RTT under a TCP stream p99", "ms", "lower"),
    Figure("cpu_s_per_gb", "CPU of all cores per GB, TCP 1 stream", "s/GB", "lower"),
    Figure("daemon_cpu_s_per_gb", "daemons' CPU per GB, TCP 1 stream", "s/GB", "lower", True),
    Figure("syscalls_per_packet", "daemon syscalls per packet, TCP", "1/pkt", "lower", True),
    Figure("mean_batch", "mean batch (packets per pump round), TCP", "pkt", "higher", True),
    Figure("tcp1_retransmits", "TCP retransmits, 1 stream", "segments", "lower"),
    Figure("tcp4_retransmits", "TCP retransmits, 4 streams", "segments", "lower"),
)
FIGURE_KEYS = tuple(f.key for f in FIGURES)
PHASES = ("tcp", "udp64")  # counter phases of a daemon rung (see measure_rung)
PHASE_FIELDS = (
    "packets",
    "syscalls_per_packet",
    "mean_batch",
    "packets_per_send",
    "packets_per_receive",
    "packets_per_tun_read",
    "packets_per_tun_write",
    "gso_sends",
    "gro_receives",
    "tso_reads",
    "tun_gro_writes",
    "wakeups_per_packet",
    "daemon_cpu_us_per_packet",
    "user_kernel_copies_per_packet",
    "drops",
)

# --- the JSON schema of results.json (JSON Schema 2020-12) --------------------------------------

_NUM_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}
_PROBE: dict[str, Any] = {
    "type": "object",
    "required": ["offered_pps", "sent_pps", "received_pps", "loss"],
    "properties": {
        "offered_pps": _NUM_OR_NULL,  # null: unlimited (iperf3 -b 0)
        "sent_pps": {"type": "number", "minimum": 0},
        "received_pps": {"type": "number", "minimum": 0},
        "loss": {"type": "number", "minimum": 0},
    },
}
_UDP_SEARCH: dict[str, Any] = {
    "type": "object",
    "required": ["size", "pps", "loss", "sender_bound", "probes"],
    "properties": {
        "size": {"type": "integer", "minimum": 1},
        "pps": _NUM_OR_NULL,  # null: no probe stayed within LOSS_MAX
        "loss": _NUM_OR_NULL,
        "sender_bound": {"type": "boolean"},  # the unlimited sender passed: a lower bound
        "probes": {"type": "array", "items": _PROBE, "minItems": 1},
    },
}
_TCP: dict[str, Any] = {
    "type": "object",
    "required": ["bits_per_second", "retransmits", "bytes", "seconds"],
    "properties": {
        "bits_per_second": {"type": "number", "minimum": 0},
        "sent_bits_per_second": {"type": "number", "minimum": 0},
        "retransmits": {"type": "integer", "minimum": 0},
        "bytes": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        "streams": {"type": "integer", "minimum": 1},
    },
}
_PING: dict[str, Any] = {
    "type": "object",
    "required": ["sent", "received", "p50_ms", "p99_ms"],
    "properties": {
        "sent": {"type": "integer", "minimum": 0},
        "received": {"type": "integer", "minimum": 0},
        "p50_ms": _NUM_OR_NULL,
        "p99_ms": _NUM_OR_NULL,
        "avg_ms": _NUM_OR_NULL,
        "min_ms": _NUM_OR_NULL,
        "max_ms": _NUM_OR_NULL,
    },
}
_PHASE: dict[str, Any] = {
    "type": "object",
    "required": list(PHASE_FIELDS),
    "properties": {
        **{k: _NUM_OR_NULL for k in PHASE_FIELDS if k != "drops"},
        "drops": {"type": "object", "additionalProperties": {"type": "number"}},
        "syscalls": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
_RUN: dict[str, Any] = {
    "type": "object",
    "required": ["tcp1", "tcp4", "ping_idle", "ping_loaded", "udp64", "udp1400", "cpu"],
    "properties": {
        "tcp1": _TCP,
        "tcp4": _TCP,
        "ping_idle": _PING,
        "ping_loaded": _PING,
        "udp64": _UDP_SEARCH,
        "udp1400": _UDP_SEARCH,
        "cpu": {
            "type": "object",
            "required": ["busy_s", "user_s", "system_s", "softirq_s", "bytes"],
            "properties": {
                "busy_s": {"type": "number", "minimum": 0},
                "user_s": {"type": "number", "minimum": 0},
                "system_s": {"type": "number", "minimum": 0},
                "softirq_s": {"type": "number", "minimum": 0},
                "daemon_s": _NUM_OR_NULL,
                "bytes": {"type": "integer", "minimum": 0},
            },
        },
        "counters": {
            "type": ["object", "null"],
            "required": ["tcp"],
            "properties": {"tcp": _PHASE},
        },
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "udpbackend bench results",
    "description": (
        "One invocation of `udpbackend bench`: the machine, the versions, the settings, and per "
        "rung the median figures, their ratios to kernel VXLAN measured in the same invocation "
        "(null when VXLAN was not run or a figure is missing), the daemon counters per traffic "
        "phase (median over runs) and every raw run."
    ),
    "type": "object",
    "required": [
        "schema",
        "date",
        "duration_s",
        "machine",
        "versions",
        "settings",
        "figures",
        "rungs",
        "explain",
    ],
    "properties": {
        "schema": {"enum": [SCHEMA_ID]},
        "date": {"type": "string"},
        "duration_s": {"type": "number", "minimum": 0},
        "machine": {
            "type": "object",
            "required": ["cores", "kernel", "cpu_model"],
            "properties": {
                "cores": {"type": "integer", "minimum": 1},
                "kernel": {"type": "string"},
                "cpu_model": {"type": "string"},
                "memory_gib": _NUM_OR_NULL,
                "arch": {"type": "string"},
            },
        },
        "versions": {
            "type": "object",
            "required": ["udpbackend", "python", "iperf3"],
            "additionalProperties": {"type": "string"},
        },
        "settings": {
            "type": "object",
            "required": [
                "quick",
                "runs",
                "tcp_seconds",
                "udp_seconds",
                "udp_probes",
                "udp_loss_max",
                "pings_idle",
                "ping_interval_s",
                "zerocopy",
                "underlay_mtu",
                "rungs",
            ],
            "properties": {
                "quick": {"type": "boolean"},
                "runs": {"type": "integer", "minimum": 1},
                "tcp_seconds": {"type": "integer", "minimum": 1},
                "udp_seconds": {"type": "integer", "minimum": 1},
                "udp_probes": {"type": "integer", "minimum": 1},
                "udp_loss_max": {"type": "number"},
                "udp_window": {"type": "string"},
                "pings_idle": {"type": "integer", "minimum": 1},
                "ping_interval_s": {"type": "number"},
                "zerocopy": {"type": "boolean"},
                "underlay_mtu": {"type": "integer"},
                "rungs": {"type": "array", "items": {"type": "string"}},
            },
        },
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "label", "unit", "better"],
                "properties": {
                    "key": {"enum": list(FIGURE_KEYS)},
                    "label": {"type": "string"},
                    "unit": {"type": "string"},
                    "better": {"enum": ["higher", "lower"]},
                },
            },
        },
        "rungs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "label",
                    "kind",
                    "status",
                    "error",
                    "figures",
                    "ratios_vs_vxlan",
                    "counters",
                    "lower_bounds",
                    "runs",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "label": {"type": "string"},
                    "kind": {"enum": ["kernel", "daemon"]},
                    "status": {"enum": ["ok", "error"]},
                    "error": {"type": ["string", "null"]},
                    "figures": {
                        "type": "object",
                        "required": list(FIGURE_KEYS),
                        "additionalProperties": False,
                        "properties": {k: _NUM_OR_NULL for k in FIGURE_KEYS},
                    },
                    "ratios_vs_vxlan": {
                        "type": "object",
                        "required": list(FIGURE_KEYS),
                        "additionalProperties": False,
                        "properties": {k: _NUM_OR_NULL for k in FIGURE_KEYS},
                    },
                    "counters": {
                        "type": ["object", "null"],
                        "properties": {p: _PHASE for p in PHASES},
                    },
                    "lower_bounds": {"type": "array", "items": {"enum": list(FIGURE_KEYS)}},
                    "runs": {"type": "array", "items": _RUN},
                },
            },
        },
        "explain": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(doc: Any, schema: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Problems of doc against the JSON-Schema subset SCHEMA uses (type, enum, required,
    properties, additionalProperties, items, minItems, minimum); [] means valid."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](doc) for t in names):
            return [f"{path}: expected {'/'.join(names)}, got {type(doc).__name__}"]
    if "enum" in schema and doc not in schema["enum"]:
        problems.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if (
        "minimum" in schema
        and _TYPES["number"](doc)
        and not (isinstance(doc, float) and math.isnan(doc))
        and doc < schema["minimum"]
    ):
        problems.append(f"{path}: {doc} < minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            if key not in doc:
                problems.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                problems += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list):
        if len(doc) < schema.get("minItems", 0):
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(doc):
                problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems


# --- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    runs: int = 3
    tcp_seconds: int = 5
    udp_seconds: int = 1
    udp_probes: int = 4
    pings_idle: int = 300
    ping_interval: float = 0.005
    loaded_ping_interval: float = 0.01
    quick: bool = False
    zerocopy: bool = True
    underlay_mtu: int = 1500
    rungs: list[str] = field(default_factory=list)


FULL = Settings()
QUICK = Settings(runs=3, tcp_seconds=1, udp_seconds=1, udp_probes=2, pings_idle=60, quick=True)

# --- machine and versions -----------------------------------------------------------------------


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
    from .. import __version__

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


# --- /proc readers ------------------------------------------------------------------------------


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


# --- rungs --------------------------------------------------------------------------------------


@dataclass
class RungEnv:
    dst: str  # address in node b that node a measures against
    nodes: list[Node] = field(default_factory=list)  # daemons whose counters are read


RungSetup = Callable[["Testbed"], contextlib.AbstractContextManager[RungEnv]]


@dataclass(frozen=True)
class Rung:
    name: str
    label: str
    setup: RungSetup
    kind: str = "daemon"  # "kernel": no udpbackend daemon, no counters
    default: bool = True  # part of the ladder when --rungs is not given


@contextlib.contextmanager
def _veth(tb: Testbed) -> Iterator[RungEnv]:
    from .testbed import UNDERLAY_ADDR

    yield RungEnv(UNDERLAY_ADDR["b"])


@contextlib.contextmanager
def _vxlan(tb: Testbed) -> Iterator[RungEnv]:
    from .testbed import VXLAN_ADDR

    tb.add_vxlan()
    try:
        yield RungEnv(VXLAN_ADDR["b"])
    finally:
        if not tb.closed:
            tb.del_vxlan()


def daemon_rung(
    name: str,
    label: str,
    mode: str,
    extra_args: Sequence[str] = (),
    peers_file: Callable[[Testbed], Path] | None = None,
    default: bool = True,
) -> Rung:
    """A rung of two udpbackend daemons (``run --mode MODE EXTRA_ARGS``) across the veth."""

    @contextlib.contextmanager
    def setup(tb: Testbed) -> Iterator[RungEnv]:
        from .testbed import TUN_ADDR, TestbedError

        nodes: list[Node] = []
        pf = peers_file(tb) if peers_file else None
        try:
            for n in ("a", "b"):
                nodes.append(
                    tb.start_node(n, mode, extra_args=list(extra_args), peers_file=pf, timeout=60)
                )
            yield RungEnv(TUN_ADDR["b"], nodes)
        finally:
            errors = []
            for node in nodes:
                try:
                    node.stop(timeout=15, check=True)
                except TestbedError as e:
                    errors.append(f"{node.node}: {str(e).splitlines()[0]}")
            if errors and sys.exc_info()[0] is None:
                raise TestbedError("daemon exit: " + "; ".join(errors))

    return Rung(name, label, setup, "daemon", default)


def _peers_10k(tb: Testbed) -> Path:
    """10,000 dummy /30 routes to a peer nobody is (route-table size does not change speed)."""
    path = tb.workdir / "peers-10k.txt"
    base = int(ipaddress.IPv4Address("198.19.64.0"))  # clear of 198.19.1.0/24 and .2.0/24
    lines = [f"{ipaddress.IPv4Network((base + 4 * i, 30))}=198.18.0.3" for i in range(10_000)]
    path.write_text("\n".join(lines) + "\n")
    return path


ONE_QUEUE = ("--queues", "1")  # each rung below "multiqueue" adds one thing to the one before

RUNGS: tuple[Rung, ...] = (
    Rung("veth", "veth, no overlay (ceiling)", _veth, "kernel"),
    Rung("vxlan", "kernel VXLAN (VNI 1, port 8472, MTU 1450)", _vxlan, "kernel"),
    daemon_rung("python", "udpbackend python", "python", ONE_QUEUE),
    daemon_rung("per-packet", "udpbackend per-packet C", "per-packet", ONE_QUEUE),
    daemon_rung(
        "batched-nooffload",
        "udpbackend batched, --offload off",
        "batched",
        [*ONE_QUEUE, "--offload", "off"],
    ),
    daemon_rung("batched", "udpbackend batched (offload auto)", "batched", ONE_QUEUE),
    daemon_rung(
        "multiqueue",
        "udpbackend batched, --queues auto (the default)",
        "batched",
        ["--queues", "auto"],
    ),
    daemon_rung(
        "multiqueue-rt",
        "udpbackend batched, --queues auto --rt-priority 1",
        "batched",
        ["--queues", "auto", "--rt-priority", "1"],
    ),
    daemon_rung(
        "batched-cdriver",
        "udpbackend batched, C-driven loop (--driver c)",
        "batched",
        [*ONE_QUEUE, "--driver", "c"],
        default=False,
    ),
    daemon_rung(
        "batched-10k",
        "udpbackend batched + 10k routes",
        "batched",
        ONE_QUEUE,
        peers_file=_peers_10k,
        default=False,
    ),
)
RUNG_BY_NAME = {r.name: r for r in RUNGS}
DEFAULT_RUNGS = tuple(r.name for r in RUNGS if r.default)


def parse_rungs(text: str) -> list[str]:
    """`--rungs a,b` -> names in ladder order; BenchError names the unknown ones."""
    want = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]
    unknown = [t for t in want if t not in RUNG_BY_NAME]
    if unknown:
        raise BenchError(
            f"--rungs: unknown rung {', '.join(unknown)} (known: {', '.join(RUNG_BY_NAME)})"
        )
    if not want:
        raise BenchError("--rungs: no rung given")
    return [r.name for r in RUNGS if r.name in want]


# --- measuring ----------------------------------------------------------------------------------


class Reporter:
    """Progress sink: rich in the terminal (see cli), a no-op in library use."""

    def status(self, text: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def log(self, text: str) -> None:
        pass


def _ping_doc(res: Any, skip: int = 0) -> dict[str, Any]:
    from .testbed import PingResult

    rtts = res.rtts_ms[skip:] if len(res.rtts_ms) > skip + 10 else res.rtts_ms
    r = PingResult(res.dst, res.sent, rtts)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        "sent": res.sent,
        "received": res.received,
        "p50_ms": num(r.p50_ms),
        "p99_ms": num(r.percentile_ms(99)),
        "avg_ms": num(r.avg_ms),
        "min_ms": num(r.min_ms),
        "max_ms": num(r.max_ms),
    }


def _tcp_doc(r: Any, streams: int) -> dict[str, Any]:
    return {
        "bits_per_second": r.bits_per_second,
        "sent_bits_per_second": r.sent_bits_per_second,
        "retransmits": r.retransmits,
        "bytes": r.bytes,
        "seconds": r.seconds,
        "streams": streams,
    }


@dataclass
class Snapshot:
    """What the daemons of a rung have counted at one moment."""

    docs: list[dict[str, Any]]
    cpu_s: list[float]
    wakeups: list[int]


def _read_fresh_stats(node: Node, after: float, timeout: float = 4.0) -> dict[str, Any]:
    """The daemon's stats file once it has been rewritten after `after` (epoch s): the daemon
    rewrites it every second, so this waits at most about one second."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if node.stats_path.stat().st_mtime > after:
                data = json.loads(node.stats_path.read_text())
                if isinstance(data, dict):
                    return data
        except (OSError, json.JSONDecodeError) as e:
            last = e
        if not node.alive:
            from .testbed import DaemonError

            raise DaemonError(f"daemon {node.node} died\n{node.log_tail()}")
        if time.monotonic() > deadline:
            from .testbed import TestbedError

            raise TestbedError(f"stats file {node.stats_path} not rewritten in {timeout}s: {last}")
        time.sleep(0.02)


def snapshot(nodes: Sequence[Node], fresh: bool = True) -> Snapshot:
    """The daemons' counters; fresh: from a stats file written after this call (so that it
    holds all traffic up to now), else whatever is there (before any traffic)."""
    after = time.time() if fresh else 0.0
    docs = [_read_fresh_stats(n, after) for n in nodes]
    return Snapshot(docs, [pid_cpu_s(n.pid) for n in nodes], [pid_wakeups(n.pid) for n in nodes])


def _sub(a: Any, b: Any) -> Any:
    """b - a over the numeric leaves of two stats documents of the same shape."""
    if isinstance(b, dict):
        return {k: _sub(a.get(k, 0) if isinstance(a, dict) else 0, v) for k, v in b.items()}
    if isinstance(b, list):
        a = a if isinstance(a, list) else [0] * len(b)
        return [_sub(x, y) for x, y in zip(a, b, strict=False)]
    if isinstance(b, int | float) and not isinstance(b, bool):
        return b - (a if isinstance(a, int | float) else 0)
    return b


def phase_counters(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Both daemons' counters over one traffic phase, as per-packet figures."""
    eg_rx = eg_tx = ing_rx = ing_tx = batches = gso = gro = tso = tun_gro = 0
    copied = entered = 0
    syscalls: dict[str, int] = {}
    drops: dict[str, int] = {}
    for a, b in zip(before.docs, after.docs, strict=True):
        st = _sub(a.get("stats", {}), b.get("stats", {}))
        eg, ing = st.get("egress", {}), st.get("ingress", {})
        eg_rx += eg.get("rx_packets", 0)
        eg_tx += eg.get("tx_packets", 0)
        ing_rx += ing.get("rx_packets", 0)
        ing_tx += ing.get("tx_packets", 0)
        batches += eg.get("batches", 0) + ing.get("batches", 0)
        gso += st.get("gso_sends", 0)
        gro += st.get("gro_receives", 0)
        tso += st.get("tso_reads", 0)
        tun_gro += st.get("tun_gro_writes", 0)
        entered += eg.get("rx_bytes", 0)
        copied += sum(d.get(k, 0) for d in (eg, ing) for k in ("rx_bytes", "tx_bytes"))
        for k, v in st.get("syscalls", {}).items():
            syscalls[k] = syscalls.get(k, 0) + v
        for d in (eg, ing):
            for k, v in d.get("drops", {}).items():
                if v:
                    drops[k] = drops.get(k, 0) + v
    packets = eg_rx + ing_rx
    cpu = sum(after.cpu_s) - sum(before.cpu_s)
    wakeups = sum(after.wakeups) - sum(before.wakeups)
    sends = syscalls.get("sendmmsg", 0) + syscalls.get("sendto", 0)
    receives = syscalls.get("recvmmsg", 0) + syscalls.get("recvfrom", 0)

    def per(x: float, y: float, scale: float = 1.0) -> float | None:
        return round(scale * x / y, 4) if y else None

    return {
        "packets": packets,
        "syscalls": syscalls,
        "syscalls_per_packet": per(sum(syscalls.values()), packets),
        "mean_batch": per(packets, batches),
        "packets_per_send": per(eg_tx, sends),
        "packets_per_receive": per(ing_rx, receives),
        "packets_per_tun_read": per(eg_rx, syscalls.get("read", 0)),
        "packets_per_tun_write": per(ing_tx, syscalls.get("write", 0)),
        "gso_sends": gso,
        "gro_receives": gro,
        "tso_reads": tso,
        "tun_gro_writes": tun_gro,
        "wakeups_per_packet": per(wakeups, packets),
        "daemon_cpu_us_per_packet": per(cpu, packets, 1e6),
        # bytes crossing the user/kernel boundary per byte that entered the overlay: read from
        # the TUN + sent + received + written into the TUN = 4 on a loss-free path
        "user_kernel_copies_per_packet": per(copied, entered),
        "drops": drops,
    }


def udp_search(
    probe: Callable[[float | None], dict[str, Any]],
    probes: int,
    size: int,
    hint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Highest UDP packet rate delivered at <= LOSS_MAX loss, in at most `probes` iperf3 runs.

    Cold (no hint, or the hint was sender-bound): one unlimited run (-b 0) first. If it stays
    within the loss limit the path is faster than one sender (``sender_bound``: the figure is
    a lower bound). Otherwise the overloaded path still delivered some rate R; the next probe
    offers 0.7 R (usually within the limit), then the offered rate is bisected between the best
    passing and the lowest failing rate (at first 1.1 R). Warm (hint = the previous run's
    search on the same rung): the first probe offers the previous result and bisection goes on
    from there, with one probe fewer."""
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    warm = hint is not None and hint.get("pps") and not hint.get("sender_bound")
    if warm:
        assert hint is not None
        lo, hi = 0.0, float(hint["pps"]) * 1.15
        target, budget = float(hint["pps"]), max(1, probes - 1)
    else:
        first = probe(None)
        trials.append(first)
        if first["loss"] <= LOSS_MAX:
            return {
                "size": size,
                "pps": round(first["received_pps"], 1),
                "loss": first["loss"],
                "sender_bound": True,
                "probes": trials,
            }
        lo, hi = 0.0, max(first["received_pps"] * 1.1, 1000.0)
        target, budget = max(first["received_pps"] * 0.7, 500.0), probes - 1
    for _ in range(budget):
        p = probe(target)
        trials.append(p)
        if p["loss"] <= LOSS_MAX:
            lo = target
            if best is None or p["received_pps"] > best["received_pps"]:
                best = p
        else:
            hi = target
        target = (lo + hi) / 2 if lo > 0 else target * 0.6
    return {
        "size": size,
        "pps": round(best["received_pps"], 1) if best else None,
        "loss": best["loss"] if best else None,
        "sender_bound": False,
        "probes": trials,
    }


def _udp_probe(
    tb: Testbed, dst: str, size: int, seconds: int, rep: Reporter, label: str
) -> Callable[[float | None], dict[str, Any]]:
    """A probe for udp_search: one iperf3 UDP run offering pps packets/s (None: unlimited)."""

    def probe(pps: float | None) -> dict[str, Any]:
        rate = 0 if pps is None else int(pps * size * 8)
        what = "unlimited" if pps is None else f"{pps / 1e3:.0f} kpps"
        rep.status(f"{label}: UDP {size} B, offered {what}")
        r = tb.iperf3(
            "a",
            dst,
            seconds=seconds,
            extra=["-u", "-b", str(rate), "-l", str(size), "-w", UDP_WINDOW],
        )
        end = r.raw.get("end", {})
        sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
        n = int(recv.get("packets", 0))
        lost = max(0, int(recv.get("lost_packets", 0)))
        secs = float(recv.get("seconds") or seconds)
        ssecs = float(sent.get("seconds") or seconds)
        return {
            "offered_pps": None if pps is None else round(pps, 1),
            "sent_pps": round(int(sent.get("packets", 0)) / ssecs, 1),
            "received_pps": round(max(0, n - lost) / secs, 1),
            "loss": round(lost / n, 5) if n else 1.0,
        }

    return probe


def measure_rung(
    tb: Testbed, env: RungEnv, s: Settings, rep: Reporter, name: str, runs: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Fill `runs` (s.runs empty dicts) with every figure of one rung; returns the rung-level
    counters of the UDP 64 B searches (None for a kernel rung).

    Stage 1, per run: TCP 1 stream (a ping every 10 ms alongside for the loaded RTT, CPU from
    /proc around it), TCP 4 streams, then the idle pings while the daemons rewrite their stats
    file (at most a second): the counters between two such reads are that run's "tcp" phase.
    Stage 2: the UDP 64 B search of each run (warm-started from the previous run's result),
    then one counter read: the "udp64" phase. Stage 3: the UDP 1400 B searches. Grouping the
    stages keeps counter reads, each up to a second of waiting, to one per run plus one."""
    from .testbed import PingResult

    nodes = env.nodes
    snap = snapshot(nodes, fresh=False) if nodes else None
    for i, run in enumerate(runs):
        label = f"{name} run {i + 1}/{s.runs}"
        rep.status(f"{label}: TCP 1 stream, {s.tcp_seconds} s, ping alongside")
        count = max(10, int(s.tcp_seconds / s.loaded_ping_interval))
        wait_ping = tb.ping_start("a", env.dst, count=count, interval=s.loaded_ping_interval)
        cpu0, d0 = proc_stat(), [pid_cpu_s(n.pid) for n in nodes]
        r1 = tb.iperf3("a", env.dst, seconds=s.tcp_seconds, zerocopy=s.zerocopy)
        cpu1, d1 = proc_stat(), [pid_cpu_s(n.pid) for n in nodes]
        loaded = wait_ping()
        run["tcp1"] = _tcp_doc(r1, 1)
        cpu = cpu_delta(cpu0, cpu1)
        run["cpu"] = {
            **{k: round(v, 3) for k, v in cpu.items()},
            "daemon_s": round(sum(d1) - sum(d0), 3) if nodes else None,
            "bytes": r1.bytes,
        }
        # iperf3 takes ~0.1 s to connect and ramp up: the first replies are not "loaded"
        run["ping_loaded"] = _ping_doc(loaded, skip=int(0.2 / s.loaded_ping_interval))
        rep.advance()

        rep.status(f"{label}: TCP 4 streams, {s.tcp_seconds} s")
        extra = ["-P", "4"]
        r4 = tb.iperf3("a", env.dst, seconds=s.tcp_seconds, zerocopy=s.zerocopy, extra=extra)
        run["tcp4"] = _tcp_doc(r4, 4)

        rep.status(f"{label}: idle ping x {s.pings_idle}" + (", counters" if nodes else ""))
        wait_idle = tb.ping_start("a", env.dst, count=s.pings_idle, interval=s.ping_interval)
        post = snapshot(nodes) if nodes else None
        idle = wait_idle()
        run["ping_idle"] = _ping_doc(PingResult(env.dst, idle.sent, idle.rtts_ms))
        run["counters"] = {"tcp": phase_counters(snap, post)} if snap and post else None
        snap = post
        rep.advance()

    udp64: dict[str, Any] | None = None
    for size in (64, 1400):
        for i, run in enumerate(runs):
            label = f"{name} run {i + 1}/{s.runs}"
            probe = _udp_probe(tb, env.dst, size, s.udp_seconds, rep, label)
            # warm start from the latest earlier run that found a rate
            found = [r[f"udp{size}"] for r in runs[:i] if (r.get(f"udp{size}") or {}).get("pps")]
            hint = found[-1] if found else None
            run[f"udp{size}"] = udp_search(probe, s.udp_probes, size, hint)
            rep.advance()
        if size == 64 and snap is not None:
            rep.status(f"{name}: reading counters")
            post = snapshot(nodes)
            udp64 = phase_counters(snap, post)
            snap = post
    return udp64


STEPS_PER_RUN = 4  # rep.advance() calls per run in measure_rung


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def figures_of(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median over runs of every figure."""

    def med(fn: Callable[[dict[str, Any]], float | None]) -> float | None:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append(None)
        m = _median(vals)
        return None if m is None else round(m, 4)

    def tcp_phase(key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda r: r["counters"]["tcp"][key] if r.get("counters") else None

    def per_gb(r: dict[str, Any], key: str) -> float | None:
        b = r["cpu"]["bytes"]
        v = r["cpu"][key]
        return None if v is None or not b else v / (b / 1e9)

    return {
        "tcp1_gbps": med(lambda r: r["tcp1"]["bits_per_second"] / 1e9),
        "tcp4_gbps": med(lambda r: r["tcp4"]["bits_per_second"] / 1e9),
        "udp64_kpps": med(lambda r: r["udp64"]["pps"] / 1e3),
        "udp1400_kpps": med(lambda r: r["udp1400"]["pps"] / 1e3),
        "rtt_idle_p50_ms": med(lambda r: r["ping_idle"]["p50_ms"]),
        "rtt_idle_p99_ms": med(lambda r: r["ping_idle"]["p99_ms"]),
        "rtt_loaded_p50_ms": med(lambda r: r["ping_loaded"]["p50_ms"]),
        "rtt_loaded_p99_ms": med(lambda r: r["ping_loaded"]["p99_ms"]),
        "cpu_s_per_gb": med(lambda r: per_gb(r, "busy_s")),
        "daemon_cpu_s_per_gb": med(lambda r: per_gb(r, "daemon_s")),
        "syscalls_per_packet": med(tcp_phase("syscalls_per_packet")),
        "mean_batch": med(tcp_phase("mean_batch")),
        "tcp1_retransmits": med(lambda r: r["tcp1"]["retransmits"]),
        "tcp4_retransmits": med(lambda r: r["tcp4"]["retransmits"]),
    }


def _steps_done(run: dict[str, Any]) -> int:
    return sum(k in run for k in ("tcp1", "ping_idle", "udp64", "udp1400"))


def counters_of(
    runs: Sequence[dict[str, Any]], udp64: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The rung's counters: "tcp", the median over runs of each per-run figure (drops
    summed); "udp64", over all of the rung's UDP 64 B searches."""
    with_counters = [r["counters"] for r in runs if r.get("counters")]
    if not with_counters:
        return None
    out: dict[str, Any] = {}
    for phase in ("tcp",):
        rows = [c[phase] for c in with_counters if phase in c]
        ph: dict[str, Any] = {}
        for key in PHASE_FIELDS:
            if key == "drops":
                drops: dict[str, int] = {}
                for row in rows:
                    for k, v in row["drops"].items():
                        drops[k] = drops.get(k, 0) + v
                ph["drops"] = drops
            else:
                m = _median([row.get(key) for row in rows])
                ph[key] = None if m is None else round(m, 4)
        syscalls: dict[str, float] = {}
        for k in {k for row in rows for k in row.get("syscalls", {})}:
            m = _median([row["syscalls"].get(k, 0) for row in rows])
            syscalls[k] = m if m is not None else 0
        ph["syscalls"] = syscalls
        out[phase] = ph
    if udp64 is not None:
        out["udp64"] = udp64
    return out


def lower_bounds(runs: Sequence[dict[str, Any]]) -> list[str]:
    """UDP figures where most runs were sender-bound: the path took everything one iperf3
    sender could offer, so the figure is a lower bound of the path's rate."""
    out = []
    for size in (64, 1400):
        flags = [bool(r[f"udp{size}"].get("sender_bound")) for r in runs if f"udp{size}" in r]
        if flags and sum(flags) * 2 > len(flags):
            out.append(f"udp{size}_kpps")
    return out


def add_ratios(rungs: list[dict[str, Any]]) -> None:
    """ratios_vs_vxlan of every rung: figure / VXLAN's figure from the same invocation."""
    vx = next((r for r in rungs if r["name"] == "vxlan" and r["status"] == "ok"), None)
    for r in rungs:
        ratios: dict[str, float | None] = {}
        for k in FIGURE_KEYS:
            a = r["figures"].get(k)
            b = vx["figures"].get(k) if vx else None
            ratios[k] = round(a / b, 4) if a is not None and b else None
        r["ratios_vs_vxlan"] = ratios


# --- the whole ladder ---------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt while the benchmark runs, so cleanup
    happens either way. The yielded event stays set once one arrived: a library that swallows
    the KeyboardInterrupt cannot make the benchmark go on (see _Checked)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper child must not unwind our stack
            os._exit(128 + signum)
        stopped.set()
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class _Checked(Reporter):
    """Passes progress on, and raises KeyboardInterrupt at every step once a signal came."""

    def __init__(self, inner: Reporter, stopped: threading.Event) -> None:
        self.inner, self.stopped = inner, stopped

    def _check(self) -> None:
        if self.stopped.is_set():
            raise KeyboardInterrupt

    def status(self, text: str) -> None:
        self._check()
        self.inner.status(text)

    def advance(self, steps: int = 1) -> None:
        self._check()
        self.inner.advance(steps)

    def log(self, text: str) -> None:
        self.inner.log(text)


def run_ladder(
    s: Settings, rep: Reporter | None = None, ns_prefix: str = NS_PREFIX
) -> dict[str, Any]:
    """Build a testbed, measure every rung of s.rungs, remove the testbed; the results document.

    A rung that fails is recorded with its error and the ladder goes on; KeyboardInterrupt
    (Ctrl-C, SIGTERM) propagates after the testbed is gone."""
    from .testbed import Testbed, TestbedError

    rep = rep or Reporter()
    t0 = time.monotonic()
    doc: dict[str, Any] = {
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
    }
    with (
        sigterm_as_interrupt() as stopped,
        Testbed(underlay_mtu=s.underlay_mtu, prefix=ns_prefix) as tb,
    ):
        rep = _Checked(rep, stopped)
        if s.zerocopy:
            s.zerocopy = "zerocopy" in iperf3_features()
        doc["settings"] = {
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
        for name in s.rungs:
            rung = RUNG_BY_NAME[name]
            entry: dict[str, Any] = {
                "name": rung.name,
                "label": rung.label,
                "kind": rung.kind,
                "status": "ok",
                "error": None,
                "figures": {},
                "ratios_vs_vxlan": {},
                "counters": None,
                "lower_bounds": [],
                "runs": [],
            }
            doc["rungs"].append(entry)
            r0 = time.monotonic()
            runs: list[dict[str, Any]] = [{} for _ in range(s.runs)]
            udp64 = None
            try:
                rep.status(f"{name}: setting up")
                with rung.setup(tb) as env:
                    udp64 = measure_rung(tb, env, s, rep, name, runs)
            except Exception as e:  # one rung failing must not cost the others
                if stopped.is_set():  # a swallowed Ctrl-C resurfacing as some other error
                    raise KeyboardInterrupt from e
                text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                if not isinstance(e, TestbedError):
                    text = f"{type(e).__name__}: {text}"
                entry["status"] = "error"
                entry["error"] = text or type(e).__name__
                rep.log(f"[red]{name}: FAILED[/red] {entry['error']}")
            entry["runs"] = [r for r in runs if all(k in r for k in _RUN["required"])]
            rep.advance(s.runs * STEPS_PER_RUN - sum(_steps_done(r) for r in runs))
            entry["figures"] = figures_of(entry["runs"])
            entry["counters"] = counters_of(entry["runs"], udp64)
            entry["lower_bounds"] = lower_bounds(entry["runs"])
            if entry["status"] == "ok":
                f = entry["figures"]
                rep.log(
                    f"{rung.label}: TCP {_fmt(f['tcp1_gbps'], 2)} Gbit/s, "
                    f"UDP 64 B {_fmt(f['udp64_kpps'], 0)} kpps, RTT p50 "
                    f"{_fmt(f['rtt_idle_p50_ms'], 3)} ms ({time.monotonic() - r0:.0f} s)"
                )
        if stopped.is_set():
            raise KeyboardInterrupt
    add_ratios(doc["rungs"])
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["explain"] = explain(doc)
    if doc["machine"]["cores"] < 4:
        doc["notes"].append(
            f"{doc['machine']['cores']} cores: iperf3 client and server, both daemons and the "
            "kernel's softirq work share them, so the ratios are indicative (anchors §7: report, "
            "do not gate, below 4 cores)."
        )
    if not any(r["name"] == "vxlan" and r["status"] == "ok" for r in doc["rungs"]):
        doc["notes"].append("kernel VXLAN was not measured: no ratios.")
    return doc


# --- reporting ----------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int) -> str:
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
            return _lb(r, key) + _fmt(f[key], digits) + _ratio(q[key], sep)

        rows.append(
            [
                name,
                cell("tcp1_gbps", 2),
                cell("tcp4_gbps", 2),
                cell("udp64_kpps", 0),
                cell("udp1400_kpps", 0),
                f"{_fmt(f['rtt_idle_p50_ms'], 3)} / {_fmt(f['rtt_idle_p99_ms'], 3)}"
                + _ratio(q["rtt_idle_p50_ms"], sep),
                f"{_fmt(f['rtt_loaded_p50_ms'], 2)} / {_fmt(f['rtt_loaded_p99_ms'], 2)}"
                + _ratio(q["rtt_loaded_p99_ms"], sep),
                cell("cpu_s_per_gb", 2),
                "-" if f["syscalls_per_packet"] is None else _fmt(f["syscalls_per_packet"], 2),
                "-" if f["mean_batch"] is None else _fmt(f["mean_batch"], 1),
                f"{_fmt(f['tcp1_retransmits'], 0)} / {_fmt(f['tcp4_retransmits'], 0)}",
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


def _ok(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in doc["rungs"] if r["name"] == name and r["status"] == "ok"), None)


def explain(doc: dict[str, Any]) -> list[str]:
    """Paragraphs generated from this run's own figures and counters, walking the ladder."""
    out: list[str] = []
    veth, vx = _ok(doc, "veth"), _ok(doc, "vxlan")

    def gb(r: dict[str, Any]) -> str:
        return f"{_fmt(r['figures']['tcp1_gbps'], 2)} Gbit/s"

    def factor(a: float | None, b: float | None) -> str:
        if a is None or not b:
            return "n/a"
        return f"{a / b:.2f}x"

    if veth and vx:
        added = _diff_us(vx, veth, "rtt_idle_p50_ms")
        out.append(
            f"veth -> kernel VXLAN: encapsulating in the kernel keeps "
            f"{factor(vx['figures']['tcp1_gbps'], veth['figures']['tcp1_gbps'])} of the ceiling's "
            f"TCP throughput ({gb(veth)} -> {gb(vx)}), changes idle RTT p50 by "
            f"{'n/a' if added is None else f'{added:+.0f}'} us and CPU per GB by "
            f"{factor(vx['figures']['cpu_s_per_gb'], veth['figures']['cpu_s_per_gb'])}; no "
            f"packet leaves the kernel: 0 syscalls, 0 user/kernel copies, 0 wake-ups per packet."
        )
    daemon_ladder = [r for r in doc["rungs"] if r["kind"] == "daemon" and r["status"] == "ok"]
    daemon_ladder = [r for r in daemon_ladder if RUNG_BY_NAME[r["name"]].default]
    prev: dict[str, Any] | None = vx
    for r in daemon_ladder:
        c = (r.get("counters") or {}).get("tcp") or {}
        u = (r.get("counters") or {}).get("udp64") or {}
        f = r["figures"]
        if prev is vx or prev is None:
            copies = c.get("user_kernel_copies_per_packet")
            out.append(
                f"{'kernel VXLAN' if prev else 'the kernel'} -> {r['label']}: every packet now "
                f"crosses user space twice (sender and receiver daemon): "
                f"{_fmt(copies, 1)} user/kernel copies and {_fmt(c.get('syscalls_per_packet'), 2)} "
                f"syscalls per packet (TCP), {_fmt(c.get('daemon_cpu_us_per_packet'), 2)} us of "
                f"daemon CPU per packet, {_fmt(c.get('wakeups_per_packet'), 3)} wake-ups per "
                f"packet; TCP {gb(r)}"
                + (
                    f", {factor(f['tcp1_gbps'], prev['figures']['tcp1_gbps'])} of VXLAN"
                    if prev
                    else ""
                )
                + "."
            )
        else:
            pc = (prev.get("counters") or {}).get("tcp") or {}
            pu = (prev.get("counters") or {}).get("udp64") or {}
            saved = []
            for key, what, digits in (
                ("syscalls_per_packet", "syscalls/packet", 2),
                ("daemon_cpu_us_per_packet", "us of daemon CPU/packet", 2),
                ("wakeups_per_packet", "wake-ups/packet", 3),
                ("mean_batch", "packets per pump round", 1),
                ("packets_per_send", "packets per send syscall", 1),
                ("packets_per_receive", "packets per receive syscall", 1),
                ("packets_per_tun_read", "packets per TUN read", 1),
                ("packets_per_tun_write", "packets per TUN write", 1),
            ):
                a, b = pc.get(key), c.get(key)
                if a is None or b is None or round(a, digits) == round(b, digits):
                    continue
                saved.append(f"{what} {a:.{digits}f} -> {b:.{digits}f}")
            cause = _cause(prev, r, pc, c, pu, u)
            out.append(
                f"{prev['label']} -> {r['label']}: TCP {gb(prev)} -> {gb(r)} "
                f"({factor(f['tcp1_gbps'], prev['figures']['tcp1_gbps'])}), UDP 64 B "
                f"{_fmt(prev['figures']['udp64_kpps'], 0)} -> {_fmt(f['udp64_kpps'], 0)} kpps. "
                + ("Per packet (TCP): " + "; ".join(saved) + ". " if saved else "")
                + cause
            )
        prev = r
    best = daemon_ladder[-1] if daemon_ladder else None
    if best and vx:
        bf, vf = best["figures"], vx["figures"]
        bc = (best.get("counters") or {}).get("tcp") or {}
        copies = bc.get("user_kernel_copies_per_packet")
        out.append(
            f"Where the last rung stands: {best['label']} moves "
            f"{factor(bf['tcp1_gbps'], vf['tcp1_gbps'])} of kernel VXLAN's single-stream TCP "
            f"and {factor(bf['udp64_kpps'], vf['udp64_kpps'])} of its 64 B packet rate, at "
            f"{factor(bf['cpu_s_per_gb'], vf['cpu_s_per_gb'])} the CPU per GB; what is left is "
            f"the {_fmt(copies, 1)} user/kernel copies per packet VXLAN never makes and the "
            f"{_fmt(bc.get('syscalls_per_packet'), 2)} syscalls per packet that remain."
        )
    return out


def _diff_us(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a["figures"].get(key), b["figures"].get(key)
    return None if x is None or y is None else (x - y) * 1000


def _cause(
    prev: dict[str, Any],
    r: dict[str, Any],
    pc: dict[str, Any],
    c: dict[str, Any],
    pu: dict[str, Any],
    u: dict[str, Any],
) -> str:
    """One sentence naming the mechanism of a step, from the counters that changed."""
    a_sys, b_sys = pc.get("syscalls_per_packet"), c.get("syscalls_per_packet")
    a_cpu, b_cpu = pc.get("daemon_cpu_us_per_packet"), c.get("daemon_cpu_us_per_packet")
    if r["name"] == "multiqueue":
        pf, f = prev["figures"], r["figures"]
        return (
            f"Multiple queues: each a TUN queue, an SO_REUSEPORT socket and a thread, flows "
            f"steered so that one stays on one queue; 4-stream TCP "
            f"{_fmt(pf.get('tcp4_gbps'), 2)} -> {_fmt(f.get('tcp4_gbps'), 2)} Gbit/s. Queues scale "
            f"with free cores: where the iperf3 ends, both daemons and the kernel's softirq "
            f"work share a few, extra queues compete with them."
        )
    if r["name"] == "multiqueue-rt":
        pf, f = prev["figures"], r["figures"]
        return (
            f"Scheduling: the queue threads run SCHED_RR, so a packet that wakes one no longer "
            f"waits for a time slice behind the busy iperf3 ends; RTT under the TCP stream p50 "
            f"{_fmt(pf.get('rtt_loaded_p50_ms'), 2)} -> {_fmt(f.get('rtt_loaded_p50_ms'), 2)} "
            f"ms, p99 {_fmt(pf.get('rtt_loaded_p99_ms'), 2)} -> "
            f"{_fmt(f.get('rtt_loaded_p99_ms'), 2)} ms."
        )
    if prev["name"] == "python" and a_cpu is not None and b_cpu is not None:
        return (
            f"Same syscalls ({_fmt(a_sys, 2)} vs {_fmt(b_sys, 2)} per packet), so the "
            f"{a_cpu - b_cpu:.2f} us of daemon CPU saved per packet is the Python interpreter's "
            f"per-packet work (parsing, checksum, route lookup, bytes objects) moved into C."
        )
    if c.get("gso_sends") or c.get("gro_receives") or c.get("tso_reads"):
        parts = []
        if c.get("tso_reads") or c.get("tun_gro_writes"):
            parts.append(
                f"TUN offloads: {int(c.get('tso_reads') or 0)} TUN reads were TCP super-packets "
                f"cut into MTU-sized packets in C ({_fmt(c.get('packets_per_tun_read'), 1)} "
                f"packets per read) and {int(c.get('tun_gro_writes') or 0)} TUN writes merged "
                f"several segments ({_fmt(c.get('packets_per_tun_write'), 1)} packets per write)"
            )
        if c.get("gso_sends") or c.get("gro_receives"):
            parts.append(
                f"UDP GSO/GRO: {int(c.get('gso_sends') or 0)} sends carried several datagrams "
                f"in one message and {int(c.get('gro_receives') or 0)} receives returned "
                f"several, so one syscall moves {_fmt(c.get('packets_per_send'), 1)} packets out "
                f"and {_fmt(c.get('packets_per_receive'), 1)} in"
            )
        return (
            "; ".join(parts) + " (median per run, TCP). The wire still carries one inner IPv4 "
            "packet per datagram: the kernel cuts and merges on each side of user space."
        )
    if a_sys is not None and b_sys is not None and b_sys < a_sys:
        return (
            f"Batching: one recvmmsg/sendmmsg moves {_fmt(c.get('mean_batch'), 0)} packets per "
            f"round on average instead of one, saving {a_sys - b_sys:.2f} syscalls per packet; "
            f"at 64 B the mean batch is {_fmt(u.get('mean_batch'), 1)} (was "
            f"{_fmt(pu.get('mean_batch'), 1)})."
        )
    return "No counter moved much: the difference is within run-to-run noise."


def render_rich_table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="udpbackend overlay ladder (ratio to kernel VXLAN)", show_lines=True)
    for i, col in enumerate(RICH_COLUMNS):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(doc, sep="\n", short=True):
        t.add_row(*row)
    return t


def chart(doc: dict[str, Any], path: Path) -> None:
    """ladder.png: TCP throughput and UDP packet rate per rung, horizontal bars, kernel VXLAN
    as a dashed reference line, each bar labelled with its value and ratio to VXLAN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = [r for r in doc["rungs"] if r["status"] == "ok"]
    labels = [r["label"] for r in rungs]
    vx = _ok(doc, "vxlan")
    panels = (
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
    colors = ("#2b6cb0", "#90cdf4")
    height = 1.2 + 0.75 * max(1, len(rungs))
    fig, axes = plt.subplots(1, 2, figsize=(15, height + 2.0), sharey=True)
    ypos = list(range(len(rungs)))
    bar_h = 0.38
    for ax, (title, unit, series, digits) in zip(axes, panels, strict=True):
        xmax = 0.0
        for j, (key, name) in enumerate(series):
            vals = [r["figures"][key] or 0.0 for r in rungs]
            ys = [y + (j - 0.5) * bar_h for y in ypos]
            ax.barh(ys, vals, height=bar_h, color=colors[j], label=name, zorder=2)
            xmax = max([xmax, *vals])
            for y, r, v in zip(ys, rungs, vals, strict=True):
                q = r["ratios_vs_vxlan"].get(key)
                bound = "\u2265 " if key in r.get("lower_bounds", []) else ""
                text = f"{bound}{v:.{digits}f}" + (
                    f"  ({q:.2f}x)" if q is not None and r is not vx else ""
                )
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
        if vx:
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
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False
        )
    axes[0].set_yticks(ypos, labels)
    axes[0].invert_yaxis()
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
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "ladder.png"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown(doc))
    chart(doc, paths[2])
    return paths


# --- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short runs (under 2 minutes here)")
    p.add_argument(
        "--rungs",
        default=",".join(DEFAULT_RUNGS),
        help=f"comma-separated subset, in ladder order (default %(default)s; "
        f"also: {', '.join(r.name for r in RUNGS if not r.default)})",
    )
    p.add_argument("--runs", type=int, help="runs per rung, figures are medians (default 3)")
    p.add_argument("--out", help="write DIR/results.json, DIR/results.md and DIR/ladder.png")
    p.add_argument("--explain", action="store_true", help="say what each step of the ladder saved")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--tcp-seconds", type=int, help="iperf3 TCP seconds per run")
    p.add_argument("--udp-probes", type=int, help="iperf3 UDP runs per packet-rate search")
    p.add_argument("--pings", type=int, help="idle pings per run")
    p.add_argument("--no-zerocopy", action="store_true", help="do not use iperf3 -Z")
    p.add_argument("--print-schema", action="store_true", help="print the JSON schema and exit")
    p.add_argument("--netns-prefix", default=NS_PREFIX, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    s = Settings(**{k: v for k, v in vars(base).items() if k != "rungs"})
    s.rungs = parse_rungs(args.rungs)
    for attr, value, low in (
        ("runs", args.runs, 1),
        ("tcp_seconds", args.tcp_seconds, 1),
        ("udp_probes", args.udp_probes, 1),
        ("pings_idle", args.pings, 10),
    ):
        if value is not None:
            if value < low:
                raise BenchError(f"--{attr.replace('_', '-')} must be >= {low}")
            setattr(s, attr, value)
    s.zerocopy = not args.no_zerocopy
    return s


class RichReporter(Reporter):
    def __init__(self, progress: Any, task: Any, console: Any) -> None:
        self.progress, self.task, self.console = progress, task, console

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self, steps: int = 1) -> None:
        if steps:
            self.progress.advance(self.task, steps)

    def log(self, text: str) -> None:
        self.progress.console.log(text)


def run(args: argparse.Namespace) -> int:
    """`udpbackend bench`; user-facing problems raise BenchError (one line, exit 2)."""
    if args.print_schema:
        print(json.dumps(SCHEMA, indent=1))
        return 0
    s = settings_from_args(args)
    from .testbed import missing_requirements

    missing = missing_requirements()
    if missing:
        raise BenchError(f"bench needs {', '.join(missing)}")
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        if args.out:
            import matplotlib  # noqa: F401 - checked before the long run, used by chart()
    except ImportError:
        raise BenchError(
            "bench needs rich and matplotlib: pip install 'udpbackend[bench]'"
        ) from None
    err = Console(stderr=True, log_path=False)
    out_console = Console()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=len(s.rungs) * s.runs * STEPS_PER_RUN)
        try:
            doc = run_ladder(s, RichReporter(progress, task, err), args.netns_prefix)
        except KeyboardInterrupt:
            err.print("interrupted: testbed removed, no results written")
            return 130
    problems = validate(doc)
    if problems:  # a bug here, not the user's: say so but keep the numbers
        err.print(f"results do not match the schema: {problems[:3]}")
    if args.markdown or not out_console.is_terminal:
        print(markdown(doc, explain_text=False), end="")
    else:
        out_console.print(describe(doc))
        out_console.print(render_rich_table(doc))
        for note in doc["notes"]:
            out_console.print(f"Note: {note}")
    if args.explain:
        print("\nWhat each step of the ladder changes (from this run's counters):")
        for para in doc["explain"]:
            print(f"- {para}")
    if args.out:
        paths = write_outputs(doc, Path(args.out))
        err.print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r["name"] for r in doc["rungs"] if r["status"] != "ok"]
    if failed:
        err.print(f"failed rungs: {', '.join(failed)}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (benchmarks/bench_overlay.py): same flags as `udpbackend bench`."""
    p = argparse.ArgumentParser(prog="udpbackend bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 2
