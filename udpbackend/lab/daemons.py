"""Handles on the udpbackend daemons a testbed started: Node (static) and EtcdNode (etcd mode).

Lives here: a daemon's process, log and --stats-file as the lab reads them (stats JSON, parsed
log lines such as `peer added`, subnet.env, the health endpoints), and stopping or killing it
by PID. Must not: start daemons or build namespaces (Testbed.start_node and
Cluster.start_etcd_node do), or import the planes: all it knows is what the daemon writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .addressing import TUN_NAME
from .errors import DaemonError, TestbedError, log_tail

if TYPE_CHECKING:
    from .cluster import Cluster
    from .netns import NetnsLab

READY_MARKER = "udpbackend: ready"
# `2026-11-24T22:52:27.123 udpbackend: peer added: 198.19.7.0/24 via 198.18.0.3`
_LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?) udpbackend: ([^:]+): ?(.*)$")
_PEER_ADDED_RE = re.compile(r"^(\S+) via (\S+)")


@dataclass(frozen=True)
class LogEvent:
    """One daemon log line ``<timestamp> udpbackend: <kind>: <text>`` (timestamp: epoch s)."""

    ts: float
    kind: str
    text: str
    line: str


def parse_log_line(line: str) -> LogEvent | None:
    """A daemon log line as a LogEvent (local-time timestamp -> epoch seconds), or None."""
    m = _LOG_RE.match(line)
    if not m:
        return None
    try:
        ts = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    except ValueError:
        try:
            ts = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp()
        except ValueError:
            return None
    return LogEvent(ts=ts, kind=m.group(2), text=m.group(3), line=line)


class Node:
    """A udpbackend daemon started by :meth:`Testbed.start_node` inside one namespace."""

    def __init__(
        self,
        testbed: NetnsLab,
        node: str,
        mode: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        stats_path: Path,
        argv: Sequence[str],
        tun_name: str = TUN_NAME,
    ) -> None:
        self.testbed = testbed
        self.node = node
        self.mode = mode
        self.proc = proc
        self.log_path = log_path
        self.stats_path = stats_path
        self.argv = list(argv)
        self.tun_name = tun_name
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log_path, lines)

    def stats(self) -> dict[str, Any]:
        """The daemon's latest stats JSON (rewritten every second and at exit)."""
        last: Exception | None = None
        for _ in range(20):  # tolerate a reader racing a non-atomic rewrite
            try:
                data = json.loads(self.stats_path.read_text())
                if isinstance(data, dict):
                    return data
                raise TestbedError(f"stats file {self.stats_path} is not a JSON object")
            except (OSError, json.JSONDecodeError) as e:
                last = e
                time.sleep(0.05)
        raise TestbedError(f"cannot read stats file {self.stats_path}: {last}")

    def wait_stats(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Poll stats() until predicate(stats) is true; return the last stats (may not match)."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while True:
            with contextlib.suppress(TestbedError):
                st = self.stats()
                if predicate(st):
                    return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0, check: bool = True) -> int:
        """SIGTERM the daemon, wait for it, and return its exit code.

        With check=True a non-zero exit (or a hang) raises DaemonError with the log tail.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = self.proc.returncode
                raise DaemonError(
                    f"daemon on node {self.node} ignored SIGTERM for {timeout}s "
                    f"(killed)\n{self.log_tail()}"
                ) from None
        self.returncode = self.proc.returncode
        if check and self.returncode != 0:
            raise DaemonError(
                f"daemon on node {self.node} exited with {self.returncode}\n"
                f"argv: {' '.join(self.argv)}\n{self.log_tail()}"
            )
        return self.returncode

    def kill(self) -> int:
        """SIGKILL the daemon (a crash: nothing is cleaned up by it) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        self.returncode = self.proc.returncode
        return self.returncode

    def __repr__(self) -> str:
        return f"<Node {self.node} mode={self.mode} pid={self.pid} alive={self.alive}>"


class EtcdNode(Node):
    """A daemon in etcd mode started by :meth:`Cluster.start_etcd_node` in node ``index``."""

    def __init__(
        self,
        cluster: Cluster,
        index: int,
        mode: str,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        stats_path: Path,
        argv: Sequence[str],
        subnet_file: Path,
        healthz_port: int,
        spawned_at: float,
    ) -> None:
        super().__init__(cluster, f"n{index}", mode, proc, log_path, stats_path, argv)
        self.cluster = cluster
        self.index = index
        self.subnet_file = subnet_file
        self.healthz_port = healthz_port
        self.spawned_at = spawned_at  # time.time() just before the process was spawned
        self.ready_at: float | None = None  # time.time() when /readyz first answered 200

    @property
    def public_ip(self) -> str:
        return self.cluster.underlay_addr(self.index)

    # -- what the daemon wrote --

    def subnet_env(self) -> dict[str, str]:
        """subnet.env as KEY -> VALUE ({} if it is not there yet)."""
        try:
            text = self.subnet_file.read_text()
        except OSError:
            return {}
        env = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key.strip()] = value.strip()
        return env

    def subnet(self) -> str:
        """The leased subnet from subnet.env, as its network CIDR (e.g. ``198.19.7.0/24``)."""
        value = self.subnet_env().get("FLANNEL_SUBNET")
        if not value:
            raise TestbedError(f"{self.subnet_file} has no FLANNEL_SUBNET (yet)")
        return str(ipaddress.IPv4Network(value, strict=False))

    def tun_addr(self) -> str:
        """flannel0's address: the lease subnet's network address."""
        return str(ipaddress.IPv4Network(self.subnet()).network_address)

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def events(self, kind: str | None = None) -> list[LogEvent]:
        """Parsed log lines (``peer added``, ``peer removed``, ``ready``, ``etcd lost`` ...)."""
        out = []
        for line in self.log_lines():
            ev = parse_log_line(line)
            if ev is not None and (kind is None or ev.kind == kind):
                out.append(ev)
        return out

    def peers(self) -> dict[str, str]:
        """Peer subnets the daemon currently routes (subnet -> public IP), replayed from its log."""
        known: dict[str, str] = {}
        for ev in self.events():
            if ev.kind == "peer added":
                m = _PEER_ADDED_RE.match(ev.text)
                if m:
                    known[m.group(1)] = m.group(2)
            elif ev.kind == "peer removed":
                known.pop(ev.text.split()[0] if ev.text else "", None)
        return known

    def wait_event(
        self,
        kind: str,
        match: str | Callable[[LogEvent], bool] | None = None,
        timeout: float = 10.0,
        after: float | None = None,
    ) -> LogEvent:
        """Wait for a log line of ``kind`` whose text starts with ``match`` (or satisfies it),
        stamped at or after ``after`` (epoch s, default: any; log stamps are truncated to the
        millisecond, so 1 ms earlier counts). Raises DaemonError on timeout."""

        def ok(ev: LogEvent) -> bool:
            if ev.kind != kind or (after is not None and ev.ts < after - 0.001):
                return False
            if match is None:
                return True
            if callable(match):
                return match(ev)
            return ev.text.startswith(match)

        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events():
                if ok(ev):
                    return ev
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"node {self.node}: no '{kind}: {match if isinstance(match, str) else ''}' "
                    f"log line within {timeout}s\n--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.02)

    # -- health endpoints --

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET http://<public ip>:<healthz port><path> from inside the node's netns."""
        return self.cluster.http_get(self.index, self.public_ip, self.healthz_port, path, timeout)

    def readyz(self) -> tuple[int, str]:
        return self.http_get("/readyz")

    def healthz(self) -> tuple[int, str]:
        return self.http_get("/healthz")

    def __repr__(self) -> str:
        return f"<EtcdNode n{self.index} mode={self.mode} pid={self.pid} alive={self.alive}>"
