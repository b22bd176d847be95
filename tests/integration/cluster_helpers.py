"""Shared by the Cluster test files (etcd-mode daemons on a bridge): why they cannot run here,
and the teardown every one of them ends with.  Must not: hold fixtures (conftest.py does).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest


def cluster_missing() -> str | None:
    """Why a Cluster test cannot run here (the etcd binaries, iptables), or None."""
    from udpbackend.lab.etcdproc import etcd_missing_binaries

    missing = [f"{p} (apt-get install etcd-server etcd-client)" for p in etcd_missing_binaries()]
    if shutil.which("iptables") is None:
        missing.append("iptables")
    return ", ".join(missing) + " missing" if missing else None


def needs_cluster() -> pytest.MarkDecorator:
    """The module mark of a Cluster test file: skipped, saying why, where etcd is missing."""
    why = cluster_missing()
    return pytest.mark.skipif(why is not None, reason=str(why))


def stop_all_exit_zero(cl: Any) -> None:
    """SIGTERM every daemon still running; each must exit 0 (the log tail of those that
    do not is the failure message)."""
    errors = []
    for node in cl.running():
        rc = node.stop(check=False)
        if rc != 0:
            errors.append(f"n{node.index} exited {rc}\n{node.log_tail()}")
    assert not errors, "\n".join(errors)
