# Network-namespace testbeds shared by the integration tests, the demo and the benchmarks:
# `Testbed` (two netns joined by a veth pair, static daemons) and `Cluster` (a hub netns with a
# bridge and a real etcd, N node netns, daemons in etcd mode), both on one `NetnsLab` base that
# owns namespaces and processes. Stdlib + pyroute2 only: it must NOT import other udpbackend
# modules (it drives the daemon as a subprocess). Every address lives in 198.18.0.0/15;
# everything created here is removed by close() (also on failure, Ctrl-C and interpreter exit).
"""Network namespaces plus helpers to drive udpbackend daemons in them.

Testbed (static daemons, all inside namespaces this object creates and removes)::

    netns A                                              netns B
    flannel0 198.19.1.0/32 (daemon)                      flannel0 198.19.2.0/32 (daemon)
    veth-a 198.18.0.1/24  <------------ veth ----------> veth-b 198.18.0.2/24
    vxlan0 198.18.100.1/24 (optional, kernel VXLAN)      vxlan0 198.18.100.2/24

Cluster (daemons in etcd mode, like flanneld)::

    netns hub: bridge br0 198.18.0.254/24, etcd on 198.18.0.254:<port>
      |-- vh-n0 <-> veth-n0 198.18.0.1/24  netns n0   flannel0 <lease network addr>/32
      |-- vh-n1 <-> veth-n1 198.18.0.2/24  netns n1   ...
      `-- vh-nI <-> veth-nI 198.18.0.(I+1)/24

Typical use::

    with Testbed() as tb:
        a = tb.start_node("a")
        b = tb.start_node("b")
        print(tb.ping("a", tb.tun_addr("b")).avg_ms)

    with Cluster(nodes=3) as cl:
        cl.put_config({"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}})
        for i in range(3):
            cl.start_etcd_node(i)
        cl.wait_converged()
        print(cl.ping_nodes(0, 1).avg_ms)
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import errno
import functools
import http.client
import ipaddress
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pyroute2 import IPRoute, netns
from pyroute2 import config as _pyroute2_config

# pyroute2 forks short-lived helper children (netns sockets) and SIGTERMs them when done. With a
# Python SIGTERM handler installed (the demo and the benchmark have one), such a child would run
# that handler and unwind *our* stack; reset SIGTERM to the default in those children.
_pyroute2_config.disable_mp_signal = True

__all__ = [
    "BRIDGE_NAME",
    "DEFAULT_NETWORK_CONFIG",
    "ETCD_PREFIX",
    "HUB",
    "HUB_ADDR",
    "NODES",
    "OVERLAY_NETWORK",
    "TUN_NAME",
    "UDP_PORT",
    "VXLAN_PORT",
    "Cluster",
    "DaemonError",
    "EtcdNode",
    "EtcdNotReady",
    "EtcdProcess",
    "EtcdTls",
    "HubEtcd",
    "IperfResult",
    "LogEvent",
    "NetnsLab",
    "Node",
    "PingResult",
    "Testbed",
    "TestbedError",
    "cluster_missing_requirements",
    "etcd_missing_binaries",
    "free_tcp_port",
    "lease_value",
    "missing_requirements",
    "parse_log_line",
    "subnet_key",
]

# --- Addressing plan (RFC 2544 benchmarking range 198.18.0.0/15 only) -------------------------

NODES = ("a", "b")
UNDERLAY_PREFIX = 24
UNDERLAY_ADDR = {"a": "198.18.0.1", "b": "198.18.0.2"}
VETH_NAME = {"a": "veth-a", "b": "veth-b"}
OVERLAY_NETWORK = "198.19.0.0/16"
NODE_SUBNET = {"a": "198.19.1.0/24", "b": "198.19.2.0/24"}
TUN_ADDR = {"a": "198.19.1.0", "b": "198.19.2.0"}
TUN_NAME = "flannel0"
UDP_PORT = 8285
VXLAN_NAME = "vxlan0"
VXLAN_VNI = 1
VXLAN_PORT = 8472
VXLAN_MTU = 1450
VXLAN_ADDR = {"a": "198.18.100.1", "b": "198.18.100.2"}
IPERF_PORT = 5201

# Cluster: hub 198.18.0.254 with the bridge and etcd; node i = 198.18.0.(i+1) on veth-n<i>.
HUB = "hub"
HUB_ADDR = "198.18.0.254"
BRIDGE_NAME = "br0"
MAX_CLUSTER_NODES = 253  # node indices 0..252 -> 198.18.0.1 .. 198.18.0.253
ETCD_PREFIX = "/coreos.com/network"
DEFAULT_NETWORK_CONFIG: dict[str, Any] = {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}
HEALTHZ_PORT = 8081
ETCD = os.environ.get("ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("ETCDCTL", shutil.which("etcdctl") or "/usr/bin/etcdctl")

READY_MARKER = "udpbackend: ready"
REPO_ROOT = Path(__file__).resolve().parent.parent

_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_IP_RECVERR = 11  # <linux/in.h>; not exported by the socket module
_counter = itertools.count(1)
_live: weakref.WeakSet[NetnsLab] = weakref.WeakSet()
_ns_switch = threading.RLock()  # pyroute2's pushns/popns keep one process-global stack
_libc: Any = None
# `2026-11-24T22:52:27.123 udpbackend: peer added: 198.19.7.0/24 via 198.18.0.3`
_LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?) udpbackend: ([^:]+): ?(.*)$")
_PEER_ADDED_RE = re.compile(r"^(\S+) via (\S+)")


class TestbedError(RuntimeError):
    """Building or driving the testbed failed."""

    __test__ = False  # not a pytest test class


class DaemonError(TestbedError):
    """A udpbackend daemon failed to start, died, or exited with a non-zero status."""


def missing_requirements() -> list[str]:
    """What this host lacks for the netns testbed (empty list = everything is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (euid 0)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    for tool in ("iperf3", "ping"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


def cluster_missing_requirements() -> list[str]:
    """missing_requirements() plus the etcd server and etcdctl a Cluster runs."""
    missing = missing_requirements()
    missing += [
        f"{path} (apt-get install etcd-server etcd-client)" for path in etcd_missing_binaries()
    ]
    return missing


def etcd_missing_binaries() -> list[str]:
    """The etcd / etcdctl executables ($ETCD / $ETCDCTL) that are not there."""
    return [p for p in (ETCD, ETCDCTL) if not (os.path.isfile(p) and os.access(p, os.X_OK))]


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _daemon_env(env: Mapping[str, str]) -> dict[str, str]:
    """env with the repo on PYTHONPATH (the daemon runs as `python -m udpbackend`)."""
    penv = dict(env)
    penv["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), penv.get("PYTHONPATH", "")) if p
    )
    penv.setdefault("PYTHONUNBUFFERED", "1")
    return penv


# --- Results ----------------------------------------------------------------------------------


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


def _parse_ping(dst: str, sent: int, out: str) -> PingResult:
    rtts = [float(m.group(1)) for m in re.finditer(r"time[=<]([0-9.]+) ?ms", out)]
    return PingResult(dst=dst, sent=sent, rtts_ms=rtts, output=out)


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


# --- Daemon handles ---------------------------------------------------------------------------


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
        return _tail(self.log_path, lines)

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


# --- The shared machinery: namespaces, processes, cleanup -------------------------------------


class NetnsLab:
    """Namespaces and processes owned by one object, all removed by :meth:`close`.

    Namespaces are named ``<prefix>-<pid>-<n>-<key>`` and registered the moment they exist;
    processes are started inside them (``ip netns exec``, never to configure) and tracked, then
    ended by PID. ``close()`` runs on context exit, in subclass constructors that fail, and at
    interpreter exit; it is idempotent and a no-op in forked children. Subclasses build the
    topology (links, addresses) with pyroute2 through :meth:`ipr`.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, prefix: str = "ublab", workdir: str | os.PathLike[str] | None = None
    ) -> None:
        self.prefix = prefix
        self.ns: dict[str, str] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []
        self._cleanup_paths: list[Path] = []
        self._lock = threading.Lock()
        self._closed = False
        self._ns_inodes: set[tuple[int, int]] = set()
        self._own_workdir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="udpbackend-testbed-") if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ip_bin = shutil.which("ip")
        # Forked children (pyroute2 helpers, preexec) must never tear down the owner's testbed.
        self._owner_pid = os.getpid()
        self._uniq = f"{os.getpid()}-{next(_counter)}"
        _live.add(self)

    # -- namespaces --

    def _key(self, node: str | int) -> str:
        """The key in self.ns for a node (subclasses may accept more than the key itself)."""
        return str(node)

    def ns_name(self, node: str | int) -> str:
        return self.ns[self._key(node)]

    def add_netns(self, key: str) -> str:
        """Create netns ``<prefix>-<pid>-<n>-<key>`` and register it for removal."""
        self._check_open()
        if key in self.ns:
            raise TestbedError(f"node {key} already has a namespace")
        name = f"{self.prefix}-{self._uniq}-{key}"
        if name in netns.listnetns():
            raise TestbedError(f"netns {name} already exists (refusing to reuse it)")
        netns.create(name)
        self.ns[key] = name  # registered before anything else can fail
        st = os.stat(f"/var/run/netns/{name}")
        self._ns_inodes.add((st.st_dev, st.st_ino))
        return name

    def _prepare_netns(self, key: str, disable_ipv6: bool, forward: bool = True) -> None:
        """lo up, ip_forward, IPv6 off (no router-solicitation noise on TUNs)."""
        if forward:
            self.sysctl(key, "net.ipv4.ip_forward", "1")
        if disable_ipv6 and os.path.exists("/proc/sys/net/ipv6"):
            self.sysctl(key, "net.ipv6.conf.all.disable_ipv6", "1")
            self.sysctl(key, "net.ipv6.conf.default.disable_ipv6", "1")
        with self.ipr(key) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")

    def _add_veth(self, key: str, ifname: str, peer_key: str, peer_ifname: str) -> None:
        """A veth pair created inside ``key``'s netns, one end moved into ``peer_key``'s."""
        with self.ipr(key) as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer=peer_ifname)
            idx = ipr.link_lookup(ifname=peer_ifname)[0]
            ipr.link("set", index=idx, net_ns_fd=self.ns[peer_key])

    def _address_iface(self, key: str, ifname: str, addr: str, prefixlen: int, mtu: int) -> None:
        with self.ipr(key) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, mtu=mtu)
            ipr.addr("add", index=idx, address=addr, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")

    def _wait_oper_up(self, links: Iterable[tuple[str, str]], timeout: float = 5.0) -> None:
        """Wait until each (netns key, ifname) reports operstate UP."""
        deadline = time.monotonic() + timeout
        for key, ifname in links:
            with self.ipr(key) as ipr:
                while True:
                    link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
                    if link.get_attr("IFLA_OPERSTATE") == "UP":
                        break
                    if time.monotonic() > deadline:
                        raise TestbedError(f"{ifname} in {self.ns[key]} never came up")
                    time.sleep(0.01)

    def _check_open(self) -> None:
        if self._closed:
            raise TestbedError("testbed is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def ipr(self, node: str | int) -> IPRoute:
        """A fresh IPRoute bound to the node's netns (use as a context manager).

        flags=0: never (re)create a namespace by accident.
        """
        self._check_open()
        return IPRoute(netns=self.ns_name(node), flags=0, groups=0)

    @contextlib.contextmanager
    def in_netns(self, node: str | int) -> Iterator[None]:
        """Switch the *calling thread* into the node's netns for the block (then switch back).

        Sockets created inside stay in that namespace after the block.
        """
        self._check_open()
        name = self.ns_name(node)
        with _ns_switch:
            netns.pushns()
            try:
                netns.setns(name, flags=0)
                yield
            finally:
                netns.popns()

    def connect(self, node: str | int, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection from inside the node's netns (OSError if it cannot be made)."""
        sock = self.socket(node, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def socket(self, node: str | int, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket living in the node's netns."""
        with self.in_netns(node):
            return socket.socket(family, type, proto)

    def free_port(self, node: str | int, host: str = "0.0.0.0") -> int:
        """A TCP port nothing listens on in the node's netns right now."""
        with self.socket(node, socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def sysctl(self, node: str | int, key: str, value: str) -> None:
        """Write a sysctl via /proc/sys inside the node's netns (net.* keys are per-netns)."""
        path = "/proc/sys/" + key.replace(".", "/")
        with self.in_netns(node), open(path, "w") as f:
            f.write(value)

    def read_sysctl(self, node: str | int, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        with self.in_netns(node), open(path) as f:
            return f.read().strip()

    def link_names(self, node: str | int) -> list[str]:
        with self.ipr(node) as ipr:
            return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]

    def tun_state(self, node: str | int, name: str = TUN_NAME) -> dict[str, Any] | None:
        """{"up", "mtu", "addrs", "routes"} of a device in the node; None if there is none."""
        with self.ipr(node) as ipr:
            return self._dev_state(ipr, name)

    @staticmethod
    def _dev_state(ipr: IPRoute, name: str) -> dict[str, Any] | None:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        links = ipr.get_links(idx[0])
        if not links:
            return None
        link = links[0]
        addrs = [
            f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)
        ]
        routes = []
        for r in ipr.get_routes(family=socket.AF_INET, oif=idx[0], table=254):
            dst = r.get_attr("RTA_DST")
            if dst:
                routes.append(f"{dst}/{r['dst_len']}")
        return {
            "index": idx[0],
            "up": bool(link["flags"] & _IFF_UP),
            "mtu": link.get_attr("IFLA_MTU"),
            "addrs": addrs,
            "routes": routes,
        }

    # -- processes --

    def _netns_argv(self, node: str | int, argv: Sequence[str]) -> tuple[list[str], Any]:
        name = self.ns_name(node)
        if self._ip_bin:
            # `ip netns exec` execs the command (Popen.pid is the tool's own PID) and gives it a
            # /sys matching the namespace. It is used only to *run* processes, never to configure.
            return [self._ip_bin, "netns", "exec", name, *argv], None

        def enter() -> None:
            netns.setns(name, flags=0)

        return list(argv), enter

    def spawn(
        self,
        node: str | int,
        argv: Sequence[str],
        *,
        pdeathsig: bool = True,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start argv inside the node's netns; the process is tracked and ended by close().

        pdeathsig: the child gets SIGTERM if the spawning thread dies (so spawn from a thread
        that outlives the child, normally the main thread).
        """
        self._check_open()
        full, enter = self._netns_argv(node, [str(a) for a in argv])
        libc = _get_libc() if pdeathsig else None

        def preexec() -> None:
            if libc is not None:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if enter is not None:
                enter()

        kw.setdefault("start_new_session", True)  # Ctrl-C reaches us; close() ends children
        kw.setdefault("stdin", subprocess.DEVNULL)
        with self._lock:
            proc: subprocess.Popen[bytes] = subprocess.Popen(full, preexec_fn=preexec, **kw)
            self._procs.append(proc)
        return proc

    def run(
        self,
        node: str | int,
        argv: Sequence[str],
        timeout: float = 30.0,
        check: bool = False,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv to completion inside the node's netns (killed after `timeout` seconds)."""
        proc = self.spawn(
            node,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise TestbedError(
                f"{' '.join(map(str, argv))} in node {node} timed out after {timeout}s\n"
                f"{err.decode(errors='replace')[-2000:]}"
            ) from None
        finally:
            self._forget(proc)
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and res.returncode != 0:
            raise TestbedError(
                f"{' '.join(map(str, argv))} in node {node} exited {res.returncode}\n"
                f"{err.decode(errors='replace')[-2000:]}"
            )
        return res

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if proc.poll() is not None and proc in self._procs:
                self._procs.remove(proc)

    @staticmethod
    def _end(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _spawn_daemon(
        self, node: str | int, argv: Sequence[str], tag: str, env: Mapping[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start a daemon with stdout+stderr into ``<workdir>/daemon-<tag>.log``."""
        self._check_open()
        log_path = self.workdir / f"daemon-{tag}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed by close()
        self._files.append(log)
        proc = self.spawn(node, argv, stdout=log, stderr=subprocess.STDOUT, env=_daemon_env(env))
        return proc, log_path

    # -- traffic helpers --

    @staticmethod
    def _ping_argv(
        dst: str, count: int, interval: float, size: int, extra: Sequence[str]
    ) -> tuple[list[str], int]:
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

    def ping(
        self,
        node: str | int,
        dst: str,
        count: int = 10,
        interval: float = 0.02,
        size: int = 56,
        timeout: float | None = None,
        extra: Sequence[str] = (),
    ) -> PingResult:
        """Ping dst from node; returns per-reply RTTs. Bounded by -w (deadline) and `timeout`."""
        argv, deadline = self._ping_argv(dst, count, interval, size, extra)
        res = self.run(node, argv, timeout=timeout or deadline + 10)
        return _parse_ping(dst, count, res.stdout.decode(errors="replace"))

    def ping_start(
        self,
        node: str | int,
        dst: str,
        count: int,
        interval: float = 0.05,
        size: int = 56,
        extra: Sequence[str] = (),
    ) -> Callable[[], PingResult]:
        """Start a long ping in the background; returns a function that waits and parses it.

        Call the returned function from the thread that called ping_start (pdeathsig).
        """
        argv, deadline = self._ping_argv(dst, count, interval, size, extra)
        proc = self.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def result(timeout: float = deadline + 10) -> PingResult:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            finally:
                self._forget(proc)
            return _parse_ping(dst, count, out.decode(errors="replace"))

        return result

    def _iperf3(
        self,
        client: str | int,
        server_node: str | int,
        dst: str,
        seconds: float = 3,
        zerocopy: bool = False,
        extra: Sequence[str] = (),
        port: int = IPERF_PORT,
    ) -> IperfResult:
        """One iperf3 TCP run: `iperf3 -s -1` in server_node, `iperf3 -c dst -J` in client."""
        secs = max(1, round(seconds))
        server = self.spawn(
            server_node,
            ["iperf3", "-s", "-1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            self._wait_listen(server, port)
            argv = ["iperf3", "-c", dst, "-p", str(port), "-J", "-t", str(secs)]
            argv += ["--connect-timeout", "3000"]
            if zerocopy:
                argv.append("-Z")
            argv += list(extra)
            res = self.run(client, argv, timeout=secs + 30)
            out = res.stdout.decode(errors="replace")
            try:
                data = json.loads(out)
            except json.JSONDecodeError:
                raise TestbedError(
                    f"iperf3 client produced no JSON (rc {res.returncode}): {out[-500:]}"
                    f"{res.stderr.decode(errors='replace')[-500:]}"
                ) from None
            if data.get("error"):
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
        finally:
            self._end(server, grace=2.0)
            self._forget(server)

    @staticmethod
    def _wait_listen(proc: subprocess.Popen[bytes], port: int, timeout: float = 5.0) -> None:
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

    def http_get(
        self, node: str | int, host: str, port: int, path: str, timeout: float = 2.0
    ) -> tuple[int, str]:
        """HTTP GET from inside the node's netns: (status, body text). OSError if unreachable."""
        sock = self.socket(node, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            resp = http.client.HTTPResponse(sock)
            try:
                resp.begin()
                body = resp.read()
            except http.client.HTTPException as e:
                raise OSError(errno.EPROTO, f"bad HTTP answer from {host}:{port}: {e!r}") from e
            finally:
                resp.close()
        return resp.status, body.decode(errors="replace")

    def udp_probe(
        self, node: str | int, dst: str, port: int = 9, timeout: float = 0.5, payload: bytes = b"?"
    ) -> str:
        """Send one UDP datagram from node to dst:port and classify what comes back.

        "refused" (ICMP port unreachable: dst was reached), "net-unreachable" (ICMP type 3
        code 0, e.g. from the daemon for a subnet without a lease), "host-unreachable",
        "timeout" (nothing came back), or "answer" (some reply datagram).
        """
        sock = self.socket(node, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            # IP_RECVERR: report every ICMP error (net-unreachable is not "fatal" for UDP).
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            sock.settimeout(timeout)
            try:
                sock.connect((dst, port))
                sock.send(payload)
                sock.recv(2048)
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "refused"
            except OSError as e:
                if e.errno == errno.ENETUNREACH:
                    return "net-unreachable"
                if e.errno == errno.EHOSTUNREACH:
                    return "host-unreachable"
                raise
            return "answer"

    # -- teardown --

    def _sweep_namespace_pids(self) -> None:
        """End leftovers we started indirectly (e.g. a daemon's child) still inside our netns."""
        if not self._ns_inodes:
            return
        me = os.getpid()
        victims = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in self._ns_inodes:
                victims.append(int(entry))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            if sig == signal.SIGTERM and victims:
                time.sleep(0.5)

    def close(self) -> None:
        """End every tracked process by PID, delete the namespaces, remove the workdir.

        Idempotent; safe after a half-built constructor; a no-op in forked children.
        """
        if os.getpid() != getattr(self, "_owner_pid", os.getpid()):
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(reversed(self._procs))
            self._procs.clear()
        errors: list[str] = []
        for proc in procs:
            try:
                self._end(proc)
            except Exception as e:  # keep tearing down
                errors.append(f"pid {proc.pid}: {e}")
        try:
            self._sweep_namespace_pids()
        except Exception as e:
            errors.append(f"sweep: {e}")
        for name in list(self.ns.values()):
            try:
                if name in netns.listnetns():
                    netns.remove(name)
            except Exception as e:
                errors.append(f"netns {name}: {e}")
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()
        for path in self._cleanup_paths:
            shutil.rmtree(path, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _live.discard(self)
        if errors:
            raise TestbedError("testbed cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self.close()


# --- The two-node testbed ---------------------------------------------------------------------


class Testbed(NetnsLab):
    """Two network namespaces (nodes "a" and "b") joined by a veth pair.

    Creates: netns ``<prefix>-<pid>-<n>-a`` / ``-b``, veth-a 198.18.0.1/24 <-> veth-b 198.18.0.2/24
    (MTU ``underlay_mtu``), lo up, ip_forward=1, IPv6 off (no router-solicitation noise on TUNs).
    ``close()`` (also on context exit, constructor failure and interpreter exit) ends every process
    started through this object by PID and deletes both namespaces, which removes the veth,
    VXLAN and TUN devices with them.
    """

    def __init__(
        self,
        underlay_mtu: int = 1500,
        prefix: str = "ubtb",
        disable_ipv6: bool = True,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.underlay_mtu = underlay_mtu
        self._vxlan = False
        super().__init__(prefix, workdir)
        try:
            self._build(disable_ipv6)
        except BaseException:
            self.close()
            raise

    # -- construction --

    def _build(self, disable_ipv6: bool) -> None:
        for node in NODES:
            self.add_netns(node)
        for node in NODES:
            self._prepare_netns(node, disable_ipv6)
        # Create the pair inside A (no name clash with anything in the root netns), move one end.
        self._add_veth("a", VETH_NAME["a"], "b", VETH_NAME["b"])
        for node in NODES:
            self._address_iface(
                node, VETH_NAME[node], UNDERLAY_ADDR[node], UNDERLAY_PREFIX, self.underlay_mtu
            )
        self._wait_link_up()

    def _wait_link_up(self, timeout: float = 5.0) -> None:
        self._wait_oper_up([(node, VETH_NAME[node]) for node in NODES], timeout)

    # -- small accessors --

    @staticmethod
    def underlay_addr(node: str) -> str:
        return UNDERLAY_ADDR[node]

    @staticmethod
    def tun_addr(node: str) -> str:
        return TUN_ADDR[node]

    @staticmethod
    def subnet(node: str) -> str:
        return NODE_SUBNET[node]

    @staticmethod
    def veth(node: str) -> str:
        return VETH_NAME[node]

    @staticmethod
    def vxlan_addr(node: str) -> str:
        return VXLAN_ADDR[node]

    @staticmethod
    def other(node: str) -> str:
        return "b" if node == "a" else "a"

    # -- udpbackend daemons --

    def daemon_argv(
        self,
        node: str,
        mode: str = "batched",
        peers: Iterable[tuple[str, str]] | None = None,
        peers_file: str | os.PathLike[str] | None = None,
        stats_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> list[str]:
        """The `python -m udpbackend run ...` command line for a node."""
        other = self.other(node)
        if peers is None:
            peers = [(NODE_SUBNET[other], UNDERLAY_ADDR[other])]
        argv = [
            sys.executable,
            "-m",
            "udpbackend",
            "run",
            "--network",
            OVERLAY_NETWORK,
            "--subnet",
            NODE_SUBNET[node],
            "--iface",
            VETH_NAME[node],
            "--port",
            str(UDP_PORT),
            "--mode",
            mode,
        ]
        for subnet, ip in peers:
            argv += ["--peer", f"{subnet}={ip}"]
        if peers_file is not None:
            argv += ["--peers-file", str(peers_file)]
        if stats_file is not None:
            argv += ["--stats-file", str(stats_file)]
        return argv + list(extra_args)

    def start_node(
        self,
        node: str,
        mode: str = "batched",
        extra_args: Sequence[str] = (),
        peers: Iterable[tuple[str, str]] | None = None,
        peers_file: str | os.PathLike[str] | None = None,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> Node:
        """Launch the daemon in `node` and wait until its TUN is up with its address.

        peers: (subnet, underlay ip) pairs; default = the other node's subnet -> its underlay addr.
        Raises DaemonError with the log tail if the daemon dies or is not ready within `timeout`.
        """
        self._check_open()
        tag = f"{node}-{mode}-{next(_counter)}"
        stats_path = self.workdir / f"stats-{tag}.json"
        argv = self.daemon_argv(node, mode, peers, peers_file, stats_path, extra_args)
        proc, log_path = self._spawn_daemon(node, argv, tag, os.environ if env is None else env)
        handle = Node(self, node, mode, proc, log_path, stats_path, argv)
        self._wait_ready(handle, timeout)
        return handle

    def _wait_ready(self, handle: Node, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        tun_ok_at: float | None = None
        state: dict[str, Any] | None = None
        want_addr = f"{TUN_ADDR[handle.node]}/32"
        with self.ipr(handle.node) as ipr:
            while True:
                rc = handle.proc.poll()
                if rc is not None:
                    handle.returncode = rc
                    raise DaemonError(
                        f"daemon on node {handle.node} (mode {handle.mode}) exited with {rc} "
                        f"before it was ready\nargv: {' '.join(handle.argv)}\n"
                        f"--- log tail ---\n{handle.log_tail()}"
                    )
                state = self._dev_state(ipr, handle.tun_name)
                tun_ok = bool(state and state["up"] and want_addr in state["addrs"])
                now = time.monotonic()
                if tun_ok and tun_ok_at is None:
                    tun_ok_at = now
                ready_line = READY_MARKER in handle.log_text()
                # Ready = TUN configured AND the daemon says it forwards. Tolerate a daemon that
                # never prints the marker after a short grace, the TUN state is what we test.
                if tun_ok and (ready_line or (tun_ok_at is not None and now - tun_ok_at > 2.0)):
                    return
                if now > deadline:
                    raise DaemonError(
                        f"daemon on node {handle.node} (mode {handle.mode}) not ready after "
                        f"{timeout}s: {handle.tun_name} state={state}, ready line seen="
                        f"{ready_line}\nargv: {' '.join(handle.argv)}\n"
                        f"--- log tail ---\n{handle.log_tail()}"
                    )
                time.sleep(0.02)

    def start_pair(self, mode: str = "batched", **kw: Any) -> tuple[Node, Node]:
        """Start daemons on both nodes (each pointing at the other)."""
        a = self.start_node("a", mode, **kw)
        b = self.start_node("b", mode, **kw)
        return a, b

    # -- kernel VXLAN baseline --

    def add_vxlan(self) -> None:
        """Kernel VXLAN as flannel's vxlan backend sets it up: VNI 1, dstport 8472, MTU 1450,
        no learning, local/remote = the underlay addresses; vxlan0 198.18.100.{1,2}/24."""
        self._check_open()
        for node in NODES:
            other = self.other(node)
            with self.ipr(node) as ipr:
                veth_idx = ipr.link_lookup(ifname=VETH_NAME[node])[0]
                ipr.link(
                    "add",
                    ifname=VXLAN_NAME,
                    kind="vxlan",
                    vxlan_id=VXLAN_VNI,
                    vxlan_port=VXLAN_PORT,
                    vxlan_local=UNDERLAY_ADDR[node],
                    vxlan_group=UNDERLAY_ADDR[other],
                    vxlan_link=veth_idx,
                    vxlan_learning=0,
                    mtu=VXLAN_MTU,
                )
                idx = ipr.link_lookup(ifname=VXLAN_NAME)[0]
                ipr.addr("add", index=idx, address=VXLAN_ADDR[node], prefixlen=24)
                ipr.link("set", index=idx, state="up")
        self._vxlan = True

    def del_vxlan(self) -> None:
        self._check_open()
        for node in NODES:
            with self.ipr(node) as ipr:
                idx = ipr.link_lookup(ifname=VXLAN_NAME)
                if idx:
                    ipr.link("del", index=idx[0])
        self._vxlan = False

    # -- traffic helpers --

    def iperf3(
        self,
        client: str = "a",
        dst: str | None = None,
        seconds: float = 3,
        zerocopy: bool = False,
        extra: Sequence[str] = (),
        port: int = IPERF_PORT,
    ) -> IperfResult:
        """One iperf3 TCP run: `iperf3 -s -1` in the other node, `iperf3 -c dst -J` in `client`.

        seconds is rounded to a whole number >= 1 (iperf3 3.12 parses -t with atoi).
        """
        server_node = self.other(client)
        if dst is None:
            dst = TUN_ADDR[server_node]
        return self._iperf3(client, server_node, dst, seconds, zerocopy, extra, port)

    def iperf3_supports_zerocopy(self) -> bool:
        """True if `iperf3 -Z` works here (probed once over the underlay)."""
        try:
            res = self.iperf3("a", UNDERLAY_ADDR["b"], seconds=1, zerocopy=True)
        except TestbedError:
            return False
        return res.bytes > 0


# --- The etcd cluster testbed -----------------------------------------------------------------


def subnet_key(subnet: str, prefix: str = ETCD_PREFIX) -> str:
    """flannel's key for a subnet: ``<prefix>/subnets/198.19.7.0-24``."""
    net = ipaddress.IPv4Network(subnet, strict=False)
    return f"{prefix.rstrip('/')}/subnets/{net.network_address}-{net.prefixlen}"


def lease_value(public_ip: str) -> str:
    """The exact bytes a flannel UDP node writes for its lease."""
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None}, separators=(",", ":"))


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now on ``host`` in the caller's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run_here(
    argv: Sequence[str], *, timeout: float, input: bytes | None, env: Mapping[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """Run argv to completion in the caller's namespaces, output captured."""
    return subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, env=env)


class EtcdNotReady(TestbedError, TimeoutError):
    """etcd did not serve a health check in time (both a TestbedError and a TimeoutError)."""


@dataclass(frozen=True)
class EtcdTls:
    """TLS for an EtcdProcess's client URL; with client_cert/client_key also client-cert auth."""

    ca: Path  # the CA that signed cert (and the client certificate)
    cert: Path
    key: Path
    client_cert: Path | None = None  # set (with client_key): --client-cert-auth, etcdctl uses it
    client_key: Path | None = None


class EtcdProcess:
    """A real single-member etcd: start (and wait until healthy), stop/kill/restart, etcdctl.

    Fast-election flags (heartbeat 10 ms, election 100 ms), data dir and log in a throwaway dir
    on tmpfs when there is one. stop() / kill() / restart() keep the ports and the data dir, for
    outage tests; pause() / resume() freeze it with its sockets open. Processes are ended by PID
    only. What differs between users is injected:

    - ``spawn(argv, **popen_kwargs)``: starts the server (stdout/stderr are passed in);
    - ``host``: the client URL's address (the peer URL is on 127.0.0.1 of the same namespace);
    - ``free_port(host)``, ``connect((host, port), timeout)``, ``run(argv, timeout=, input=,
      env=)``: a free port, a TCP connection and an etcdctl run, all where the server lives
      (defaults: the caller's own network namespace);
    - ``forget(proc)``: called once the server process has ended (e.g. to untrack it);
    - ``tls``: an https client URL, optionally with client-certificate auth.

    ``user`` ("name:password") is passed to etcdctl once auth is enabled. ``cleanup()`` kills
    the process and removes the temp dir.
    """

    def __init__(
        self,
        spawn: Callable[..., subprocess.Popen[bytes]],
        *,
        host: str = "127.0.0.1",
        name: str = "etcd",
        tls: EtcdTls | None = None,
        free_port: Callable[[str], int] = free_tcp_port,
        connect: Callable[[tuple[str, int], float], socket.socket] = socket.create_connection,
        run: Callable[..., subprocess.CompletedProcess[bytes]] = _run_here,
        forget: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> None:
        self._spawn = spawn
        self._connect = connect
        self._run = run
        self._forget = forget
        self.host = host
        self.name = name
        self.tls = tls
        self.client_port = free_port(host)
        self.peer_port = free_port("127.0.0.1")
        while self.peer_port == self.client_port:
            self.peer_port = free_port("127.0.0.1")
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmpdir = Path(tempfile.mkdtemp(prefix="udpbackend-etcd-", dir=base))
        self.data_dir = self.tmpdir / "data"
        self.log_path = self.tmpdir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None
        self.starts = 0

    # -- addresses --

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle --

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--log-level", "error",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.client_cert:
                argv += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        return argv

    def start(self, timeout: float = 15.0) -> Self:
        """Start (or start again, same ports and data) and wait until it serves requests."""
        if self.running():
            return self
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = self._spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise TestbedError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EtcdNotReady(f"etcd not ready after {timeout}s:\n{self.log_tail()}")
            try:
                self._connect((self.host, self.client_port), 0.2).close()
            except OSError:
                time.sleep(0.02)
                continue
            res = self.etcdctl_run(
                ["endpoint", "health"], timeout=5.0, dial_timeout="300ms", command_timeout="1s"
            )
            if res.returncode == 0:
                return
            time.sleep(0.03)

    def _signal(self, sig: int, wait: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)  # by PID: only the process we started
                os.kill(proc.pid, signal.SIGCONT)  # in case it was pause()d
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._forget is not None:
            self._forget(proc)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 5 s."""
        self._signal(signal.SIGTERM, 5.0)

    def kill(self) -> None:
        """SIGKILL: the sockets die at once, like a crashed server."""
        self._signal(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (like a partition)."""
        if self.running() and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running() and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 15.0) -> Self:
        """Start again on the same ports with the same data (after stop() or kill())."""
        if self.running():
            self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Kill the process (if any) and remove the temp dir.  Safe to call twice."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    # -- clients --

    def etcdctl_run(
        self,
        args: Sequence[str],
        timeout: float = 20.0,
        dial_timeout: str = "2s",
        command_timeout: str = "5s",
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`etcdctl <args>` (API v3) against this server, run where the server lives."""
        argv = [
            ETCDCTL,
            f"--endpoints={self.endpoint}",
            f"--dial-timeout={dial_timeout}",
            f"--command-timeout={command_timeout}",
        ]
        if self.user:
            argv.append(f"--user={self.user}")
        if self.tls:
            argv.append(f"--cacert={self.tls.ca}")
            if self.tls.client_cert and self.tls.client_key:
                argv += [f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        env = dict(os.environ, ETCDCTL_API="3")
        return self._run([*argv, *args], timeout=timeout, input=input, env=env)

    def etcdctl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run `etcdctl <args>`; stdout as text. check: raise TestbedError on failure."""
        res = self.etcdctl_run(list(args), input=input)
        if check and res.returncode != 0:
            err = res.stderr.decode(errors="replace")
            raise TestbedError(f"etcdctl {' '.join(args)} -> {res.returncode}: {err}")
        return res.stdout.decode(errors="replace")


class HubEtcd(EtcdProcess):
    """The Cluster's etcd: inside the hub netns, client URL on the hub address (plain http).

    Started with the hub's spawn (tracked, ended by close()), probed and driven with etcdctl
    from inside the hub; the temp dir is removed by the cluster's close().
    """

    def __init__(self, cluster: Cluster, host: str = HUB_ADDR) -> None:
        self.cluster = cluster
        super().__init__(
            functools.partial(cluster.spawn, HUB),
            host=host,
            name="hub",
            free_port=functools.partial(cluster.free_port, HUB),
            connect=functools.partial(cluster.connect, HUB),
            run=functools.partial(cluster.run, HUB),
            forget=cluster._forget,
        )
        cluster._cleanup_paths.append(self.tmpdir)

    def put_many(self, items: Iterable[tuple[str, str]], timeout: float = 10.0) -> int:
        """PUT many keys fast over one HTTP connection to etcd's JSON gateway (/v3/kv/put).

        For bulk setup only (thousands of keys); etcdctl is the reference client elsewhere.
        """

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        sock = self._connect((self.host, self.client_port), timeout)
        conn = http.client.HTTPConnection(self.host, self.client_port, timeout=timeout)
        n = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = sock
            for key, value in items:
                body = json.dumps({"key": b64(key), "value": b64(value)})
                conn.request(
                    "POST", "/v3/kv/put", body=body, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise TestbedError(f"etcd PUT {key}: HTTP {resp.status} {data[:200]!r}")
                n += 1
        finally:
            conn.close()
            sock.close()
        return n


class Cluster(NetnsLab):
    """A hub netns (bridge br0 198.18.0.254/24 + a real etcd) and N node namespaces.

    Node i lives in netns ``<prefix>-<pid>-<n>-n<i>`` with veth-n<i> 198.18.0.(i+1)/24 (MTU
    ``underlay_mtu``) bridged in the hub; ip_forward=1, IPv6 off, ICMP rate limit off (so
    unreachable probes are answered every time). Daemons run in etcd mode with
    :meth:`start_etcd_node`; their TUN address is their lease subnet's network address.
    ``close()`` ends every daemon and etcd by PID and deletes all namespaces and temp dirs.
    Methods taking a node accept its index (int) or netns key ("hub", "n0", ...).
    """

    def __init__(
        self,
        nodes: int = 3,
        prefix: str = "ubcl",
        underlay_mtu: int = 1500,
        workdir: str | os.PathLike[str] | None = None,
        start_etcd: bool = True,
        disable_ipv6: bool = True,
        etcd_prefix: str = ETCD_PREFIX,
    ) -> None:
        if not 0 <= nodes <= MAX_CLUSTER_NODES:
            raise ValueError(f"nodes must be 0..{MAX_CLUSTER_NODES}")
        self.underlay_mtu = underlay_mtu
        self.etcd_prefix = etcd_prefix.rstrip("/") or "/"
        self.nodes: dict[int, EtcdNode] = {}  # the latest daemon started per node index
        self.indices: list[int] = []
        self._disable_ipv6 = disable_ipv6
        super().__init__(prefix, workdir)
        try:
            self._build_hub()
            for i in range(nodes):
                self.add_node(i)
            self.etcd = HubEtcd(self)
            if start_etcd:
                self.etcd.start()
        except BaseException:
            self.close()
            raise

    # -- construction --

    def _key(self, node: str | int) -> str:
        return f"n{node}" if isinstance(node, int) else node

    def _build_hub(self) -> None:
        self.add_netns(HUB)
        self._prepare_netns(HUB, self._disable_ipv6, forward=False)
        with self.ipr(HUB) as ipr:
            ipr.link("add", ifname=BRIDGE_NAME, kind="bridge")
            idx = ipr.link_lookup(ifname=BRIDGE_NAME)[0]
            ipr.addr("add", index=idx, address=HUB_ADDR, prefixlen=UNDERLAY_PREFIX)
            ipr.link("set", index=idx, state="up")

    def add_node(self, i: int | None = None) -> int:
        """Create node i's netns joined to the hub bridge (default: the next free index)."""
        self._check_open()
        if i is None:
            i = max(self.indices, default=-1) + 1
        if not 0 <= i < MAX_CLUSTER_NODES:
            raise TestbedError(f"node index {i} outside 0..{MAX_CLUSTER_NODES - 1}")
        if i in self.indices:
            raise TestbedError(f"node n{i} exists already")
        key = self._key(i)
        self.add_netns(key)
        self.indices.append(i)
        self._prepare_netns(key, self._disable_ipv6)
        self.sysctl(key, "net.ipv4.icmp_ratelimit", "0")
        hub_if = f"vh-n{i}"
        self._add_veth(HUB, hub_if, key, self.veth(i))
        with self.ipr(HUB) as ipr:
            idx = ipr.link_lookup(ifname=hub_if)[0]
            br = ipr.link_lookup(ifname=BRIDGE_NAME)[0]
            ipr.link("set", index=idx, master=br, mtu=self.underlay_mtu)
            ipr.link("set", index=idx, state="up")
        self._address_iface(
            key, self.veth(i), self.underlay_addr(i), UNDERLAY_PREFIX, self.underlay_mtu
        )
        self._wait_oper_up([(HUB, hub_if), (key, self.veth(i))])
        return i

    # -- addressing --

    @staticmethod
    def underlay_addr(i: int) -> str:
        return f"198.18.0.{i + 1}"

    @staticmethod
    def veth(i: int) -> str:
        return f"veth-n{i}"

    def node_dir(self, i: int) -> Path:
        """Per-node directory (subnet.env, stats); kept across daemon restarts."""
        d = self.workdir / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def subnet_file(self, i: int) -> Path:
        return self.node_dir(i) / "subnet.env"

    def tun_addr(self, i: int) -> str:
        """Node i's flannel0 address (its lease subnet's network address)."""
        return self.node(i).tun_addr()

    def node(self, i: int) -> EtcdNode:
        try:
            return self.nodes[i]
        except KeyError:
            raise TestbedError(f"no daemon was started on node n{i}") from None

    def running(self) -> list[EtcdNode]:
        return [n for _, n in sorted(self.nodes.items()) if n.alive]

    # -- etcd --

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    def etcdctl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """`etcdctl <args>` in the hub against the cluster's etcd; stdout as text."""
        return self.etcd.etcdctl(*args, input=input, check=check)

    def put_config(
        self, config: str | Mapping[str, Any] | None = None, prefix: str | None = None
    ) -> str:
        """Write the network config (JSON text or a mapping) to ``<prefix>/config``."""
        if config is None:
            config = DEFAULT_NETWORK_CONFIG
        text = config if isinstance(config, str) else json.dumps(config, separators=(",", ":"))
        self.etcdctl("put", f"{(prefix or self.etcd_prefix).rstrip('/')}/config", text)
        return text

    def subnet_key(self, subnet: str, prefix: str | None = None) -> str:
        return subnet_key(subnet, prefix or self.etcd_prefix)

    def put_lease(self, subnet: str, public_ip: str, lease_id: str | None = None) -> str:
        """Write a flannel UDP lease value with etcdctl (no etcd lease unless lease_id)."""
        key = self.subnet_key(subnet)
        args = ["put", key, lease_value(public_ip)]
        if lease_id is not None:
            args.append(f"--lease={lease_id}")
        self.etcdctl(*args)
        return key

    def get_kvs(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        """``etcdctl get -w json``: [{"key", "value" (decoded text), "lease" (0 = none), ...}]."""
        args = ["get", key, "-w", "json"] + (["--prefix"] if prefix else [])
        doc = json.loads(self.etcdctl(*args))
        out = []
        for kv in doc.get("kvs", []):
            item = dict(kv)
            item["key"] = base64.b64decode(kv["key"]).decode()
            item["value"] = base64.b64decode(kv.get("value", "")).decode()
            item["lease"] = int(kv.get("lease", 0))
            out.append(item)
        return out

    def leases(self, prefix: str | None = None) -> dict[str, str]:
        """All subnet keys -> values under ``<prefix>/subnets``."""
        base = f"{(prefix or self.etcd_prefix).rstrip('/')}/subnets"
        return {kv["key"]: kv["value"] for kv in self.get_kvs(base, prefix=True)}

    # -- daemons --

    def start_etcd_node(
        self,
        i: int,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        mode: str = "batched",
        timeout: float = 30.0,
        healthz_port: int = HEALTHZ_PORT,
        endpoints_via_env: bool = False,
    ) -> EtcdNode:
        """Start ``python -m udpbackend run --etcd-endpoints ...`` in node i (created if new).

        env: extra environment on top of ours (inherited FLANNELD_* variables are dropped).
        endpoints_via_env: pass the endpoint as FLANNELD_ETCD_ENDPOINTS instead of the flag.
        wait_ready: wait until /readyz answers 200 (or, with healthz_port=0, the ready log line
        and flannel0 up). Raises DaemonError with the log tail if it dies or times out.
        """
        self._check_open()
        if i not in self.indices:
            self.add_node(i)
        prev = self.nodes.get(i)
        if prev is not None and prev.alive:
            raise TestbedError(f"node n{i} already runs a daemon (pid {prev.pid})")
        tag = f"n{i}-{next(_counter)}"
        stats_path = self.node_dir(i) / f"stats-{tag}.json"
        subnet_file = self.subnet_file(i)
        argv = [sys.executable, "-m", "udpbackend", "run"]
        if not endpoints_via_env:
            argv += ["--etcd-endpoints", self.etcd.endpoint]
        argv += ["--iface", self.veth(i), "--subnet-file", str(subnet_file), "--mode", mode]
        argv += ["--stats-file", str(stats_path)]
        if healthz_port:
            argv += ["--healthz-port", str(healthz_port), "--healthz-ip", self.underlay_addr(i)]
        argv += list(extra_args)
        penv = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        if endpoints_via_env:
            penv["FLANNELD_ETCD_ENDPOINTS"] = self.etcd.endpoint
        penv.update(env or {})
        spawned_at = time.time()
        proc, log_path = self._spawn_daemon(i, argv, tag, penv)
        handle = EtcdNode(
            self, i, mode, proc, log_path, stats_path, argv, subnet_file, healthz_port, spawned_at
        )
        self.nodes[i] = handle
        if wait_ready:
            self.wait_node_ready(handle, timeout)
        return handle

    def wait_node_ready(self, handle: EtcdNode, timeout: float = 30.0) -> float:
        """Wait for /readyz 200 (or ready line + TUN up without healthz); sets handle.ready_at."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            rc = handle.proc.poll()
            if rc is not None:
                handle.returncode = rc
                raise DaemonError(
                    f"daemon on node n{handle.index} exited with {rc} before it was ready\n"
                    f"argv: {' '.join(handle.argv)}\n--- log tail ---\n{handle.log_tail()}"
                )
            if handle.healthz_port:
                try:
                    status, body = handle.http_get("/readyz", timeout=1.0)
                    last = f"{status} {body.strip()!r}"
                except OSError as e:
                    status, last = 0, f"{e}"
                if status == 200:
                    break
            else:
                state = self.tun_state(handle.index, handle.tun_name)
                if state and state["up"] and READY_MARKER in handle.log_text():
                    break
                last = f"{handle.tun_name} {state}"
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"daemon on node n{handle.index} not ready after {timeout}s (last /readyz: "
                    f"{last})\nargv: {' '.join(handle.argv)}\n--- log tail ---\n"
                    f"{handle.log_tail()}"
                )
            time.sleep(0.01)
        handle.ready_at = time.time()
        return handle.ready_at - handle.spawned_at

    def stop_all(self, check: bool = False) -> dict[int, int]:
        """SIGTERM every running daemon; their exit codes by node index."""
        return {n.index: n.stop(check=check) for n in self.running()}

    def missing_peers(self, indices: Iterable[int] | None = None) -> dict[int, list[str]]:
        """For each running daemon: the other running daemons' subnets it does not route."""
        nodes = [self.nodes[i] for i in indices] if indices is not None else self.running()
        subnets = {n.index: (n.subnet(), n.public_ip) for n in nodes}
        missing: dict[int, list[str]] = {}
        for n in nodes:
            known = n.peers()
            gaps = [
                f"{s} via {ip}"
                for j, (s, ip) in subnets.items()
                if j != n.index and known.get(s) != ip
            ]
            if gaps:
                missing[n.index] = gaps
        return missing

    def wait_converged(self, timeout: float = 15.0, indices: Iterable[int] | None = None) -> float:
        """Wait until every running daemon routes every other one; returns the seconds waited."""
        idx = list(indices) if indices is not None else None
        start = time.monotonic()
        while True:
            missing = self.missing_peers(idx)
            if not missing:
                return time.monotonic() - start
            for n in self.running() if idx is None else [self.nodes[i] for i in idx]:
                if not n.alive:
                    raise DaemonError(f"daemon n{n.index} died\n{n.log_tail()}")
            if time.monotonic() - start > timeout:
                raise TestbedError(f"not converged after {timeout}s, missing routes: {missing}")
            time.sleep(0.05)

    # -- traffic --

    def ping_nodes(self, src: int, dst: int, count: int = 5, **kw: Any) -> PingResult:
        """Ping node dst's flannel0 address from node src (through the overlay)."""
        return self.ping(src, self.tun_addr(dst), count=count, **kw)

    def ping_all(
        self,
        count: int = 5,
        interval: float = 0.02,
        indices: Iterable[int] | None = None,
    ) -> dict[tuple[int, int], PingResult]:
        """Every ordered pair of (running) nodes pings the other's flannel0 address."""
        idx = list(indices) if indices is not None else [n.index for n in self.running()]
        return {
            (a, b): self.ping_nodes(a, b, count=count, interval=interval)
            for a in idx
            for b in idx
            if a != b
        }

    def iperf3(
        self, client: int, server: int, seconds: float = 3, extra: Sequence[str] = ()
    ) -> IperfResult:
        """iperf3 TCP from node client to node server's flannel0 address."""
        return self._iperf3(client, server, self.tun_addr(server), seconds, extra=extra)


@atexit.register
def _close_all() -> None:
    for tb in list(_live):
        with contextlib.suppress(Exception):
            tb.close()
