"""`udpbackend demo`: a real etcd and N nodes in throw-away network namespaces, like flannel.

Lives here: run_demo() and its friendly output. It starts etcd in a hub namespace, writes the
network config, starts `udpbackend run --etcd-endpoints ...` in each node namespace, waits until
every node routes to every other, then shows the leases, all-pairs ping and one iperf3 run. It
drives the daemon only as a subprocess through udpbackend.lab.cluster, so it must not import the
data plane (or anything outside the lab). Everything it creates is removed on success, on error
and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .addressing import BRIDGE_NAME, HUB, HUB_ADDR, UDP_PORT
from .cluster import DEFAULT_NETWORK_CONFIG, ETCD_PREFIX, Cluster, cluster_missing_requirements
from .errors import DaemonError, TestbedError
from .tools import PingResult

PING_COUNT = 10
NS_PREFIX = "ubdemo"
MAX_NODES = 20

Say = Callable[[str], None]


def _fmt_ping(label: str, res: PingResult) -> str:
    if not res.received:
        return f"  {label}  {res.received}/{res.sent} replies"
    return (
        f"  {label}  {res.received}/{res.sent} replies  "
        f"p50 {res.p50_ms:.3f} ms  avg {res.avg_ms:.3f} ms"
    )


def _by_subnet(item: tuple[str, str]) -> tuple[int, str]:
    """Sort key for (subnet key, value): numerically by the subnet in the key."""
    addr = item[0].rsplit("/", 1)[-1].split("-", 1)[0]
    try:
        return int(ipaddress.IPv4Address(addr)), item[0]
    except ValueError:
        return -1, item[0]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the demo runs, so cleanup happens either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper child: just die, never unwind our stack
            os._exit(128 + signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_demo(
    mode: str = "batched", seconds: float = 3.0, nodes: int = 3, out: TextIO | None = None
) -> int:
    """Build etcd + `nodes` node namespaces, run a daemon in each, show leases, ping and
    iperf3, then remove it all.

    Returns 0 on success, 1 on failure, 2 for a bad node count, 130 on Ctrl-C (nothing is left
    behind in any case).
    """
    out = sys.stdout if out is None else out

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    if not 2 <= nodes <= MAX_NODES:
        say(f"udpbackend demo: --nodes must be 2..{MAX_NODES}")
        return 2
    missing = cluster_missing_requirements()
    if missing:
        say(f"udpbackend demo needs {', '.join(missing)}; missing here")
        return 1
    try:
        with _sigterm_as_interrupt(), Cluster(nodes=nodes, prefix=NS_PREFIX) as cl:
            return _demo(cl, mode, seconds, nodes, say)
    except KeyboardInterrupt:
        say("\ninterrupted: daemons and etcd stopped, namespaces removed")
        return 130
    except (TestbedError, OSError) as e:
        say(f"demo failed: {e}")
        say("(daemons and etcd stopped, namespaces removed)")
        return 1


def _demo(cl: Cluster, mode: str, seconds: float, count: int, say: Say) -> int:
    say(f"udpbackend demo, mode {mode}: a real etcd and {count} nodes in network namespaces")
    say(
        f"  hub  netns {cl.ns_name(HUB)}  bridge {BRIDGE_NAME} {HUB_ADDR}/24, "
        f"etcd at {cl.etcd_endpoint}"
    )
    config = cl.put_config(DEFAULT_NETWORK_CONFIG)
    say(f"  network config {ETCD_PREFIX}/config = {config}")

    say(f"starting {count} nodes (udpbackend run --etcd-endpoints {cl.etcd_endpoint}) ...")
    for i in range(count):
        node = cl.start_etcd_node(i, mode=mode)
        ready = (node.ready_at or time.time()) - node.spawned_at
        say(
            f"  n{i}  {cl.underlay_addr(i)} ({cl.veth(i)}, netns {cl.ns_name(i)})  "
            f"lease {node.subnet()}  ready in {ready:.1f} s"
        )
    waited = cl.wait_converged()
    say(f"converged: every node routes to every other ({waited:.1f} s after the last was ready)")

    say(f"leases in etcd (etcdctl get --prefix {ETCD_PREFIX}/subnets):")
    for key, value in sorted(cl.leases().items(), key=_by_subnet):
        say(f"  {key}  {value}")

    say(f"ping over the overlay, every pair ({PING_COUNT} each, UDP port {UDP_PORT}):")
    ok = True
    for (a, b), res in cl.ping_all(count=PING_COUNT, interval=0.01).items():
        ok &= res.received == res.sent
        say(_fmt_ping(f"n{a} {cl.tun_addr(a):<13} -> n{b} {cl.tun_addr(b):<13}", res))

    secs = max(1, round(seconds))
    ip = cl.iperf3(0, 1, seconds=secs)
    say(
        f"TCP throughput n0 -> n1 over the overlay (iperf3, {secs} s): "
        f"{ip.gbps:.2f} Gbit/s, {ip.retransmits} retransmits"
    )

    codes = cl.stop_all()
    bad = {i: rc for i, rc in codes.items() if rc != 0}
    if bad:
        for i in bad:
            say(f"daemon n{i} exited with {bad[i]}:\n{cl.nodes[i].log_tail(10)}")
        raise DaemonError(f"daemon exit codes {codes}")
    say("all daemons exited 0 on SIGTERM; stopping etcd and removing the namespaces.")
    if not ok:
        say("some pings were lost")
        return 1
    return 0
