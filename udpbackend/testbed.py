# Two-node network-namespace testbed shared by the integration tests, the demo and the benchmarks:
# netns A and B joined by a veth pair, helpers to run processes/daemons inside them, ping/iperf3.
# Stdlib + pyroute2 only: it must NOT import other udpbackend modules (it drives the daemon as a
# subprocess). Every address lives in 198.18.0.0/15; everything created here is removed by close().
"""Two network namespaces joined by a veth pair, plus helpers to drive udpbackend daemons.

Topology (all inside namespaces this object creates and removes)::

    netns A                                              netns B
    flannel0 198.19.1.0/32 (daemon)                      flannel0 198.19.2.0/32 (daemon)
    veth-a 198.18.0.1/24  <------------ veth ----------> veth-b 198.18.0.2/24
    vxlan0 198.18.100.1/24 (optional, kernel VXLAN)      vxlan0 198.18.100.2/24

Typical use::

    with Testbed() as tb:
        a = tb.start_node("a")
        b = tb.start_node("b")
        print(tb.ping("a", tb.tun_addr("b")).avg_ms)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
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
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2 import config as _pyroute2_config

# pyroute2 forks short-lived helper children (netns sockets) and SIGTERMs them when done. With a
# Python SIGTERM handler installed (the demo and the benchmark have one), such a child would run
# that handler and unwind *our* stack; reset SIGTERM to the default in those children.
_pyroute2_config.disable_mp_signal = True

__all__ = [
    "NODES",
    "OVERLAY_NETWORK",
    "TUN_NAME",
    "UDP_PORT",
    "VXLAN_PORT",
    "DaemonError",
    "IperfResult",
    "Node",
    "PingResult",
    "Testbed",
    "TestbedError",
    "missing_requirements",
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

READY_MARKER = "udpbackend: ready"
REPO_ROOT = Path(__file__).resolve().parent.parent

_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_counter = itertools.count(1)
_live: weakref.WeakSet[Testbed] = weakref.WeakSet()
_ns_switch = threading.RLock()  # pyroute2's pushns/popns keep one process-global stack
_libc: Any = None


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


# --- Daemon handle ----------------------------------------------------------------------------


class Node:
    """A udpbackend daemon started by :meth:`Testbed.start_node` inside one namespace."""

    def __init__(
        self,
        testbed: Testbed,
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

    def __repr__(self) -> str:
        return f"<Node {self.node} mode={self.mode} pid={self.pid} alive={self.alive}>"


# --- The testbed ------------------------------------------------------------------------------


class Testbed:
    """Two network namespaces (nodes "a" and "b") joined by a veth pair.

    Creates: netns ``<prefix>-<pid>-<n>-a`` / ``-b``, veth-a 198.18.0.1/24 <-> veth-b 198.18.0.2/24
    (MTU ``underlay_mtu``), lo up, ip_forward=1, IPv6 off (no router-solicitation noise on TUNs).
    ``close()`` (also on context exit, constructor failure and interpreter exit) ends every process
    started through this object by PID and deletes both namespaces, which removes the veth,
    VXLAN and TUN devices with them.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        underlay_mtu: int = 1500,
        prefix: str = "ubtb",
        disable_ipv6: bool = True,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.underlay_mtu = underlay_mtu
        self.ns: dict[str, str] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._vxlan = False
        self._ns_inodes: set[tuple[int, int]] = set()
        self._own_workdir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="udpbackend-testbed-") if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ip_bin = shutil.which("ip")
        # Forked children (pyroute2 helpers, preexec) must never tear down the owner's testbed.
        self._owner_pid = os.getpid()
        uniq = f"{os.getpid()}-{next(_counter)}"
        names = {n: f"{prefix}-{uniq}-{n}" for n in NODES}
        _live.add(self)
        try:
            self._build(names, disable_ipv6)
        except BaseException:
            self.close()
            raise

    # -- construction --

    def _build(self, names: Mapping[str, str], disable_ipv6: bool) -> None:
        for node, name in names.items():
            if name in netns.listnetns():
                raise TestbedError(f"netns {name} already exists (refusing to reuse it)")
            netns.create(name)
            self.ns[node] = name
            st = os.stat(f"/var/run/netns/{name}")
            self._ns_inodes.add((st.st_dev, st.st_ino))
        for node in NODES:
            self.sysctl(node, "net.ipv4.ip_forward", "1")
            if disable_ipv6 and os.path.exists("/proc/sys/net/ipv6"):
                self.sysctl(node, "net.ipv6.conf.all.disable_ipv6", "1")
                self.sysctl(node, "net.ipv6.conf.default.disable_ipv6", "1")
        # Create the pair inside A (no name clash with anything in the root netns), move one end.
        with self.ipr("a") as ipr:
            ipr.link("add", ifname=VETH_NAME["a"], kind="veth", peer=VETH_NAME["b"])
            idx_b = ipr.link_lookup(ifname=VETH_NAME["b"])[0]
            ipr.link("set", index=idx_b, net_ns_fd=self.ns["b"])
        for node in NODES:
            with self.ipr(node) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                idx = ipr.link_lookup(ifname=VETH_NAME[node])[0]
                ipr.link("set", index=idx, mtu=self.underlay_mtu)
                ipr.addr("add", index=idx, address=UNDERLAY_ADDR[node], prefixlen=UNDERLAY_PREFIX)
                ipr.link("set", index=idx, state="up")
        self._wait_link_up()

    def _wait_link_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for node in NODES:
            with self.ipr(node) as ipr:
                while True:
                    link = ipr.get_links(ipr.link_lookup(ifname=VETH_NAME[node])[0])[0]
                    if link.get_attr("IFLA_OPERSTATE") == "UP":
                        break
                    if time.monotonic() > deadline:
                        raise TestbedError(f"{VETH_NAME[node]} in {self.ns[node]} never came up")
                    time.sleep(0.01)

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

    def _check_open(self) -> None:
        if self._closed:
            raise TestbedError("testbed is closed")

    def ipr(self, node: str) -> IPRoute:
        """A fresh IPRoute bound to the node's netns (use as a context manager).

        flags=0: never (re)create a namespace by accident.
        """
        self._check_open()
        return IPRoute(netns=self.ns[node], flags=0, groups=0)

    @contextlib.contextmanager
    def in_netns(self, node: str) -> Iterator[None]:
        """Switch the *calling thread* into the node's netns for the block (then switch back).

        Sockets created inside stay in that namespace after the block.
        """
        self._check_open()
        with _ns_switch:
            netns.pushns()
            try:
                netns.setns(self.ns[node], flags=0)
                yield
            finally:
                netns.popns()

    def socket(self, node: str, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket living in the node's netns."""
        with self.in_netns(node):
            return socket.socket(family, type, proto)

    def sysctl(self, node: str, key: str, value: str) -> None:
        """Write a sysctl via /proc/sys inside the node's netns (net.* keys are per-netns)."""
        path = "/proc/sys/" + key.replace(".", "/")
        with self.in_netns(node), open(path, "w") as f:
            f.write(value)

    def read_sysctl(self, node: str, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        with self.in_netns(node), open(path) as f:
            return f.read().strip()

    def link_names(self, node: str) -> list[str]:
        with self.ipr(node) as ipr:
            return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]

    def tun_state(self, node: str, name: str = TUN_NAME) -> dict[str, Any] | None:
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

    def _netns_argv(self, node: str, argv: Sequence[str]) -> tuple[list[str], Any]:
        if self._ip_bin:
            # `ip netns exec` execs the command (Popen.pid is the tool's own PID) and gives it a
            # /sys matching the namespace. It is used only to *run* processes, never to configure.
            return [self._ip_bin, "netns", "exec", self.ns[node], *argv], None
        name = self.ns[node]

        def enter() -> None:
            netns.setns(name, flags=0)

        return list(argv), enter

    def spawn(
        self,
        node: str,
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
        node: str,
        argv: Sequence[str],
        timeout: float = 30.0,
        check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv to completion inside the node's netns (killed after `timeout` seconds)."""
        proc = self.spawn(
            node,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
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
        log_path = self.workdir / f"daemon-{tag}.log"
        stats_path = self.workdir / f"stats-{tag}.json"
        argv = self.daemon_argv(node, mode, peers, peers_file, stats_path, extra_args)
        penv = dict(os.environ if env is None else env)
        penv["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), penv.get("PYTHONPATH", "")) if p
        )
        penv.setdefault("PYTHONUNBUFFERED", "1")
        log = open(log_path, "wb")  # noqa: SIM115 - closed by close()
        self._files.append(log)
        proc = self.spawn(node, argv, stdout=log, stderr=subprocess.STDOUT, env=penv)
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

    def ping(
        self,
        node: str,
        dst: str,
        count: int = 10,
        interval: float = 0.02,
        size: int = 56,
        timeout: float | None = None,
        extra: Sequence[str] = (),
    ) -> PingResult:
        """Ping dst from node; returns per-reply RTTs. Bounded by -w (deadline) and `timeout`."""
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
        res = self.run(node, argv, timeout=timeout or deadline + 10)
        out = res.stdout.decode(errors="replace")
        rtts = [float(m.group(1)) for m in re.finditer(r"time[=<]([0-9.]+) ?ms", out)]
        return PingResult(dst=dst, sent=count, rtts_ms=rtts, output=out)

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
        secs = max(1, round(seconds))
        server_node = self.other(client)
        if dst is None:
            dst = TUN_ADDR[server_node]
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

    def iperf3_supports_zerocopy(self) -> bool:
        """True if `iperf3 -Z` works here (probed once over the underlay)."""
        try:
            res = self.iperf3("a", UNDERLAY_ADDR["b"], seconds=1, zerocopy=True)
        except TestbedError:
            return False
        return res.bytes > 0

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
        """End every tracked process by PID, delete both namespaces, remove the workdir.

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
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _live.discard(self)
        if errors:
            raise TestbedError("testbed cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self.close()


@atexit.register
def _close_all() -> None:
    for tb in list(_live):
        with contextlib.suppress(Exception):
            tb.close()
