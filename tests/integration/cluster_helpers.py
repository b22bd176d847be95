"""Shared by the Cluster test files (etcd-mode daemons on a bridge): why they cannot run here,
the module cluster they build (started, converged, ended with every daemon exiting 0) and how
they bring its nodes back between tests.  Must not: hold fixtures (conftest.py does).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
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


@contextlib.contextmanager
def running_cluster(
    indices: Sequence[int], prefix: str, config: Any, extra_args: Sequence[str] = ()
) -> Iterator[Any]:
    """A Cluster with config in etcd and a daemon (extra_args) on each node of indices, all
    routing to each other; on exit every daemon still running must exit 0, then close()."""
    from udpbackend.lab.cluster import Cluster

    cl = Cluster(nodes=len(indices), prefix=prefix)
    try:
        cl.put_config(config)
        for i in indices:
            cl.start_etcd_node(i, extra_args=extra_args)
        cl.wait_converged()
        yield cl
        stop_all_exit_zero(cl)
    finally:
        cl.close()


def revive(cl: Any, indices: Sequence[int], extra_args: Sequence[str] = ()) -> None:
    """Start again the daemon of each node of indices that a test stopped or killed."""
    for i in indices:
        if not cl.nodes[i].alive:
            cl.start_etcd_node(i, extra_args=extra_args)
