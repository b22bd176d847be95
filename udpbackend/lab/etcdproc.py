"""A real etcd server as a process: EtcdProcess (and its TLS files, EtcdTls), and a real
multi-member etcd made of such processes: EtcdCluster.

Lives here: starting etcd with fast-election flags and waiting until it is healthy, stop, kill,
pause and restart by PID (for outage tests), and etcdctl against it; for a multi-member cluster
also its --initial-cluster, its leader (``etcdctl endpoint status``) and etcdctl against the
members still running. Where it runs (the caller's namespace or a Cluster's hub) is injected.
Stdlib only. Must not: know namespaces or daemons (cluster.HubEtcd places it in the hub), or
leave its process or temp dir behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from .errors import TestbedError, log_tail

ETCD = os.environ.get("ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("ETCDCTL", shutil.which("etcdctl") or "/usr/bin/etcdctl")


def etcd_missing_binaries() -> list[str]:
    """The etcd / etcdctl executables ($ETCD / $ETCDCTL) that are not there."""
    return [p for p in (ETCD, ETCDCTL) if not (os.path.isfile(p) and os.access(p, os.X_OK))]


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
        self._free_port = free_port
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
        # Set by EtcdCluster for a member of a multi-member cluster (None: single member).
        self.initial_cluster: str | None = None  # "name=peer-url,name=peer-url,..."
        self.cluster_token: str | None = None
        self.heartbeat_ms = 10
        self.election_ms = 100

    # -- addresses --

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle --

    def argv(self) -> list[str]:
        peer = self.peer_url
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--log-level", "error",
            "--logger", "zap",
        ]  # fmt: skip
        if self.cluster_token:
            argv += ["--initial-cluster-token", self.cluster_token]
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.client_cert:
                argv += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        return argv

    def start(self, timeout: float = 15.0) -> Self:
        """Start (or start again, same ports and data) and wait until it serves requests."""
        if self.running():
            return self
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def launch(self) -> None:
        """Spawn the server without waiting for it (a member of a cluster that is not formed
        yet cannot answer a health check alone); wait_ready() then waits."""
        if self.running():
            return
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = self._spawn(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the launched server serves a health check (EtcdNotReady if it does not
        in time, TestbedError if it exited)."""
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
            _wait_stopped(self.proc.pid)

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
        return log_tail(self.log_path, n)

    # -- clients --

    def etcdctl_run(
        self,
        args: Sequence[str],
        timeout: float = 20.0,
        dial_timeout: str = "2s",
        command_timeout: str = "5s",
        input: bytes | None = None,
        endpoints: Sequence[str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`etcdctl <args>` (API v3) against this server (or ``endpoints``, e.g. the members
        of its cluster), run where the server lives."""
        argv = [
            ETCDCTL,
            f"--endpoints={','.join(endpoints) if endpoints else self.endpoint}",
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
        return _stdout(self.etcdctl_run(list(args), input=input), args, check)


class EtcdCluster:
    """A real multi-member etcd (plain http): EtcdProcess members bound by --initial-cluster.

    Each member has its own client and peer port (made distinct here) and data dir; they are
    launched together and then waited for (a member alone cannot answer a health check before
    a quorum exists). ``endpoint`` is flanneld's comma-separated --etcd-endpoints value.
    Members are killed and restarted one by one through the EtcdProcess API (``member.kill()``,
    ``member.restart()``); :meth:`leader` asks ``etcdctl endpoint status`` which one leads.
    etcdctl runs where the members live (member 0's ``run``) against the running members.
    ``cleanup()`` kills every member and removes their temp dirs.
    """

    def __init__(
        self,
        members: Sequence[EtcdProcess],
        token: str = "udpbackend-lab",
        heartbeat_ms: int = 10,
        election_ms: int = 100,
    ) -> None:
        if len(members) < 2:
            raise ValueError("an EtcdCluster needs two members or more (EtcdProcess is one)")
        if len({m.name for m in members}) != len(members):
            raise ValueError("member names must be distinct")
        if any(m.tls for m in members):
            raise ValueError("EtcdCluster members are plain http")
        self.members = list(members)
        self._distinct_ports()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial
            m.cluster_token = token
            m.heartbeat_ms = heartbeat_ms
            m.election_ms = election_ms

    def _distinct_ports(self) -> None:
        """Each member's free ports were picked alone: re-pick any that another one took."""
        taken: set[int] = set()  # one use per port number, whatever the address: never ambiguous
        for m in self.members:
            for attr, host in (("client_port", m.host), ("peer_port", "127.0.0.1")):
                port = getattr(m, attr)
                tries = 0
                while port in taken:
                    tries += 1
                    if tries > 50:
                        raise TestbedError("no distinct free ports for the etcd members")
                    port = m._free_port(host)
                setattr(m, attr, port)
                taken.add(port)

    # -- addresses --

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """flanneld's --etcd-endpoints value: every member, comma-separated."""
        return ",".join(self.endpoints)

    def running_members(self) -> list[EtcdProcess]:
        return [m for m in self.members if m.running()]

    def member(self, endpoint: str) -> EtcdProcess:
        for m in self.members:
            if m.endpoint == endpoint:
                return m
        raise TestbedError(f"no member serves {endpoint}")

    # -- lifecycle --

    def start(self, timeout: float = 20.0) -> Self:
        """Launch every member that is not running, then wait until each serves requests."""
        try:
            for m in self.members:
                m.launch()
            deadline = time.monotonic() + timeout
            for m in self.members:
                m.wait_ready(max(0.5, deadline - time.monotonic()))
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL every member (the whole cluster down at once)."""
        for m in self.members:
            m.kill()

    def cleanup(self) -> None:
        """Kill every member and remove the temp dirs.  Safe to call twice."""
        for m in self.members:
            m.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 10) -> str:
        return "\n".join(f"--- {m.name} ---\n{m.log_tail(n)}" for m in self.members)

    # -- clients --

    def etcdctl_run(
        self,
        args: Sequence[str],
        timeout: float = 20.0,
        dial_timeout: str = "2s",
        command_timeout: str = "5s",
        input: bytes | None = None,
        endpoints: Sequence[str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`etcdctl <args>` against ``endpoints`` (default: every running member)."""
        running = self.running_members()
        eps = list(endpoints) if endpoints else [m.endpoint for m in running]
        if not eps:
            raise TestbedError("no etcd member is running")
        via = running[0] if running else self.members[0]
        return via.etcdctl_run(
            args,
            timeout=timeout,
            dial_timeout=dial_timeout,
            command_timeout=command_timeout,
            input=input,
            endpoints=eps,
        )

    def etcdctl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run `etcdctl <args>` against the running members; stdout as text."""
        return _stdout(self.etcdctl_run(list(args), input=input), args, check)

    def status(self) -> list[dict[str, Any]]:
        """``etcdctl endpoint status -w json`` of every running member: one dict each with
        "endpoint", "member_id", "leader" (the member id it follows), "raft_term", "revision",
        "is_leader" and the "raw" JSON."""
        eps = [m.endpoint for m in self.running_members()]
        args = ["endpoint", "status", "-w", "json"]
        out = []
        for item in json.loads(_stdout(self.etcdctl_run(args, endpoints=eps), args) or "[]"):
            st = item.get("Status", {})
            header = st.get("header", {})
            member_id = int(header.get("member_id", 0))
            leader = int(st.get("leader", 0))
            out.append(
                {
                    "endpoint": item.get("Endpoint", ""),
                    "member_id": member_id,
                    "leader": leader,
                    "raft_term": int(st.get("raftTerm", header.get("raft_term", 0))),
                    "revision": int(header.get("revision", 0)),
                    "is_leader": member_id != 0 and member_id == leader,
                    "raw": item,
                }
            )
        return out

    def leader(self, timeout: float = 5.0) -> EtcdProcess:
        """The member that leads right now (by ``endpoint status``: its member id is the leader
        every running member reports); waits out an election in progress."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while True:
            with contextlib.suppress(TestbedError, json.JSONDecodeError):
                last = self.status()
                leaders = {s["leader"] for s in last}
                lead = [s for s in last if s["is_leader"]]
                if len(leaders) == 1 and len(lead) == 1:
                    return self.member(lead[0]["endpoint"])
            if time.monotonic() > deadline:
                raise TestbedError(f"no single etcd leader within {timeout}s: {last}")
            time.sleep(0.05)


def _stdout(
    res: subprocess.CompletedProcess[bytes], args: Sequence[str], check: bool = True
) -> str:
    """An etcdctl run's stdout as text; check: TestbedError (with its stderr) if it failed."""
    if check and res.returncode != 0:
        err = res.stderr.decode(errors="replace")
        raise TestbedError(f"etcdctl {' '.join(args)} -> {res.returncode}: {err}")
    return res.stdout.decode(errors="replace")


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of pid is stopped: SIGSTOP is delivered asynchronously, and a busy
    machine may let a Go server answer one more request after kill() returned."""
    deadline = time.monotonic() + timeout
    task_dir = f"/proc/{pid}/task"
    while time.monotonic() < deadline:
        try:
            states = []
            for tid in os.listdir(task_dir):
                with open(f"{task_dir}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # it is gone: nothing answers either
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.002)
