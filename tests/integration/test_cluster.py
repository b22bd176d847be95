# End-to-end tests of the daemon in etcd mode, like flanneld: a real etcd in a hub namespace,
# 3+ nodes in their own namespaces bridged to it (udpbackend.lab.testbed.Cluster), `python -m
# udpbackend run --etcd-endpoints ...` in each. Lives here: what an operator, etcdctl or a flannel
# peer can observe (leases and their bytes, routes via log lines and ICMP, subnet.env, iptables,
# health endpoints, restarts, etcd outages). Must not: touch anything outside the namespaces.
from __future__ import annotations

import ipaddress
import stat
import time
from collections.abc import Iterator

import pytest
from cluster_helpers import needs_cluster, revive, running_cluster

from udpbackend.lab.addressing import OVERLAY_NETWORK
from udpbackend.lab.cluster import Cluster, lease_value
from udpbackend.lab.daemons import EtcdNode

NS_PREFIX = "ubit"  # conftest.py checks that no ubit-<our pid>-* namespace is left behind
BASE = (0, 1, 2)  # the nodes every test may rely on (restarted by the `cl` fixture if stopped)
PREFIX = "/coreos.com/network"
TUN_MTU = 1472  # veth 1500 - 28
ROUTE_BAR = 2.0  # seconds: lease change -> route change on the peers


pytestmark = needs_cluster()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _cluster() -> Iterator[Cluster]:
    with running_cluster(
        BASE, NS_PREFIX, {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}
    ) as cl:
        yield cl


@pytest.fixture
def cl(_cluster: Cluster) -> Cluster:
    """The module's cluster with the base nodes running and knowing each other."""
    revive(_cluster, BASE)
    _cluster.wait_converged()
    return _cluster


def new_index(cl: Cluster) -> int:
    return max(cl.indices) + 1


def wait_probe(cl: Cluster, src: int, dst: str, want: str, timeout: float = 3.0) -> str:
    """udp_probe until it answers `want` (or the time is up); returns the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = cl.udp_probe(src, dst, timeout=0.3)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def assert_pings(cl: Cluster, pairs: list[tuple[int, int]], count: int = 3) -> None:
    bad = {}
    for a, b in pairs:
        res = cl.ping_nodes(a, b, count=count, interval=0.02)
        if res.received != count:
            bad[(a, b)] = f"{res.received}/{count}\n{res.output}"
    assert not bad, f"pings lost: {bad}"


# --- basic overlay ----------------------------------------------------------------------------


def test_all_pairs_ping(cl: Cluster) -> None:
    pings = cl.ping_all(count=5, interval=0.02, indices=BASE)
    assert len(pings) == 6
    lost = {k: r.output for k, r in pings.items() if r.received != r.sent}
    assert not lost, lost
    subnets = {cl.nodes[i].subnet() for i in BASE}
    assert len(subnets) == 3, subnets
    for s in subnets:
        net = ipaddress.IPv4Network(s)
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.IPv4Network(OVERLAY_NETWORK))


def test_tun_device_like_flannel(cl: Cluster) -> None:
    node = cl.nodes[0]
    state = cl.tun_state(0)
    assert state is not None and state["up"]
    assert state["addrs"] == [f"{node.tun_addr()}/32"]
    assert state["mtu"] == TUN_MTU
    assert OVERLAY_NETWORK in state["routes"]


def test_lease_value_is_flannel_udp_bytes(cl: Cluster) -> None:
    """Our value is byte-identical to a flannel UDP node's; the key carries a 24 h lease."""
    for i in BASE:
        node = cl.nodes[i]
        key = cl.subnet_key(node.subnet())
        expected = f'{{"PublicIP":"198.18.0.{i + 1}","PublicIPv6":null}}'
        assert expected == lease_value(node.public_ip)
        assert cl.etcdctl("get", key, "--print-value-only") == expected + "\n"
        (kv,) = cl.get_kvs(key)
        assert kv["value"] == expected
        assert kv["lease"] != 0, "a daemon's lease must be attached to an etcd lease"
        ttl = cl.etcdctl("lease", "timetolive", f"{kv['lease']:x}", "--keys")
        assert "granted with TTL(86400s)" in ttl, ttl
        assert key in ttl, ttl


def test_subnet_env_is_flannels(cl: Cluster) -> None:
    node = cl.nodes[0]
    net = ipaddress.IPv4Network(node.subnet())
    text = node.subnet_file.read_text()
    assert text == (
        f"FLANNEL_NETWORK={OVERLAY_NETWORK}\n"
        f"FLANNEL_SUBNET={net.network_address + 1}/{net.prefixlen}\n"
        f"FLANNEL_MTU={TUN_MTU}\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert stat.S_IMODE(node.subnet_file.stat().st_mode) == 0o644


def test_healthz_and_readyz(cl: Cluster) -> None:
    node = cl.nodes[0]
    assert node.healthz() == (200, "flanneld is running")
    assert node.readyz() == (200, "flanneld is ready")
    assert node.http_get("/nope")[0] == 404


def test_readyz_503_until_config_exists(cl: Cluster) -> None:
    """With --etcd-prefix pointing at an empty prefix: /healthz 200 and /readyz 503 while
    the config is missing; the config appears -> ready, lease under that prefix."""
    prefix = "/ubit/pending"
    i = new_index(cl)
    node = cl.start_etcd_node(i, extra_args=["--etcd-prefix", prefix], wait_ready=False)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert node.alive, node.log_tail()
            try:
                if node.healthz()[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.02)
        assert node.healthz() == (200, "flanneld is running")
        time.sleep(1.2)  # at least one config retry
        assert node.readyz() == (503, "flanneld is not ready yet")
        cl.put_config({"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}, prefix=prefix)
        cl.wait_node_ready(node, timeout=10)
        assert node.readyz() == (200, "flanneld is ready")
        leases = cl.leases(prefix)
        assert list(leases.values()) == [lease_value(node.public_ip)], leases
        assert cl.subnet_key(node.subnet(), prefix) in leases
    finally:
        assert node.stop() == 0


def test_env_endpoints_like_flag(cl: Cluster) -> None:
    """FLANNELD_ETCD_ENDPOINTS works like --etcd-endpoints, and the flag wins over the env."""
    i = new_index(cl)
    node = cl.start_etcd_node(i, endpoints_via_env=True)
    try:
        assert "--etcd-endpoints" not in node.argv
        assert cl.leases()[cl.subnet_key(node.subnet())] == lease_value(node.public_ip)
        cl.wait_converged(timeout=5, indices=[*BASE, i])
    finally:
        assert node.stop() == 0
    dead = "http://198.18.0.254:1"
    node = cl.start_etcd_node(i, env={"FLANNELD_ETCD_ENDPOINTS": dead}, timeout=15)
    try:
        assert "--etcd-endpoints" in node.argv
        cl.wait_converged(timeout=5, indices=[*BASE, i])
    finally:
        assert node.stop() == 0


# --- lease changes -> routes ------------------------------------------------------------------


def test_flannel_written_lease_is_routed(cl: Cluster) -> None:
    """A lease in flannel's exact bytes, written with etcdctl, becomes a route on every node
    (ICMP net-unreachable for that subnet stops); deleting it withdraws the route again."""
    # Above the window nodes allocate from (a random pick among the first 100 free subnets from
    # SubnetMin, 198.19.1.0): a subnet in that window may already be a node's own lease.
    key = f"{PREFIX}/subnets/198.19.240.0-24"
    value = '{"PublicIP":"198.18.0.77","PublicIPv6":null}'
    probe = "198.19.240.1"
    assert cl.udp_probe(0, probe) == "net-unreachable"
    t0 = time.time()
    cl.etcdctl("put", key, value)
    try:
        for i in BASE:
            ev = cl.nodes[i].wait_event("peer added", "198.19.240.0/24 via 198.18.0.77", after=t0)
            assert ev.ts - t0 < ROUTE_BAR, f"n{i} programmed it after {ev.ts - t0:.3f}s"
        # Routed towards 198.18.0.77 (nobody): the daemon no longer answers unreachable.
        assert cl.udp_probe(0, probe) == "timeout"
    finally:
        t1 = time.time()
        cl.etcdctl("del", key)
    for i in BASE:
        ev = cl.nodes[i].wait_event("peer removed", "198.19.240.0/24", after=t1)
        assert ev.ts - t1 < ROUTE_BAR
    assert wait_probe(cl, 0, probe, "net-unreachable") == "net-unreachable"


def test_stopped_node_lease_deleted_route_gone(cl: Cluster) -> None:
    """SIGTERM: exit 0, flannel0 gone, lease kept; deleting the lease with etcdctl removes the
    route from the others within 2 s; traffic to it then gets net-unreachable."""
    victim = cl.nodes[2]
    subnet, addr = victim.subnet(), victim.tun_addr()
    key = cl.subnet_key(subnet)
    assert victim.stop() == 0
    assert cl.tun_state(2) is None, "flannel0 still exists after SIGTERM"
    assert cl.leases()[key] == lease_value(victim.public_ip), "lease must survive SIGTERM"
    t0 = time.time()
    cl.etcdctl("del", key)
    for i in (0, 1):
        ev = cl.nodes[i].wait_event("peer removed", subnet, timeout=5, after=t0)
        assert ev.ts - t0 < ROUTE_BAR, f"n{i} removed the route after {ev.ts - t0:.3f}s"
        assert subnet not in cl.nodes[i].peers()
    assert cl.ping(0, addr, count=2, interval=0.1).received == 0
    assert cl.udp_probe(0, addr) == "net-unreachable"
    assert cl.udp_probe(1, addr) == "net-unreachable"


def test_new_node_reachable_within_2s_of_ready(cl: Cluster) -> None:
    i = new_index(cl)
    node = cl.start_etcd_node(i)
    assert node.ready_at is not None
    subnet = node.subnet()
    for j in BASE:
        ev = cl.nodes[j].wait_event("peer added", f"{subnet} via {node.public_ip}", timeout=5)
        assert ev.ts - node.ready_at < ROUTE_BAR, f"n{j} learned it {ev.ts - node.ready_at:.3f}s"
    # Traffic both ways, measured from ready (the new node got the others in its snapshot).
    for j in BASE:
        while True:
            if cl.ping_nodes(j, i, count=1, interval=0.1).received:
                break
            assert time.time() - node.ready_at < ROUTE_BAR, f"n{j} cannot reach n{i}"
    assert_pings(cl, [(j, i) for j in BASE] + [(i, j) for j in BASE])
    assert node.stop() == 0


def test_restart_keeps_subnet(cl: Cluster) -> None:
    node = cl.nodes[0]
    subnet = node.subnet()
    assert node.stop() == 0
    again = cl.start_etcd_node(0)
    assert again.subnet() == subnet
    assert any(ev.text.startswith(subnet) for ev in again.events("lease acquired"))
    cl.wait_converged(timeout=5)
    assert_pings(cl, [(1, 0), (2, 0), (0, 1)])


def test_sigkill_restart_keeps_subnet_and_routes_come_back(cl: Cluster) -> None:
    """SIGKILL (no cleanup at all), subnet.env removed: the restart finds its lease by
    PublicIP and gets the same subnet; the others route to it again."""
    node = cl.nodes[1]
    subnet = node.subnet()
    assert node.kill() == -9
    node.subnet_file.unlink()
    again = cl.start_etcd_node(1)
    assert again.subnet() == subnet
    assert cl.leases()[cl.subnet_key(subnet)] == lease_value(again.public_ip)
    cl.wait_converged(timeout=5)
    assert_pings(cl, [(0, 1), (2, 1), (1, 0), (1, 2)])


def test_reservation_is_honoured(cl: Cluster) -> None:
    """A key without a lease naming a node's PublicIP, written before that node starts: the
    node takes exactly that subnet and the key still has no lease afterwards."""
    i = new_index(cl)
    public_ip = cl.underlay_addr(i)
    subnet = "198.19.250.0/24"
    key = cl.put_lease(subnet, public_ip)
    try:
        node = cl.start_etcd_node(i)
        assert node.subnet() == subnet
        (kv,) = cl.get_kvs(key)
        assert kv["lease"] == 0, f"the reservation got a lease: {kv}"
        assert kv["value"] == lease_value(public_ip)
        cl.wait_converged(timeout=5, indices=[*BASE, i])
        assert_pings(cl, [(0, i), (i, 0)])
        assert node.stop() == 0
        (kv,) = cl.get_kvs(key)
        assert kv["lease"] == 0
    finally:
        cl.etcdctl("del", key)


# --- iptables ---------------------------------------------------------------------------------


def _iptables(cl: Cluster, i: int, *args: str) -> list[str]:
    res = cl.run(i, ["iptables", "-w", *args])
    return res.stdout.decode().splitlines() if res.returncode == 0 else []


def _flannel_rules(cl: Cluster, i: int) -> dict[str, list[str]]:
    return {
        "POSTROUTING": [r for r in _iptables(cl, i, "-t", "nat", "-S", "POSTROUTING") if "-A" in r],
        "FLANNEL-POSTRTG": _iptables(cl, i, "-t", "nat", "-S", "FLANNEL-POSTRTG"),
        "FORWARD": [r for r in _iptables(cl, i, "-S", "FORWARD") if "-A" in r],
        "FLANNEL-FWD": _iptables(cl, i, "-S", "FLANNEL-FWD"),
    }


def _want_rules(pod: str, net: str = OVERLAY_NETWORK) -> dict[str, list[str]]:
    c = '-m comment --comment "flanneld masq"'
    rf = " --random-fully"  # iptables >= 1.6.2
    return {
        "POSTROUTING": [f"-A POSTROUTING {c} -j FLANNEL-POSTRTG"],
        "FLANNEL-POSTRTG": [
            "-N FLANNEL-POSTRTG",
            f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {pod} -d {net} {c} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {net} -d {pod} {c} -j RETURN",
            f"-A FLANNEL-POSTRTG ! -s {net} -d {pod} {c} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {c} -j MASQUERADE{rf}",
            f"-A FLANNEL-POSTRTG ! -s {net} -d {net} {c} -j MASQUERADE{rf}",
        ],
        "FORWARD": ['-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'],
        "FLANNEL-FWD": [
            "-N FLANNEL-FWD",
            f'-A FLANNEL-FWD -s {net} -m comment --comment "flanneld forward" -j ACCEPT',
            f'-A FLANNEL-FWD -d {net} -m comment --comment "flanneld forward" -j ACCEPT',
        ],
    }


def test_ip_masq_rules_exact_resynced_kept_and_replaced(cl: Cluster) -> None:
    """flannel's rules, exactly; put back within --iptables-resync; left in place on exit (as
    flanneld: pods stay masqueraded across a restart); a restart with another subnet in
    subnet.env rewrites them for that subnet only."""
    i = new_index(cl)
    args = ["--ip-masq", "--iptables-resync", "1"]
    node = cl.start_etcd_node(i, extra_args=args)
    pod = node.subnet()
    new_pod = "198.19.251.0/24"
    want = _want_rules(pod)
    try:
        assert _flannel_rules(cl, i) == want
        assert node.subnet_env()["FLANNEL_IPMASQ"] == "true"
        # Delete one masq and one forward rule: back, in order, within --iptables-resync.
        cl.run(i, ["iptables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"], check=True)
        cl.run(i, ["iptables", "-w", "-D", "FLANNEL-FWD", "1"], check=True)
        t0 = time.monotonic()
        while _flannel_rules(cl, i) != want:
            assert time.monotonic() - t0 < 1.0 + 1.5, _flannel_rules(cl, i)
            time.sleep(0.1)
        assert node.stop() == 0
        assert _flannel_rules(cl, i) == want  # still there after the node exited
        # The lease gone and subnet.env naming another subnet: the node takes that one, and
        # its rules replace the old subnet's.
        cl.etcdctl("del", cl.subnet_key(pod))
        env = node.subnet_file.read_text()
        old_line = f"FLANNEL_SUBNET={node.subnet_env()['FLANNEL_SUBNET']}"
        assert old_line in env
        node.subnet_file.write_text(env.replace(old_line, "FLANNEL_SUBNET=198.19.251.1/24"))
        node = cl.start_etcd_node(i, extra_args=args)
        assert node.subnet() == new_pod
        assert _flannel_rules(cl, i) == _want_rules(new_pod)
        left = _iptables(cl, i, "-t", "nat", "-S") + _iptables(cl, i, "-S")
        assert not [r for r in left if pod in r], left
    finally:
        if node.alive:
            assert node.stop() == 0
        cl.etcdctl("del", cl.subnet_key(new_pod))


# --- etcd outage ------------------------------------------------------------------------------


def test_etcd_outage_loses_no_ping_and_watch_resumes(cl: Cluster) -> None:
    """etcd SIGKILLed for 10 s under a continuous ping: not one reply lost. After etcd is
    back, a node that joins is learned by the others (their watches resumed)."""
    interval, outage = 0.05, 10.0
    count = int((outage + 3.0) / interval)
    pings = [
        cl.ping_start(0, cl.tun_addr(1), count=count, interval=interval),
        cl.ping_start(2, cl.tun_addr(0), count=count, interval=interval),
    ]
    time.sleep(1.0)
    cl.etcd.kill()
    killed_at = time.time()
    time.sleep(outage)
    cl.etcd.restart()
    results = [p() for p in pings]
    for res in results:
        assert res.received == res.sent, f"{res.sent - res.received} lost to {res.dst}"
    for i in BASE:
        assert cl.nodes[i].alive, cl.nodes[i].log_tail()
    i = new_index(cl)
    node = cl.start_etcd_node(i)
    for j in BASE:
        cl.nodes[j].wait_event("peer added", f"{node.subnet()} via", timeout=10)
    assert_pings(cl, [(j, i) for j in BASE])
    # The outage was noticed and the daemons came back (log lines; not a gate on timing).
    for j in BASE:
        kinds = [ev.kind for ev in cl.nodes[j].events() if ev.ts >= killed_at - 1]
        assert "etcd lost" in kinds, cl.nodes[j].log_tail()
    assert node.stop() == 0


def test_base_nodes_still_healthy(cl: Cluster) -> None:
    for i in BASE:
        node: EtcdNode = cl.nodes[i]
        assert node.alive and node.readyz() == (200, "flanneld is ready")
