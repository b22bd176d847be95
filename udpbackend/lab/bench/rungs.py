"""The rungs of the ladder: what each one sets up in the Testbed, and the ladder's order.

Adding a rung: append ``Rung(name, label, setup)`` to RUNGS, where ``setup(tb)`` is a context
manager that yields a RungEnv (the address to measure against, the daemons to read counters
from) and undoes its set-up on exit; :func:`daemon_rung` builds one for a daemon mode + flags.
Must not: measure (measure.py does, the same way on every rung).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..addressing import TUN_ADDR, UNDERLAY_ADDR, VXLAN_ADDR
from ..errors import TestbedError
from .settings import BenchError

if TYPE_CHECKING:
    from ..daemons import Node
    from ..testbed import Testbed


@dataclass
class RungEnv:
    dst: str  # address in node b that node a measures against
    nodes: list[Node] = field(default_factory=list)  # daemons whose counters are read


RungSetup = Callable[["Testbed"], contextlib.AbstractContextManager[RungEnv]]


@dataclass(frozen=True)
class Rung:
    name: str
    label: str
    setup: RungSetup
    kind: str = "daemon"  # "kernel": no udpbackend daemon, no counters
    default: bool = True  # part of the ladder when --rungs is not given


@contextlib.contextmanager
def _veth(tb: Testbed) -> Iterator[RungEnv]:
    yield RungEnv(UNDERLAY_ADDR["b"])


@contextlib.contextmanager
def _vxlan(tb: Testbed) -> Iterator[RungEnv]:
    tb.add_vxlan()
    try:
        yield RungEnv(VXLAN_ADDR["b"])
    finally:
        if not tb.closed:
            tb.del_vxlan()


def daemon_rung(
    name: str,
    label: str,
    mode: str,
    extra_args: Sequence[str] = (),
    peers_file: Callable[[Testbed], Path] | None = None,
    default: bool = True,
) -> Rung:
    """A rung of two udpbackend daemons (``run --mode MODE EXTRA_ARGS``) across the veth."""

    @contextlib.contextmanager
    def setup(tb: Testbed) -> Iterator[RungEnv]:
        nodes: list[Node] = []
        pf = peers_file(tb) if peers_file else None
        try:
            for n in ("a", "b"):
                nodes.append(
                    tb.start_node(n, mode, extra_args=list(extra_args), peers_file=pf, timeout=60)
                )
            yield RungEnv(TUN_ADDR["b"], nodes)
        finally:
            errors = []
            for node in nodes:
                try:
                    node.stop(timeout=15, check=True)
                except TestbedError as e:
                    errors.append(f"{node.node}: {str(e).splitlines()[0]}")
            if errors and sys.exc_info()[0] is None:
                raise TestbedError("daemon exit: " + "; ".join(errors))

    return Rung(name, label, setup, "daemon", default)


def _peers_10k(tb: Testbed) -> Path:
    """10,000 dummy /30 routes to a peer nobody is (route-table size does not change speed)."""
    path = tb.workdir / "peers-10k.txt"
    base = int(ipaddress.IPv4Address("198.19.64.0"))  # clear of 198.19.1.0/24 and .2.0/24
    lines = [f"{ipaddress.IPv4Network((base + 4 * i, 30))}=198.18.0.3" for i in range(10_000)]
    path.write_text("\n".join(lines) + "\n")
    return path


ONE_QUEUE = ("--queues", "1")  # each rung below "multiqueue" adds one thing to the one before

RUNGS: tuple[Rung, ...] = (
    Rung("veth", "veth, no overlay (ceiling)", _veth, "kernel"),
    Rung("vxlan", "kernel VXLAN (VNI 1, port 8472, MTU 1450)", _vxlan, "kernel"),
    daemon_rung("python", "udpbackend python", "python", ONE_QUEUE),
    # flannel's own proxy reads and sends one packet a syscall from a C poll loop: that is
    # the baseline a user moving off flannel's UDP backend compares with
    daemon_rung(
        "flannel-proxy",
        "flannel's proxy loop (per-packet C, C poll loop)",
        "per-packet",
        [*ONE_QUEUE, "--driver", "c"],
    ),
    daemon_rung("per-packet", "udpbackend per-packet C", "per-packet", ONE_QUEUE),
    daemon_rung(
        "batched-nooffload",
        "udpbackend batched, --offload off",
        "batched",
        [*ONE_QUEUE, "--offload", "off"],
    ),
    daemon_rung("batched", "udpbackend batched (offload auto)", "batched", ONE_QUEUE),
    daemon_rung(
        "multiqueue",
        "udpbackend batched, --queues auto (the default)",
        "batched",
        ["--queues", "auto"],
    ),
    daemon_rung(
        "multiqueue-rt",
        "udpbackend batched, --queues auto --rt-priority 1",
        "batched",
        ["--queues", "auto", "--rt-priority", "1"],
    ),
    daemon_rung(
        "batched-cdriver",
        "udpbackend batched, C-driven loop (--driver c)",
        "batched",
        [*ONE_QUEUE, "--driver", "c"],
        default=False,
    ),
    daemon_rung(
        "batched-10k",
        "udpbackend batched + 10k routes",
        "batched",
        ONE_QUEUE,
        peers_file=_peers_10k,
        default=False,
    ),
    # the same without the ingress source check: what --peer-check strict costs at 10k peers
    daemon_rung(
        "batched-10k-nocheck",
        "udpbackend batched + 10k routes, --peer-check off",
        "batched",
        [*ONE_QUEUE, "--peer-check", "off"],
        peers_file=_peers_10k,
        default=False,
    ),
)
RUNG_BY_NAME = {r.name: r for r in RUNGS}
DEFAULT_RUNGS = tuple(r.name for r in RUNGS if r.default)


def parse_rungs(text: str) -> list[str]:
    """`--rungs a,b` -> names in ladder order; BenchError names the unknown ones."""
    want = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]
    unknown = [t for t in want if t not in RUNG_BY_NAME]
    if unknown:
        raise BenchError(
            f"--rungs: unknown rung {', '.join(unknown)} (known: {', '.join(RUNG_BY_NAME)})"
        )
    if not want:
        raise BenchError("--rungs: no rung given")
    return [r.name for r in RUNGS if r.name in want]
