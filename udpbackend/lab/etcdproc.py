"""A real single-member etcd server as a process: EtcdProcess (and its TLS files, EtcdTls).

Lives here: starting etcd with fast-election flags and waiting until it is healthy, stop, kill,
pause and restart by PID (for outage tests), and etcdctl against it; where it runs (the
caller's namespace or a Cluster's hub) is injected. Stdlib only. Must not: know namespaces or
daemons (cluster.HubEtcd places it in the hub), or leave its process or temp dir behind.
"""

from __future__ import annotations

import contextlib
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
from typing import Self

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
        return log_tail(self.log_path, n)

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
