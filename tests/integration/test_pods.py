# Pods on a Cluster of etcd-mode nodes started with --ip-masq, wired by Debian's real CNI plugins
# (bridge cni0 + host-local + loopback, udpbackend.lab.pods) from each node's subnet.env, as
# flannel's CNI plugin delegates. Lives here: what a pod sees and sends (across nodes, through
# the bridge, to and from outside the overlay, across a node restart) and what CNI DEL leaves.
# Must not: touch anything outside the namespaces and temp dir the Cluster created.
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from cluster_helpers import revive, running_cluster

from udpbackend.lab.addressing import HUB, HUB_ADDR, OVERLAY_NETWORK, UDP_PORT
from udpbackend.lab.cluster import Cluster
from udpbackend.lab.errors import TestbedError
from udpbackend.lab.etcdproc import etcd_missing_binaries
from udpbackend.lab.pods import (
    CNI_BRIDGE,
    POD_IFNAME,
    Pod,
    check_pod,
    cni_missing_requirements,
    invoke_plugin,
    ipam_allocations,
    trace_ping,
)

NS_PREFIX = "ubit"  # conftest.py checks that no ubit-<our pid>-* namespace is left behind
NODES = (0, 1)
MASQ = ["--ip-masq"]
POD_MTU = 1472  # FLANNEL_MTU: veth 1500 - 28


def _missing() -> str | None:
    missing = cni_missing_requirements() + etcd_missing_binaries()
    return ", ".join(missing) + " missing" if missing else None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _cluster() -> Iterator[Cluster]:
    config = {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}
    with running_cluster(NODES, NS_PREFIX, config, extra_args=MASQ) as cl:
        yield cl


@pytest.fixture
def cl(_cluster: Cluster) -> Cluster:
    """The module's cluster, both nodes running with --ip-masq and routing to each other."""
    revive(_cluster, NODES, extra_args=MASQ)
    _cluster.wait_converged()
    return _cluster


@pytest.fixture(scope="module")
def pods(_cluster: Cluster) -> dict[str, Pod]:
    """a0, a1 on node n0 and b0 on node n1 (kept for the module)."""
    return {
        "a0": _cluster.add_pod(0),
        "a1": _cluster.add_pod(0),
        "b0": _cluster.add_pod(1),
    }


# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_listener(cl: Cluster, where: str, addr: str) -> Iterator[tuple[socket.socket, int]]:
    """A UDP socket bound to addr:<free port> inside netns `where` (recvfrom shows the peer)."""
    s = cl.socket(where, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((addr, 0))
        s.settimeout(2.0)
        yield s, s.getsockname()[1]
    finally:
        s.close()


def send_udp(cl: Cluster, where: str, dst: tuple[str, int], payload: bytes) -> None:
    """One datagram from netns `where`, from a fresh socket (a fresh source port, so a fresh
    conntrack entry: the nat table decides its source address anew)."""
    with cl.socket(where, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, dst)


def node_links(cl: Cluster, i: int) -> list[str]:
    res = cl.run(i, ["ip", "-j", "link", "show"], check=True)
    return [link["ifname"] for link in json.loads(res.stdout)]


@contextlib.contextmanager
def hub_route(cl: Cluster, dst: str, via: str) -> Iterator[None]:
    """A route in the hub (outside the overlay) to dst via a node; removed afterwards."""
    with cl.ipr(HUB) as ipr:
        ipr.route("add", dst=dst, gateway=via)
    try:
        yield
    finally:
        with cl.ipr(HUB) as ipr:
            ipr.route("del", dst=dst, gateway=via)


# --- tests ------------------------------------------------------------------------------------


def test_pod_config_is_flannels_delegate(cl: Cluster, pods: dict[str, Pod]) -> None:
    """The plugins got `udpbackend cni-config`'s config for the node's subnet.env with
    kube-flannel's delegate; the pod got an address of its node's subnet, default route via
    cni0's gateway address, the pod MTU; ipMasq is off because the node masquerades."""
    a0 = pods["a0"]
    subnet = cl.nodes[0].subnet()
    conf = a0.config
    assert conf["type"] == "bridge" and conf["name"] == "cbr0" and conf["cniVersion"] == "0.3.1"
    assert conf["hairpinMode"] is True and conf["isDefaultGateway"] is True
    assert conf["isGateway"] is True and conf["ipMasq"] is False and conf["mtu"] == POD_MTU
    assert conf["ipam"]["ranges"] == [[{"subnet": subnet}]]
    assert conf["ipam"]["routes"] == [{"dst": OVERLAY_NETWORK}]
    assert ipaddress.ip_address(a0.ip) in ipaddress.ip_network(subnet)
    assert a0.gateway == str(ipaddress.ip_network(subnet).network_address + 1)
    state = cl.tun_state(a0.key, POD_IFNAME)
    assert state is not None and state["mtu"] == POD_MTU and state["up"]
    bridge = cl.tun_state(0, CNI_BRIDGE)
    assert bridge is not None and f"{a0.gateway}/24" in bridge["addrs"]
    routes = a0.run(["ip", "-4", "route", "show"], check=True).stdout.decode()
    assert f"default via {a0.gateway} dev eth0" in routes
    assert f"{OVERLAY_NETWORK} via {a0.gateway} dev eth0" in routes


def test_pod_to_pod_across_nodes(cl: Cluster, pods: dict[str, Pod]) -> None:
    """ping both ways and iperf3 TCP between pods on different nodes; the receiving pod sees
    the sending pod's own address (no masquerading inside the overlay)."""
    a0, b0 = pods["a0"], pods["b0"]
    for src, dst in ((a0, b0), (b0, a0)):
        res = src.ping(dst.ip, count=10, interval=0.02)
        assert res.received == res.sent, res.output
    ip = a0.iperf3(b0, seconds=2)
    assert ip.bits_per_second > 10e6, ip
    with udp_listener(cl, b0.key, b0.ip) as (sock, port):
        send_udp(cl, a0.key, (b0.ip, port), b"pod to pod")
        data, peer = sock.recvfrom(2048)
    assert (data, peer[0]) == (b"pod to pod", a0.ip)


def test_df_packet_of_exactly_the_pod_mtu_passes_one_more_byte_does_not(
    pods: dict[str, Pod],
) -> None:
    """ping -M do -s <mtu-28>: a 1472-byte DF packet crosses to the other node's pod (eth0,
    cni0, flannel0 all have the pod MTU; the outer datagram is exactly the veth's 1500). One
    byte more is refused by the sending pod's own stack (EMSGSIZE: "message too long,
    mtu=1472") before anything leaves it; no ICMP is involved."""
    a0, b0 = pods["a0"], pods["b0"]
    df = ["ping", "-n", "-W", "1", "-M", "do"]
    ok = a0.run([*df, "-c", "2", "-i", "0.05", "-s", str(POD_MTU - 28), b0.ip])
    out = ok.stdout.decode()
    assert ok.returncode == 0 and f"{POD_MTU - 28}({POD_MTU}) bytes" in out, out
    assert "2 received" in out, out
    big = a0.run([*df, "-c", "1", "-s", str(POD_MTU - 27), b0.ip])
    text = big.stdout.decode() + big.stderr.decode()
    assert big.returncode != 0, text
    assert f"message too long, mtu={POD_MTU}" in text, text


def test_pod_to_outside_leaves_with_the_node_address(cl: Cluster, pods: dict[str, Pod]) -> None:
    """A pod's datagram to the hub (198.18.0.254, outside the overlay network) arrives with
    its node's underlay address as source: --ip-masq's MASQUERADE rule; the reply finds the
    pod again (ping)."""
    for pod, i in ((pods["a0"], 0), (pods["b0"], 1)):
        with udp_listener(cl, HUB, HUB_ADDR) as (sock, port):
            send_udp(cl, pod.key, (HUB_ADDR, port), pod.ip.encode())
            data, peer = sock.recvfrom(2048)
        assert data == pod.ip.encode()
        assert peer[0] == cl.underlay_addr(i), f"{pod} arrived as {peer[0]}"
        res = pod.ping(HUB_ADDR, count=3)
        assert res.received == res.sent, res.output


def test_outside_to_pod_is_not_masqueraded(cl: Cluster, pods: dict[str, Pod]) -> None:
    """The hub, with a route to node n0's pod subnet via n0, reaches pod a0: the pod sees the
    hub's own address (FLANNEL-POSTRTG returns for ! -s network -d pod subnet)."""
    a0 = pods["a0"]
    with hub_route(cl, cl.nodes[0].subnet(), cl.underlay_addr(0)):
        with udp_listener(cl, a0.key, a0.ip) as (sock, port):
            send_udp(cl, HUB, (a0.ip, port), b"from outside")
            data, peer = sock.recvfrom(2048)
        assert (data, peer[0]) == (b"from outside", HUB_ADDR)
        res = cl.ping(HUB, a0.ip, count=3)
        assert res.received == res.sent, res.output


def test_same_node_through_the_bridge_and_hairpin(cl: Cluster, pods: dict[str, Pod]) -> None:
    """Pods on one node reach each other through cni0 alone (the reply's TTL is untouched: no
    router on the way); a pod reaches its own IP. hairpinMode is on the pod's bridge port, and
    it works: an Ethernet frame the pod sends to its own MAC comes back through cni0 (with
    hairpin off, as a check of the check, the bridge drops it)."""
    a0, a1 = pods["a0"], pods["a1"]
    res = a0.ping(a1.ip, count=5)
    assert res.received == res.sent, res.output
    assert " ttl=64 " in res.output, res.output
    res = a0.ping(a0.ip, count=3)
    assert res.received == res.sent, res.output

    link = json.loads(
        cl.run(0, ["ip", "-d", "-j", "link", "show", "dev", a0.host_veth], check=True).stdout
    )[0]
    assert link["master"] == CNI_BRIDGE
    assert link["linkinfo"]["info_slave_data"]["hairpin"] is True

    ethertype = 0x88B5  # IEEE 802 local experimental: nothing else in the pod speaks it
    mac = bytes.fromhex(a0.mac.replace(":", ""))

    def frame_comes_back() -> bool:
        with a0.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as s:
            s.bind((POD_IFNAME, ethertype))
            s.settimeout(0.3)
            marker = os.urandom(8)
            s.send(mac + mac + struct.pack("!H", ethertype) + marker + bytes(38))
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                try:
                    data = s.recv(2048)
                except TimeoutError:
                    return False
                if data[14:22] == marker:
                    return True
            return False

    assert frame_comes_back(), "hairpin: the frame to the pod's own MAC did not come back"
    hairpin = ["ip", "link", "set", "dev", a0.host_veth, "type", "bridge_slave", "hairpin"]
    cl.run(0, [*hairpin, "off"], check=True)
    try:
        assert not frame_comes_back(), "came back without hairpin: the check proves nothing"
    finally:
        cl.run(0, [*hairpin, "on"], check=True)


def test_cni_del_leaves_nothing_behind(cl: Cluster, pods: dict[str, Pod]) -> None:
    """CNI DEL removes the pod's veth from the node and host-local's file for its address; the
    pod's netns goes; cni0 and the other pods stay. A repeated DEL (as runtimes retry it)
    succeeds and changes nothing."""
    before_links = node_links(cl, 1)
    pod = cl.add_pod(1)
    data_dir = pod.data_dir.parent
    network = str(pod.config["name"])
    assert pod.host_veth in node_links(cl, 1)
    assert pod.ip in ipam_allocations(data_dir, network)
    assert pods["b0"].ip in ipam_allocations(data_dir, network)
    cl.del_pod(pod)
    assert node_links(cl, 1) == before_links
    assert CNI_BRIDGE in before_links
    assert ipam_allocations(data_dir, network) == [pods["b0"].ip]
    left = sorted(p.name for p in (data_dir / network).iterdir())
    assert set(left) <= {pods["b0"].ip, "lock", "last_reserved_ip.0"}, left
    assert pod.key not in cl.ns and pod.netns not in os.listdir("/run/netns")
    invoke_plugin(cl, 1, "DEL", pod.config, pod.container_id, "", POD_IFNAME, pod.key)
    assert ipam_allocations(data_dir, network) == [pods["b0"].ip]
    res = pods["b0"].ping(pods["a0"].ip, count=3)
    assert res.received == res.sent, res.output


def test_failed_add_is_undone(cl: Cluster) -> None:
    """An ADD the bridge plugin refuses (the delegate names the node's underlay veth as the
    bridge): DEL runs as a runtime runs it, the pod's netns goes, nothing is allocated and the
    node's links and its veth are as before."""
    before = node_links(cl, 1)
    namespaces = dict(cl.ns)
    allocated = ipam_allocations(cl.cni_dir(1), "cbr0")
    with pytest.raises(TestbedError, match="already exists but is not a bridge"):
        cl.add_pod(1, delegate={"bridge": cl.veth(1), "hairpinMode": True})
    assert node_links(cl, 1) == before
    assert cl.ns == namespaces
    assert ipam_allocations(cl.cni_dir(1), "cbr0") == allocated
    state = cl.tun_state(1, cl.veth(1))
    assert state is not None and state["up"] and f"{cl.underlay_addr(1)}/24" in state["addrs"]


def test_cni_check(cl: Cluster) -> None:
    """CNI CHECK, config 1.0.0 with the ADD result as prevResult: it finds a pod whose address
    is gone. On a pod as ADD left it, the bridge plugin before 1.3.0 (Debian 12 ships 1.1.1)
    reports flannel's gateway-less route to the network as missing (containernetworking/
    plugins#886); only that complaint is accepted. flannel's own 0.3.1 config has no CHECK
    (libcni refuses, so does check_pod)."""
    pod = cl.add_pod(1, cni_version="1.0.0")
    try:
        try:
            check_pod(pod)
        except TestbedError as e:
            assert f"Expected Route {{Dst:{{IP:{OVERLAY_NETWORK.split('/')[0]}" in str(e), e
        pod.run(["ip", "addr", "flush", "dev", POD_IFNAME], check=True)
        with pytest.raises(TestbedError, match=f"Failed to match addr {pod.interface}"):
            check_pod(pod)
    finally:
        cl.del_pod(pod)
    assert pod.ip not in ipam_allocations(pod.data_dir.parent, str(pod.config["name"]))
    a0 = cl.add_pod(0)
    try:
        with pytest.raises(TestbedError, match=r"cniVersion >= 0\.4\.0"):
            check_pod(a0)
    finally:
        cl.del_pod(a0)


def test_traced_ping_crosses_every_hop(cl: Cluster, pods: dict[str, Pod]) -> None:
    """One echo request a0 -> b0 seen on each interface of its path, in order: pod eth0, n0's
    bridge port and cni0, flannel0, the underlay as a UDP 8285 datagram through the hub, n1's
    flannel0, cni0 and bridge port, b0's eth0. Each router on the way (n0's kernel, both
    daemons, n1's kernel) takes one from the TTL; the addresses never change."""
    pytest.importorskip("scapy")
    a0, b0 = pods["a0"], pods["b0"]
    hops = trace_ping(cl, a0, b0.ip, [a0.key, "n0", HUB, "n1", b0.key])
    path = [(h.where, h.ifname, h.direction) for h in hops]
    assert path == [
        (a0.key, "eth0", "out"),
        ("n0", a0.host_veth, "in"),
        ("n0", CNI_BRIDGE, "in"),
        ("n0", "flannel0", "out"),
        ("n0", "veth-n0", "out"),
        (HUB, "vh-n0", "in"),
        (HUB, "vh-n1", "out"),
        ("n1", "veth-n1", "in"),
        ("n1", "flannel0", "in"),
        ("n1", CNI_BRIDGE, "out"),
        ("n1", b0.host_veth, "out"),
        (b0.key, "eth0", "in"),
    ], path
    assert [h.ttl for h in hops] == [64, 64, 64, 63, 62, 62, 62, 62, 61, 60, 60, 60]
    assert {(h.src, h.dst) for h in hops} == {(a0.ip, b0.ip)}
    outer = {h.outer for h in hops if h.outer is not None}
    assert outer == {(cl.underlay_addr(0), UDP_PORT, cl.underlay_addr(1), UDP_PORT, 64)}
    assert [h.outer is not None for h in hops] == [False] * 4 + [True] * 4 + [False] * 4


def test_node_restart_never_lets_a_pod_out_unmasqueraded(cl: Cluster, pods: dict[str, Pod]) -> None:
    """Node n0 stopped and started again while pod a0 sends a datagram to the hub every 20 ms,
    each from a fresh source port (so each is NATed anew, not by a conntrack entry made before
    the restart): every one arrives, and every one with n0's address. The rules stay in place
    while the node is down and the restarted node keeps them (as flanneld)."""
    a0 = pods["a0"]
    node_ip = cl.underlay_addr(0)
    seen: list[tuple[int, str, float]] = []
    sent = 0
    stop = threading.Event()
    with udp_listener(cl, HUB, HUB_ADDR) as (sock, port):
        sock.settimeout(0.1)

        def listen() -> None:
            while not stop.is_set():
                try:
                    data, peer = sock.recvfrom(2048)
                except TimeoutError:
                    continue
                seen.append((struct.unpack("!I", data[:4])[0], peer[0], time.time()))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        stream_error: list[BaseException] = []

        def stream() -> None:
            nonlocal sent
            try:
                while not stop.is_set():
                    send_udp(cl, a0.key, (HUB_ADDR, port), struct.pack("!I", sent))
                    sent += 1
                    time.sleep(0.02)
            except BaseException as e:  # surfaced below
                stream_error.append(e)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            time.sleep(0.5)
            assert cl.nodes[0].stop() == 0
            stopped_at = time.time()
            time.sleep(0.5)
            node = cl.start_etcd_node(0, extra_args=MASQ)
            started_at = node.ready_at or time.time()
            cl.wait_converged()
            time.sleep(0.5)
        finally:
            stop.set()
            sender.join(5)
            time.sleep(0.2)
            listener.join(5)
    assert not stream_error, stream_error
    sources = {src for _, src, _ in seen}
    assert sources == {node_ip}, f"arrived unmasqueraded: {sorted(sources - {node_ip})}"
    assert sorted(n for n, _, _ in seen) == list(range(sent)), f"{sent} sent, {len(seen)} seen"
    down = [n for n, _, t in seen if stopped_at <= t <= started_at]
    assert len(down) >= 10, "too few datagrams while the node was down to show anything"
