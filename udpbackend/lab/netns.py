"""NetnsLab: network namespaces and the processes in them, owned by one object and removed again.

Lives here: creating namespaces (registered for removal the moment they exist), veth pairs,
addresses, sockets and sysctls inside a namespace, starting and ending processes there by PID
(daemons, ping, iperf3, HTTP and UDP probes), and the teardown that runs on close, on failure,
on Ctrl-C and at interpreter exit. Must not: know a topology (Testbed and Cluster build theirs)
or import the planes: daemons are subprocesses (`python -m udpbackend run`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pyroute2 import IPRoute, netns
from pyroute2 import config as _pyroute2_config

from .addressing import IPERF_PORT, TUN_NAME
from .errors import TestbedError
from .tools import (
    IperfResult,
    PingResult,
    iperf3_client_argv,
    iperf3_client_timeout,
    parse_iperf3,
    parse_ping,
    ping_argv,
    wait_listen,
)

# pyroute2 forks short-lived helper children (netns sockets) and SIGTERMs them when done. With a
# Python SIGTERM handler installed (the demo and the benchmark have one), such a child would run
# that handler and unwind *our* stack; reset SIGTERM to the default in those children.
_pyroute2_config.disable_mp_signal = True

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding the udpbackend package

_IFF_UP = 0x1
_PR_SET_PDEATHSIG = 1
_IP_RECVERR = 11  # <linux/in.h>; not exported by the socket module
_counter = itertools.count(1)
_live: weakref.WeakSet[NetnsLab] = weakref.WeakSet()
_ns_switch = threading.RLock()  # pyroute2's pushns/popns keep one process-global stack
_libc: Any = None


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


def next_tag() -> int:
    """A number unique in this process: tags for namespaces, daemon logs and stats files."""
    return next(_counter)


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def _daemon_env(env: Mapping[str, str]) -> dict[str, str]:
    """env with the repo on PYTHONPATH (the daemon runs as `python -m udpbackend`)."""
    penv = dict(env)
    penv["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), penv.get("PYTHONPATH", "")) if p
    )
    penv.setdefault("PYTHONUNBUFFERED", "1")
    return penv


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
        self._uniq = f"{os.getpid()}-{next_tag()}"
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

    def remove_netns(self, key: str) -> None:
        """Delete one namespace made by :meth:`add_netns` before close(): what still runs in it
        is ended by PID, its devices go with it, and the lab forgets it."""
        self._check_open()
        name = self.ns[key]
        try:
            st = os.stat(f"/var/run/netns/{name}")
            inode = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        if inode is not None:
            self._sweep_namespace_pids({inode})
        if name in netns.listnetns():
            netns.remove(name)
        del self.ns[key]
        if inode is not None:
            self._ns_inodes.discard(inode)

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
        argv, deadline = ping_argv(dst, count, interval, size, extra)
        res = self.run(node, argv, timeout=timeout or deadline + 10)
        return parse_ping(dst, count, res.stdout.decode(errors="replace"))

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
        argv, deadline = ping_argv(dst, count, interval, size, extra)
        proc = self.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def result(timeout: float = deadline + 10) -> PingResult:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            finally:
                self._forget(proc)
            return parse_ping(dst, count, out.decode(errors="replace"))

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
        """One iperf3 run: `iperf3 -s -1` in server_node, `iperf3 -c dst -J` in client.

        Raises IperfSetupError if the client's test never started (e.g. the datagram that sets
        up a UDP stream was lost), TestbedError if it failed otherwise."""
        secs = max(1, round(seconds))
        server = self.spawn(
            server_node,
            ["iperf3", "-s", "-1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_listen(server, port)
            argv = iperf3_client_argv(dst, port, secs, zerocopy, extra)
            res = self.run(client, argv, timeout=iperf3_client_timeout(secs))
            return parse_iperf3(res, dst, zerocopy)
        finally:
            self._end(server, grace=2.0)
            self._forget(server)

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

    def _sweep_namespace_pids(self, inodes: set[tuple[int, int]] | None = None) -> None:
        """End leftovers we started indirectly (e.g. a daemon's child) still inside our netns
        (or only inside the namespaces ``inodes`` names)."""
        inodes = self._ns_inodes if inodes is None else inodes
        if not inodes:
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
            if (st.st_dev, st.st_ino) in inodes:
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


@atexit.register
def _close_all() -> None:
    for tb in list(_live):
        with contextlib.suppress(Exception):
            tb.close()
