"""`udpbackend demo`: a real etcd, N nodes and their pods in throw-away network namespaces.

Lives here: run_demo() and its friendly output. It starts etcd in a hub namespace, writes the
network config, starts `udpbackend run --etcd-endpoints ... --ip-masq` in each node namespace,
waits until every node routes to every other, shows the leases and node-to-node ping, then adds
two pods per node through the real CNI plugins (udpbackend.lab.pods: bridge cni0 + host-local,
configured from subnet.env as flannel's CNI plugin delegates), pings every pod pair across
nodes, runs one iperf3 pod to pod, and traces one packet hop by hop from pod to pod. It drives
the daemon only as a subprocess through udpbackend.lab.cluster, so it must not import the data
plane (or anything outside the lab). Everything it creates is removed on success, on error and
on Ctrl-C.
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

from .addressing import BRIDGE_NAME, HUB, HUB_ADDR, TUN_NAME, UDP_PORT
from .cluster import DEFAULT_NETWORK_CONFIG, ETCD_PREFIX, Cluster, cluster_missing_requirements
from .errors import DaemonError, TestbedError
from .pods import (
    CNI_BRIDGE,
    POD_IFNAME,
    Hop,
    Pod,
    cni_missing_requirements,
    ipam_allocations,
    trace_ping,
)
from .tools import PingResult

PING_COUNT = 10
POD_PING_COUNT = 5
PODS_PER_NODE = 2
POD_NODES = 4  # pods on the first 4 nodes at most: all-pairs pod ping grows as the square
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
    """Build etcd + `nodes` node namespaces, run a daemon in each, show leases and ping, add
    pods through the CNI plugins, ping every pod pair, iperf3 and trace one packet pod to pod,
    then remove it all.

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

    say(
        f"starting {count} nodes (udpbackend run --etcd-endpoints {cl.etcd_endpoint} --ip-masq) ..."
    )
    for i in range(count):
        node = cl.start_etcd_node(i, mode=mode, extra_args=["--ip-masq"])
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

    say(
        f"node to node over the overlay, every pair ({PING_COUNT} pings each, UDP port {UDP_PORT}):"
    )
    ok = True
    for (a, b), res in cl.ping_all(count=PING_COUNT, interval=0.01).items():
        ok &= res.received == res.sent
        say(_fmt_ping(f"n{a} {cl.tun_addr(a):<13} -> n{b} {cl.tun_addr(b):<13}", res))

    secs = max(1, round(seconds))
    missing = cni_missing_requirements()
    if missing:
        say(f"pods skipped: {', '.join(missing)} missing (./dev installs it)")
        ip = cl.iperf3(0, 1, seconds=secs)
        say(
            f"TCP throughput n0 -> n1 over the overlay (iperf3, {secs} s): "
            f"{ip.gbps:.2f} Gbit/s, {ip.retransmits} retransmits"
        )
    else:
        if count > POD_NODES:
            say(f"(pods on the first {POD_NODES} nodes only: the pod matrix grows as the square)")
        ok &= _pods(cl, min(count, POD_NODES), secs, say)

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


def _pods(cl: Cluster, count: int, secs: int, say: Say) -> bool:
    """Pods on every node, all-pairs pod ping across nodes, iperf3 and a traced packet, then
    CNI DEL for each; False if a ping was lost or DEL left something behind."""
    say(
        f"pods: {PODS_PER_NODE} per node, each a netns with {POD_IFNAME} on a veth into the "
        f"node's {CNI_BRIDGE}, made by"
    )
    say(
        "  the CNI plugins bridge, host-local and loopback (/usr/lib/cni) from the node's "
        "subnet.env,"
    )
    say("  as flannel's CNI plugin delegates (`udpbackend cni-config` prints that config):")
    pods: dict[int, list[Pod]] = {}
    for i in range(count):
        pods[i] = [cl.add_pod(i) for _ in range(PODS_PER_NODE)]
        first = pods[i][0]
        say(
            f"  n{i}  {CNI_BRIDGE} {first.gateway}/{first.interface.network.prefixlen} "
            f"mtu {first.mtu}:  " + "  ".join(f"{p.key} {p.ip}" for p in pods[i])
        )
    first = pods[0][0]
    say(
        f"  (ipMasq {str(first.config['ipMasq']).lower()} in the bridge config: "
        "the nodes run with --ip-masq and masquerade themselves)"
    )
    flat = [p for i in range(count) for p in pods[i]]
    pairs = sum(1 for a in flat for b in flat if a.node != b.node)
    say(
        f"pod to pod across nodes, every pair ({pairs} pairs, {POD_PING_COUNT} pings each; "
        "replies and median RTT in ms):"
    )
    ok = True
    kw = max(len(p.key) for p in flat)
    cw = max(kw, 10)
    say("  " + "from \\ to".ljust(kw) + "".join(f"  {p.key:>{cw}}" for p in flat))
    for a in flat:
        cells = []
        for b in flat:
            if a.node == b.node:
                cells.append(f"{'-':>{cw}}")
                continue
            res = a.ping(b.ip, count=POD_PING_COUNT, interval=0.01)
            ok &= res.received == res.sent
            cell = f"{res.received}/{res.sent}"
            if res.received:
                cell += f" {res.p50_ms:.3f}"
            cells.append(f"{cell:>{cw}}")
        say(f"  {a.key:<{kw}}" + "".join(f"  {c}" for c in cells))

    src, dst = pods[0][0], pods[1][0]
    ip = src.iperf3(dst, seconds=secs)
    say(
        f"TCP throughput {src.key} -> {dst.key} (iperf3, {secs} s): "
        f"{ip.gbps:.2f} Gbit/s, {ip.retransmits} retransmits"
    )

    try:
        import scapy  # noqa: F401
    except ImportError:
        say("packet trace skipped: it decodes with scapy (pip install 'udpbackend[bench]')")
    else:
        where = [src.key, src.node, HUB, dst.node, dst.key]
        _show_trace(src, dst, trace_ping(cl, src, dst.ip, where), say)

    for p in flat:
        cl.del_pod(p)
    left = []
    for i in range(count):
        allocated = ipam_allocations(cl.cni_dir(i), str(flat[0].config["name"]))
        veths = [p.host_veth for p in pods[i] if cl.tun_state(i, p.host_veth) is not None]
        left += [f"n{i}: {x}" for x in allocated + veths]
    if left:
        say(f"CNI DEL left behind: {', '.join(left)}")
        return False
    say(
        f"CNI DEL for every pod: veths and host-local's allocations gone ({CNI_BRIDGE} stays, "
        "as on a real node)."
    )
    return ok


def _group_title(where: str, src: Pod, dst: Pod) -> str:
    if where == src.key:
        return f"pod {where} (default route via {src.gateway}, {CNI_BRIDGE} on {src.node})"
    if where == dst.key:
        return f"pod {where}"
    if where == HUB:
        return f"the hub: bridged by {BRIDGE_NAME}, as a switch between the nodes would"
    if where == src.node:
        return (
            f"node {where}: through {CNI_BRIDGE} to its kernel, routed into {TUN_NAME}; "
            f"the daemon sends it to {dst.node}"
        )
    return f"node {where}: the daemon writes it into {TUN_NAME}; routed out to {CNI_BRIDGE}"


def _show_trace(src: Pod, dst: Pod, hops: list[Hop], say: Say) -> None:
    say(f"one ping {src.key} {src.ip} -> {dst.key} {dst.ip}, seen on every interface of its path")
    say(
        f"  (AF_PACKET captures in the {len({h.where for h in hops})} namespaces it crosses, "
        "decoded as `udpbackend trace` does):"
    )
    if not hops:
        say("  (not seen)")
        return
    t0 = hops[0].ts
    iw = max(len(h.ifname) for h in hops)
    where = None
    for n, h in enumerate(hops, 1):
        if h.where != where:
            where = h.where
            say(f"  {_group_title(where, src, dst)}")
        packet = f"{h.src} > {h.dst} ttl {h.ttl}"
        if h.outer is not None:
            osrc, sport, odst, dport, ottl = h.outer
            packet = f"UDP {osrc}:{sport} > {odst}:{dport} ttl {ottl} | {packet}"
        say(f"    {n:2} {(h.ts - t0) * 1e3:6.3f} ms  {h.ifname:<{iw}} {h.direction:<3}  {packet}")
    say(
        f"  TTL {hops[0].ttl} -> {hops[-1].ttl}: {src.node}'s kernel, both daemons and "
        f"{dst.node}'s kernel each take one;"
    )
    say("  the pod addresses never change (no NAT inside the overlay)")
    underlay = next((h for h in hops if h.outer is not None), None)
    if underlay is not None:
        say(
            f"  hop {hops.index(underlay) + 1} layer by layer ({underlay.length} bytes on "
            f"{underlay.ifname}):"
        )
        for line in underlay.layers:
            say(f"    {line}")
