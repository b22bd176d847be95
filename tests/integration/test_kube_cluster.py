"""Kube mode end to end: the API-server stand-in in the hub namespace, udpbackend nodes in
their own namespaces run as `udpbackend run --kube-subnet-mgr` processes, real TUNs, real
pings.  Covers: all-pairs ping, annotations byte-identical to flannel's, a deleted Node's
route gone within 2 s, a changed public-ip followed, a late podCIDR, a flannel-written Node
as a peer, and a 30 s API-server outage under ping with nothing lost.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_apiserver import KubeApiServer

from udpbackend.lab.addressing import HUB, HUB_ADDR
from udpbackend.lab.cluster import Cluster
from udpbackend.lab.daemons import EtcdNode

P = "flannel.alpha.coreos.com/"
NETWORK = "198.19.0.0/16"


def pod_cidr(i: int) -> str:
    return f"198.19.{10 + i}.0/24"


class KubeLab:
    """A Cluster without etcd, a KubeApiServer listening at the hub's address, and helpers to
    start kube-mode nodes against it."""

    def __init__(self, cl: Cluster, api: KubeApiServer, workdir: Path) -> None:
        self.cl, self.api = cl, api
        self.kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
        self.net_conf = workdir / "net-conf.json"
        self.net_conf.write_text(json.dumps({"Network": NETWORK, "Backend": {"Type": "udp"}}))

    def register(self, i: int, cidr: str | None = None, **kw: Any) -> None:
        if i not in self.cl.indices:
            self.cl.add_node(i)
        self.api.create_node(f"n{i}", pod_cidr=cidr, internal_ip=self.cl.underlay_addr(i), **kw)

    def start(self, i: int, wait_ready: bool = True, extra: list[str] | None = None) -> EtcdNode:
        args = ["--kube-subnet-mgr", "--kubeconfig-file", str(self.kubeconfig)]
        args += ["--net-config-path", str(self.net_conf), "--queues", "1", *(extra or [])]
        return self.cl.start_etcd_node(
            i, extra_args=args, env={"NODE_NAME": f"n{i}"}, wait_ready=wait_ready
        )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[KubeLab]:
    with Cluster(nodes=0, start_etcd=False, prefix="ubkube") as cl:

        def listener() -> socket.socket:
            return cl.socket(HUB, socket.AF_INET, socket.SOCK_STREAM)

        with KubeApiServer(HUB_ADDR, sock_factory=listener) as api:
            yield KubeLab(cl, api, tmp_path)
            assert api.errors == []


def test_three_nodes_ping_and_write_flannels_annotations(lab: KubeLab) -> None:
    for i in range(3):
        lab.register(i, pod_cidr(i))
    nodes = [lab.start(i) for i in range(3)]
    lab.cl.wait_converged(timeout=10)
    for (a, b), res in lab.cl.ping_all(count=3).items():
        assert res.received == 3, f"n{a} -> n{b}: {res}"
    for i, node in enumerate(nodes):
        assert node.subnet() == pod_cidr(i)
        obj = lab.api.get_node(f"n{i}")
        ours = {k: v for k, v in obj["metadata"]["annotations"].items() if k.startswith(P)}
        assert ours == {
            P + "backend-data": "null",
            P + "backend-type": "",
            P + "kube-subnet-manager": "true",
            P + "public-ip": lab.cl.underlay_addr(i),
        }
        conds = {c["type"]: c for c in obj["status"]["conditions"]}
        assert conds["NetworkUnavailable"]["status"] == "False"
        assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"


def test_deleted_node_route_goes_and_public_ip_change_is_followed(lab: KubeLab) -> None:
    for i in range(3):
        lab.register(i, pod_cidr(i))
    nodes = [lab.start(i) for i in range(3)]
    lab.cl.wait_converged(timeout=10)
    # a flannel-written Node (exactly flannel's annotations) is a peer like any other
    t0 = time.time()
    lab.api.create_node(
        "flannel-f1",
        pod_cidr="198.19.99.0/24",
        annotations={
            P + "backend-data": "null",
            P + "backend-type": "",
            P + "kube-subnet-manager": "true",
            P + "public-ip": "198.18.0.77",
        },
    )
    for n in nodes:
        n.wait_event("peer added", "198.19.99.0/24 via 198.18.0.77", after=t0, timeout=5)
    t1 = time.time()
    lab.api.patch_node(
        "flannel-f1", {"metadata": {"annotations": {P + "public-ip": "198.18.0.78"}}}
    )
    for n in nodes:
        n.wait_event("peer added", "198.19.99.0/24 via 198.18.0.78", after=t1, timeout=5)
    t2 = time.time()
    lab.api.delete_node("flannel-f1")
    for n in nodes:
        ev = n.wait_event("peer removed", "198.19.99.0/24", after=t2, timeout=5)
        assert ev.ts - t2 < 2.0, f"{n.node}: route removed {ev.ts - t2:.2f}s after the delete"
    # a Node without flannel's kube-subnet-manager annotation is never a peer
    lab.api.create_node("plain", pod_cidr="198.19.98.0/24")
    time.sleep(0.5)
    assert all("198.19.98.0/24" not in n.peers() for n in nodes)


def test_late_podcidr_node_waits_then_comes_up(lab: KubeLab) -> None:
    lab.register(0, pod_cidr(0))
    lab.register(1, None)
    first = lab.start(0)
    late = lab.start(1, wait_ready=False)
    deadline = time.monotonic() + 10
    while "pod cidr not assigned" not in late.log_text():
        assert time.monotonic() < deadline, late.log_tail()
        time.sleep(0.05)
    assert late.alive and late.readyz()[0] == 503
    lab.api.patch_node("n1", {"spec": {"podCIDR": pod_cidr(1), "podCIDRs": [pod_cidr(1)]}})
    lab.cl.wait_node_ready(late, timeout=10)
    lab.cl.wait_converged(timeout=10)
    assert lab.cl.ping_nodes(0, 1, count=3).received == 3
    assert late.log_text().count("pod cidr not assigned") == 1  # said once, not every second
    assert first.alive


def test_api_server_outage_under_ping_loses_nothing(lab: KubeLab) -> None:
    for i in range(2):
        lab.register(i, pod_cidr(i))
    nodes = [lab.start(i) for i in range(2)]
    lab.cl.wait_converged(timeout=10)
    ping = lab.cl.ping_start(0, lab.cl.tun_addr(1), count=340, interval=0.1)
    time.sleep(0.5)
    lab.api.outage(30)
    time.sleep(31)
    deadline = time.monotonic() + 10
    while not lab.api.running:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # the watch is back: a node joining now is learned
    t0 = time.time()
    lab.register(2, pod_cidr(2))
    third = lab.start(2)
    for n in nodes:
        n.wait_event("peer added", f"{pod_cidr(2)} via {third.public_ip}", after=t0, timeout=10)
    res = ping()
    assert res.sent == 340 and res.received == res.sent, res
    for n in nodes:
        assert "kube lost: forwarding on known routes" in n.log_text()
        assert "kube back: watch resumed" in n.log_text()


def _fake_peer(i: int) -> dict[str, str]:
    return {
        P + "backend-data": "null",
        P + "backend-type": "",
        P + "kube-subnet-manager": "true",
        P + "public-ip": f"198.18.{1 + i // 250}.{1 + i % 250}",
    }


def test_route_latency_and_a_thousand_nodes(lab: KubeLab) -> None:
    """The issue's bars: a Node change routed on a peer at p99 <= 100 ms over 100 changes;
    1,000 Nodes in the API -> a node's start to ready <= 3 s."""
    for i in range(1000):
        lab.api.create_node(f"fake-{i}", pod_cidr=f"198.19.{100 + i // 8}.{(i % 8) * 32}/27")
        lab.api.patch_node(f"fake-{i}", {"metadata": {"annotations": _fake_peer(i)}})
    lab.register(0, pod_cidr(0))
    node = lab.start(0)
    ready_s = node.ready_at - node.spawned_at if node.ready_at else float("inf")
    assert len(node.peers()) == 1000
    lags = []
    for k in range(100):
        ip = f"198.18.9.{k + 1}"
        t0 = time.time()
        lab.api.patch_node("fake-7", {"metadata": {"annotations": {P + "public-ip": ip}}})
        ev = node.wait_event("peer added", f"198.19.100.224/27 via {ip}", after=t0, timeout=5)
        lags.append(max(0.0, ev.ts - t0))
    lags.sort()
    p50, p99 = lags[49] * 1000, lags[98] * 1000
    print(f"kube: 1000 nodes start->ready {ready_s:.2f} s; patch->route p50 {p50:.1f} ms", end="")
    print(f" p99 {p99:.1f} ms")
    assert ready_s <= 3.0, f"start to ready with 1,000 Nodes took {ready_s:.2f} s"
    assert p99 <= 100.0, f"patch -> route p99 {p99:.1f} ms (p50 {p50:.1f})"
