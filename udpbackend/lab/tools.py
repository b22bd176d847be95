"""The traffic tools the lab runs, ping and iperf3: their command lines and what their output says.

Lives here: ping's argv and its parsed replies (PingResult), iperf3's client argv, its JSON
turned into an IperfResult, the line between "the iperf3 test never started" (IperfSetupError)
and "it ran and failed", and waiting for an iperf3 server to listen. Must not: start processes
or enter namespaces (NetnsLab does both and calls these).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import TestbedError

# iperf3 3.12 waits this long, once and without retrying, for the server's answer to the one
# datagram that sets up a UDP stream (SO_RCVTIMEO in iperf_udp_connect), then gives up with
# "unable to read from stream socket".
IPERF3_UDP_SETUP_WAIT = 30


class IperfSetupError(TestbedError):
    """iperf3 failed before its test started (no stream connected, no interval measured): a
    failure of the measuring tool's set-up, not a measurement. ``reason``: iperf3's error."""

    def __init__(self, dst: str, reason: str) -> None:
        super().__init__(f"iperf3 to {dst}: {reason}")
        self.dst = dst
        self.reason = reason


# --- ping --------------------------------------------------------------------------------------


@dataclass
class PingResult:
    """Parsed `ping` output: per-reply RTTs in milliseconds."""

    dst: str
    sent: int
    rtts_ms: list[float]
    output: str = ""

    @property
    def received(self) -> int:
        return len(self.rtts_ms)

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.rtts_ms) if self.rtts_ms else math.nan

    @property
    def avg_ms(self) -> float:
        return statistics.fmean(self.rtts_ms) if self.rtts_ms else math.nan

    @property
    def min_ms(self) -> float:
        return min(self.rtts_ms) if self.rtts_ms else math.nan

    @property
    def max_ms(self) -> float:
        return max(self.rtts_ms) if self.rtts_ms else math.nan

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, q in [0, 100]."""
        if not self.rtts_ms:
            return math.nan
        ordered = sorted(self.rtts_ms)
        k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
        return ordered[k]


def parse_ping(dst: str, sent: int, out: str) -> PingResult:
    rtts = [float(m.group(1)) for m in re.finditer(r"time[=<]([0-9.]+) ?ms", out)]
    return PingResult(dst=dst, sent=sent, rtts_ms=rtts, output=out)


def ping_argv(
    dst: str, count: int, interval: float, size: int, extra: Sequence[str]
) -> tuple[list[str], int]:
    """ping's argv and its deadline (-w, seconds): it ends by itself by then."""
    deadline = max(1, math.ceil(count * interval + 2))
    argv = [
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        f"{interval:g}",
        "-W",
        "1",
        "-w",
        str(deadline),
        "-s",
        str(size),
        *extra,
        dst,
    ]
    return argv, deadline


# --- iperf3 ------------------------------------------------------------------------------------


@dataclass
class IperfResult:
    """One iperf3 TCP run (client JSON): receiver-side rate, sender retransmits."""

    bits_per_second: float
    sent_bits_per_second: float
    retransmits: int
    bytes: int
    seconds: float
    zerocopy: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9


def iperf3_client_argv(
    dst: str, port: int, secs: int, zerocopy: bool, extra: Sequence[str]
) -> list[str]:
    argv = ["iperf3", "-c", dst, "-p", str(port), "-J", "-t", str(secs)]
    argv += ["--connect-timeout", "3000"]
    if zerocopy:
        argv.append("-Z")
    return argv + list(extra)


def iperf3_client_timeout(secs: int) -> float:
    """How long an iperf3 client may take: the test, iperf3's own UDP set-up wait, a margin."""
    return secs + IPERF3_UDP_SETUP_WAIT + 15


def never_started(data: dict[str, Any]) -> bool:
    """iperf3's JSON reports an error before any stream was connected or interval measured."""
    start = data.get("start") or {}
    return bool(data.get("error")) and not start.get("connected") and not data.get("intervals")


def parse_iperf3(res: subprocess.CompletedProcess[bytes], dst: str, zerocopy: bool) -> IperfResult:
    """The client's JSON as an IperfResult; IperfSetupError if the test never started,
    TestbedError for any other failure (no JSON, or an error after the test began)."""
    out = res.stdout.decode(errors="replace")
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise TestbedError(
            f"iperf3 client produced no JSON (rc {res.returncode}): {out[-500:]}"
            f"{res.stderr.decode(errors='replace')[-500:]}"
        ) from None
    if data.get("error"):
        if never_started(data):
            raise IperfSetupError(dst, str(data["error"]))
        raise TestbedError(f"iperf3 to {dst}: {data['error']}")
    end = data.get("end", {})
    sent = end.get("sum_sent", {})
    recv = end.get("sum_received", {})
    return IperfResult(
        bits_per_second=float(recv.get("bits_per_second", 0.0)),
        sent_bits_per_second=float(sent.get("bits_per_second", 0.0)),
        retransmits=int(sent.get("retransmits", 0)),
        bytes=int(recv.get("bytes", 0)),
        seconds=float(recv.get("seconds", 0.0)),
        zerocopy=zerocopy,
        raw=data,
    )


def wait_listen(proc: subprocess.Popen[bytes], port: int, timeout: float = 5.0) -> None:
    """Wait until proc's netns has a TCP socket listening on port (via /proc/PID/net)."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise TestbedError(f"iperf3 server exited with {proc.returncode}: {err[-500:]}")
        for table in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{proc.pid}/net/{table}") as f:
                    lines = f.readlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) > 3 and (cols[1] + " ").endswith(want) and cols[3] == "0A":
                    return
        time.sleep(0.01)
    raise TestbedError(f"iperf3 server not listening on {port} after {timeout}s")
