# A real etcd for integration tests: /usr/bin/etcd (or $ETCD) on free 127.0.0.1 ports with a
# throwaway data dir (tmpfs when available), fast-election flags, optional TLS with client-cert
# auth; stop/kill/restart on the SAME ports and data dir for outage tests; an etcdctl helper; and
# a throwaway openssl PKI.  The process manager itself is udpbackend.lab.testbed.EtcdProcess (shared
# with the Cluster's hub etcd); this file adds the root-namespace spawn that dies with the test,
# the PKI, and cleanup at exit.  Must not: touch any etcd it did not start (processes by PID only).
from __future__ import annotations

import atexit
import contextlib
import ctypes
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udpbackend.lab.etcdproc import ETCD, ETCDCTL, EtcdProcess, EtcdTls, etcd_missing_binaries
from udpbackend.lab.etcdproc import free_tcp_port as free_port

__all__ = ["ETCD", "ETCDCTL", "EtcdServer", "Pki", "free_port", "make_pki", "unavailable_reason"]

_LIVE: set[EtcdServer] = set()  # not cleaned up yet: cleaned at interpreter exit


def unavailable_reason() -> str | None:
    """Why the etcd tests cannot run here (a missing binary), or None."""
    missing = etcd_missing_binaries()
    return f"{missing[0]} not found (apt-get install etcd-server etcd-client)" if missing else None


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


class EtcdServer(EtcdProcess):
    """One single-member etcd on 127.0.0.1.  start() waits until it serves a linearizable read.

    pki: https with the PKI's server certificate; client_cert_auth: also require (and give
    etcdctl) the PKI's client certificate.  Set ``user`` ("name:password") once auth is enabled.
    """

    def __init__(self, pki: Pki | None = None, client_cert_auth: bool = False) -> None:
        if client_cert_auth and pki is None:
            raise ValueError("client_cert_auth needs a pki")
        self.pki = pki
        self.client_cert_auth = client_cert_auth
        tls = None
        if pki is not None:
            client = (pki.client_cert, pki.client_key) if client_cert_auth else (None, None)
            tls = EtcdTls(pki.ca, pki.server_cert, pki.server_key, *client)
        super().__init__(_spawn, name="t", tls=tls)
        _LIVE.add(self)

    def cleanup(self) -> None:
        """Stop the process (if any) and remove the data dir.  Safe to call twice."""
        try:
            super().cleanup()
        finally:
            _LIVE.discard(self)


def _spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a ^C to pytest does not hit etcd; cleanup() does
        preexec_fn=_die_with_parent,
        **kw,
    )


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the test process dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.cleanup()
