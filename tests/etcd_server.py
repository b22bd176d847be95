# A real etcd for integration tests: /usr/bin/etcd (or $ETCD) on free 127.0.0.1 ports with a
# throwaway data dir (tmpfs when available), fast-election flags, optional TLS with client-cert
# auth; stop/kill/restart on the SAME ports and data dir for outage tests; an etcdctl helper; and
# a throwaway openssl PKI.  Must not: touch any etcd it did not start (processes by PID only).
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ETCD = os.environ.get("ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("ETCDCTL", shutil.which("etcdctl") or "/usr/bin/etcdctl")

_RUNNING: set[EtcdServer] = set()


def unavailable_reason() -> str | None:
    """Why the etcd tests cannot run here (a missing binary), or None."""
    for path in (ETCD, ETCDCTL):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install etcd-server etcd-client)"
    return None


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (also used as a 'dead endpoint')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with one server (SAN IP:127.0.0.1) and one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: "wrong trust root"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_pki(directory: Path) -> Pki:
    """EC P-256 keys, valid one day; made with the openssl CLI."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def ca(name: str) -> tuple[Path, Path]:
        cert, key = d / f"{name}.pem", d / f"{name}-key.pem"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}",
        )  # fmt: skip
        return cert, key

    def leaf(name: str, ca_cert: Path, ca_key: Path, ext: str) -> tuple[Path, Path]:
        cert, key, csr, extfile = (d / f"{name}{s}" for s in (".pem", "-key.pem", ".csr", ".ext"))
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        )  # fmt: skip
        extfile.write_text(ext)
        _openssl(
            "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "1", "-extfile", extfile,
        )  # fmt: skip
        return cert, key

    ca_cert, ca_key = ca("test-ca")
    other_ca, _ = ca("other-ca")
    server_cert, server_key = leaf(
        "server",
        ca_cert,
        ca_key,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    client_cert, client_key = leaf(
        "client",
        ca_cert,
        ca_key,
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key, other_ca)


class EtcdServer:
    """One single-member etcd.  start() waits until it serves a linearizable read."""

    def __init__(self, pki: Pki | None = None, client_cert_auth: bool = False) -> None:
        if client_cert_auth and pki is None:
            raise ValueError("client_cert_auth needs a pki")
        self.pki = pki
        self.client_cert_auth = client_cert_auth
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmpdir = Path(tempfile.mkdtemp(prefix="udpbackend-etcd-", dir=base))
        self.data_dir = self.tmpdir / "data"
        self.log_path = self.tmpdir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = None  # "name:password" for etcdctl once auth is enabled
        self.starts = 0

    # -- addresses ---------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name", "t",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t={peer}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--log-level", "error",
            "--logger", "zap",
        ]  # fmt: skip
        if self.pki:
            argv += ["--cert-file", str(self.pki.server_cert)]
            argv += ["--key-file", str(self.pki.server_key)]
            if self.client_cert_auth:
                argv += ["--client-cert-auth", "--trusted-ca-file", str(self.pki.ca)]
        return argv

    def start(self, timeout: float = 15.0) -> EtcdServer:
        if self.running():
            return self
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C to pytest does not hit etcd; cleanup() does
                preexec_fn=_die_with_parent,
            )
        _RUNNING.add(self)
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
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not ready after {timeout}s:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            res = self._etcdctl_run(
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
        self.proc = None
        _RUNNING.discard(self)

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

    def restart(self, timeout: float = 15.0) -> EtcdServer:
        """Start again on the same ports with the same data (after stop() or kill())."""
        if self.running():
            self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop the process (if any) and remove the data dir.  Safe to call twice."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- etcdctl -----------------------------------------------------------------------------
    def _etcdctl_run(
        self,
        args: list[str],
        timeout: float = 20.0,
        dial_timeout: str = "2s",
        command_timeout: str = "5s",
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [
            ETCDCTL,
            f"--endpoints={self.endpoint}",
            f"--dial-timeout={dial_timeout}",
            f"--command-timeout={command_timeout}",
        ]
        if self.user:
            argv.append(f"--user={self.user}")
        if self.pki:
            argv.append(f"--cacert={self.pki.ca}")
            if self.client_cert_auth:
                argv += [f"--cert={self.pki.client_cert}", f"--key={self.pki.client_key}"]
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            argv + args, input=input, capture_output=True, timeout=timeout, env=env
        )

    def etcdctl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run `etcdctl <args>` against this server (API v3); stdout as text."""
        res = self._etcdctl_run(list(args), input=input)
        if check and res.returncode != 0:
            err = res.stderr.decode(errors="replace")
            raise RuntimeError(f"etcdctl {' '.join(args)} -> {res.returncode}: {err}")
        return res.stdout.decode(errors="replace")


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the test process dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        server.cleanup()
