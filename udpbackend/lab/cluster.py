"""Cluster: a hub namespace (bridge + a real etcd) and N node namespaces, daemons in etcd mode.

Lives here: building the hub and its nodes, the cluster's etcd (HubEtcd, or with
``etcd_members=3`` a real 3-member HubEtcdCluster in the hub) and flannel's keys in it (config,
leases), starting `python -m udpbackend run --etcd-endpoints ...` per node, waiting
for /readyz and for every node to route to every other, and traffic between nodes. Must not:
import the planes (daemons are subprocesses); addresses are in lab/addressing.py.

    netns hub: bridge br0 198.18.0.254/24, etcd on 198.18.0.254:<port>
      |-- vh-n0 <-> veth-n0 198.18.0.1/24  netns n0   flannel0 <lease network addr>/32
      |-- vh-n1 <-> veth-n1 198.18.0.2/24  netns n1   ...
      `-- vh-nI <-> veth-nI 198.18.0.(I+1)/24

    etcd_members=3: members hub0..hub2 in the hub, each 198.18.0.254:<own client port> with its
    own peer port on the hub's 127.0.0.1; daemons get all three in --etcd-endpoints.

Typical use::

    with Cluster(nodes=3) as cl:
        cl.put_config({"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}})
        for i in range(3):
            cl.start_etcd_node(i)
        cl.wait_converged()
        print(cl.ping_nodes(0, 1).avg_ms)
"""

from __future__ import annotations

import base64
import functools
import http.client
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .addressing import (
    BRIDGE_NAME,
    HEALTHZ_PORT,
    HUB,
    HUB_ADDR,
    MAX_CLUSTER_NODES,
    OVERLAY_NETWORK,
    UNDERLAY_PREFIX,
)
from .daemons import READY_MARKER, EtcdNode
from .errors import DaemonError, TestbedError
from .etcdproc import EtcdCluster, EtcdProcess, etcd_missing_binaries
from .netns import NetnsLab, missing_requirements, next_tag
from .pods import Pod, add_pod, del_pod
from .tools import IperfResult, PingResult

ETCD_PREFIX = "/coreos.com/network"
DEFAULT_NETWORK_CONFIG: dict[str, Any] = {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}


def cluster_missing_requirements() -> list[str]:
    """missing_requirements() plus the etcd server and etcdctl a Cluster runs."""
    missing = missing_requirements()
    missing += [
        f"{path} (apt-get install etcd-server etcd-client)" for path in etcd_missing_binaries()
    ]
    return missing


def subnet_key(subnet: str, prefix: str = ETCD_PREFIX) -> str:
    """flannel's key for a subnet: ``<prefix>/subnets/198.19.7.0-24``."""
    net = ipaddress.IPv4Network(subnet, strict=False)
    return f"{prefix.rstrip('/')}/subnets/{net.network_address}-{net.prefixlen}"


def lease_value(public_ip: str) -> str:
    """The exact bytes a flannel UDP node writes for its lease."""
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None}, separators=(",", ":"))


class HubEtcd(EtcdProcess):
    """The Cluster's etcd: inside the hub netns, client URL on the hub address (plain http).

    Started with the hub's spawn (tracked, ended by close()), probed and driven with etcdctl
    from inside the hub; the temp dir is removed by the cluster's close().
    """

    def __init__(self, cluster: Cluster, host: str = HUB_ADDR, name: str = "hub") -> None:
        self.cluster = cluster
        super().__init__(
            functools.partial(cluster.spawn, HUB),
            host=host,
            name=name,
            free_port=functools.partial(cluster.free_port, HUB),
            connect=functools.partial(cluster.connect, HUB),
            run=functools.partial(cluster.run, HUB),
            forget=cluster._forget,
        )
        cluster._cleanup_paths.append(self.tmpdir)

    def put_many(self, items: Iterable[tuple[str, str]], timeout: float = 10.0) -> int:
        """PUT many keys fast over one HTTP connection to etcd's JSON gateway (/v3/kv/put).

        For bulk setup only (thousands of keys); etcdctl is the reference client elsewhere.
        """

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        sock = self._connect((self.host, self.client_port), timeout)
        conn = http.client.HTTPConnection(self.host, self.client_port, timeout=timeout)
        n = 0
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock = sock
            for key, value in items:
                body = json.dumps({"key": b64(key), "value": b64(value)})
                conn.request(
                    "POST", "/v3/kv/put", body=body, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise TestbedError(f"etcd PUT {key}: HTTP {resp.status} {data[:200]!r}")
                n += 1
        finally:
            conn.close()
            sock.close()
        return n


class HubEtcdCluster(EtcdCluster):
    """A real multi-member etcd in the hub netns: HubEtcd members hub0, hub1, ... on the hub
    address, each with its own client port (and peer port on the hub's 127.0.0.1).

    ``members`` are HubEtcd (kill one with ``member.kill()``, bring it back with
    ``member.restart()``); etcdctl runs in the hub against the running members.
    """

    members: list[HubEtcd]  # type: ignore[assignment]  # narrowed: the hub's own members

    def __init__(
        self,
        cluster: Cluster,
        size: int = 3,
        host: str = HUB_ADDR,
        heartbeat_ms: int = 20,
        election_ms: int = 200,
    ) -> None:
        # 20/200 ms rather than the single member's 10/100: three members and the daemons
        # share a small machine, and a member starved for 100 ms would start an election.
        self.cluster = cluster
        members = [HubEtcd(cluster, host=host, name=f"hub{k}") for k in range(size)]
        super().__init__(
            members,
            token=f"udpbackend-{cluster.ns_name(HUB)}",
            heartbeat_ms=heartbeat_ms,
            election_ms=election_ms,
        )


class Cluster(NetnsLab):
    """A hub netns (bridge br0 198.18.0.254/24 + a real etcd) and N node namespaces.

    Node i lives in netns ``<prefix>-<pid>-<n>-n<i>`` with veth-n<i> 198.18.0.(i+1)/24 (MTU
    ``underlay_mtu``) bridged in the hub; ip_forward=1, IPv6 off, ICMP rate limit off (so
    unreachable probes are answered every time). Daemons run in etcd mode with
    :meth:`start_etcd_node`; their TUN address is their lease subnet's network address.
    ``close()`` ends every daemon and etcd by PID and deletes all namespaces and temp dirs.
    Methods taking a node accept its index (int) or netns key ("hub", "n0", ...).

    ``etcd_members`` > 1: a real multi-member etcd in the hub (``etcd_cluster``, a
    HubEtcdCluster); ``etcd`` is then its first member, while ``etcd_endpoint``, ``etcdctl`` and
    the daemons' --etcd-endpoints use every member.
    """

    def __init__(
        self,
        nodes: int = 3,
        prefix: str = "ubcl",
        underlay_mtu: int = 1500,
        workdir: str | os.PathLike[str] | None = None,
        start_etcd: bool = True,
        disable_ipv6: bool = True,
        etcd_prefix: str = ETCD_PREFIX,
        etcd_members: int = 1,
    ) -> None:
        if not 0 <= nodes <= MAX_CLUSTER_NODES:
            raise ValueError(f"nodes must be 0..{MAX_CLUSTER_NODES}")
        if etcd_members < 1:
            raise ValueError("etcd_members must be 1 or more")
        self.etcd_cluster: HubEtcdCluster | None = None
        self.underlay_mtu = underlay_mtu
        self.etcd_prefix = etcd_prefix.rstrip("/") or "/"
        self.nodes: dict[int, EtcdNode] = {}  # the latest daemon started per node index
        self.pods: list[Pod] = []  # pods added and not deleted yet (add_pod / del_pod)
        self._pod_seq: dict[int, int] = {}
        self.indices: list[int] = []
        self._disable_ipv6 = disable_ipv6
        super().__init__(prefix, workdir)
        try:
            self._build_hub()
            for i in range(nodes):
                self.add_node(i)
            if etcd_members == 1:
                self.etcd = HubEtcd(self)
                if start_etcd:
                    self.etcd.start()
            else:
                self.etcd_cluster = HubEtcdCluster(self, etcd_members)
                self.etcd = self.etcd_cluster.members[0]
                if start_etcd:
                    self.etcd_cluster.start()
        except BaseException:
            self.close()
            raise

    # -- construction --

    def _key(self, node: str | int) -> str:
        return f"n{node}" if isinstance(node, int) else node

    def _build_hub(self) -> None:
        self.add_netns(HUB)
        self._prepare_netns(HUB, self._disable_ipv6, forward=False)
        with self.ipr(HUB) as ipr:
            ipr.link("add", ifname=BRIDGE_NAME, kind="bridge")
            idx = ipr.link_lookup(ifname=BRIDGE_NAME)[0]
            ipr.addr("add", index=idx, address=HUB_ADDR, prefixlen=UNDERLAY_PREFIX)
            ipr.link("set", index=idx, state="up")

    def add_node(self, i: int | None = None) -> int:
        """Create node i's netns joined to the hub bridge (default: the next free index)."""
        self._check_open()
        if i is None:
            i = max(self.indices, default=-1) + 1
        if not 0 <= i < MAX_CLUSTER_NODES:
            raise TestbedError(f"node index {i} outside 0..{MAX_CLUSTER_NODES - 1}")
        if i in self.indices:
            raise TestbedError(f"node n{i} exists already")
        key = self._key(i)
        self.add_netns(key)
        self.indices.append(i)
        self._prepare_netns(key, self._disable_ipv6)
        self.sysctl(key, "net.ipv4.icmp_ratelimit", "0")
        hub_if = f"vh-n{i}"
        self._add_veth(HUB, hub_if, key, self.veth(i))
        with self.ipr(HUB) as ipr:
            idx = ipr.link_lookup(ifname=hub_if)[0]
            br = ipr.link_lookup(ifname=BRIDGE_NAME)[0]
            ipr.link("set", index=idx, master=br, mtu=self.underlay_mtu)
            ipr.link("set", index=idx, state="up")
        self._address_iface(
            key, self.veth(i), self.underlay_addr(i), UNDERLAY_PREFIX, self.underlay_mtu
        )
        self._wait_oper_up([(HUB, hub_if), (key, self.veth(i))])
        return i

    # -- addressing --

    @staticmethod
    def underlay_addr(i: int) -> str:
        return f"198.18.0.{i + 1}"

    @staticmethod
    def veth(i: int) -> str:
        return f"veth-n{i}"

    def node_dir(self, i: int) -> Path:
        """Per-node directory (subnet.env, stats); kept across daemon restarts."""
        d = self.workdir / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def subnet_file(self, i: int) -> Path:
        return self.node_dir(i) / "subnet.env"

    def tun_addr(self, i: int) -> str:
        """Node i's flannel0 address (its lease subnet's network address)."""
        return self.node(i).tun_addr()

    def node(self, i: int) -> EtcdNode:
        try:
            return self.nodes[i]
        except KeyError:
            raise TestbedError(f"no daemon was started on node n{i}") from None

    def running(self) -> list[EtcdNode]:
        return [n for _, n in sorted(self.nodes.items()) if n.alive]

    # -- etcd --

    @property
    def etcd_endpoint(self) -> str:
        """The daemons' --etcd-endpoints value (every member of a multi-member etcd)."""
        if self.etcd_cluster is not None:
            return self.etcd_cluster.endpoint
        return self.etcd.endpoint

    def etcdctl(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """`etcdctl <args>` in the hub against the cluster's etcd (its running members);
        stdout as text."""
        if self.etcd_cluster is not None:
            return self.etcd_cluster.etcdctl(*args, input=input, check=check)
        return self.etcd.etcdctl(*args, input=input, check=check)

    def put_config(
        self, config: str | Mapping[str, Any] | None = None, prefix: str | None = None
    ) -> str:
        """Write the network config (JSON text or a mapping) to ``<prefix>/config``."""
        if config is None:
            config = DEFAULT_NETWORK_CONFIG
        text = config if isinstance(config, str) else json.dumps(config, separators=(",", ":"))
        self.etcdctl("put", f"{(prefix or self.etcd_prefix).rstrip('/')}/config", text)
        return text

    def subnet_key(self, subnet: str, prefix: str | None = None) -> str:
        return subnet_key(subnet, prefix or self.etcd_prefix)

    def put_lease(self, subnet: str, public_ip: str, lease_id: str | None = None) -> str:
        """Write a flannel UDP lease value with etcdctl (no etcd lease unless lease_id)."""
        key = self.subnet_key(subnet)
        args = ["put", key, lease_value(public_ip)]
        if lease_id is not None:
            args.append(f"--lease={lease_id}")
        self.etcdctl(*args)
        return key

    def get_kvs(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        """``etcdctl get -w json``: [{"key", "value" (decoded text), "lease" (0 = none), ...}]."""
        args = ["get", key, "-w", "json"] + (["--prefix"] if prefix else [])
        doc = json.loads(self.etcdctl(*args))
        out = []
        for kv in doc.get("kvs", []):
            item = dict(kv)
            item["key"] = base64.b64decode(kv["key"]).decode()
            item["value"] = base64.b64decode(kv.get("value", "")).decode()
            item["lease"] = int(kv.get("lease", 0))
            out.append(item)
        return out

    def leases(self, prefix: str | None = None) -> dict[str, str]:
        """All subnet keys -> values under ``<prefix>/subnets``."""
        base = f"{(prefix or self.etcd_prefix).rstrip('/')}/subnets"
        return {kv["key"]: kv["value"] for kv in self.get_kvs(base, prefix=True)}

    # -- daemons --

    def start_etcd_node(
        self,
        i: int,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        mode: str = "batched",
        timeout: float = 30.0,
        healthz_port: int = HEALTHZ_PORT,
        endpoints_via_env: bool = False,
        etcd_endpoints: str | None = None,
    ) -> EtcdNode:
        """Start ``python -m udpbackend run --etcd-endpoints ...`` in node i (created if new).

        env: extra environment on top of ours (inherited FLANNELD_* variables are dropped).
        endpoints_via_env: pass the endpoint as FLANNELD_ETCD_ENDPOINTS instead of the flag.
        etcd_endpoints: this node's endpoint list (default: etcd_endpoint), e.g. the members
        of a multi-member etcd in another order.
        wait_ready: wait until /readyz answers 200 (or, with healthz_port=0, the ready log line
        and flannel0 up). Raises DaemonError with the log tail if it dies or times out.
        """
        self._check_open()
        if i not in self.indices:
            self.add_node(i)
        prev = self.nodes.get(i)
        if prev is not None and prev.alive:
            raise TestbedError(f"node n{i} already runs a daemon (pid {prev.pid})")
        tag = f"n{i}-{next_tag()}"
        stats_path = self.node_dir(i) / f"stats-{tag}.json"
        subnet_file = self.subnet_file(i)
        endpoints = etcd_endpoints or self.etcd_endpoint
        argv = self.etcd_daemon_argv(
            i, mode, stats_path, healthz_port, endpoints_via_env, extra_args, endpoints=endpoints
        )
        penv = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        if endpoints_via_env:
            penv["FLANNELD_ETCD_ENDPOINTS"] = endpoints
        penv.update(env or {})
        spawned_at = time.time()
        proc, log_path = self._spawn_daemon(i, argv, tag, penv)
        handle = EtcdNode(
            self, i, mode, proc, log_path, stats_path, argv, subnet_file, healthz_port, spawned_at
        )
        self.nodes[i] = handle
        if wait_ready:
            self.wait_node_ready(handle, timeout)
        return handle

    def etcd_daemon_argv(
        self,
        i: int,
        mode: str,
        stats_path: Path,
        healthz_port: int,
        endpoints_via_env: bool,
        extra_args: Sequence[str],
        *,
        endpoints: str | None = None,
    ) -> list[str]:
        """The `python -m udpbackend run --etcd-endpoints ...` command line for node i."""
        argv = [sys.executable, "-m", "udpbackend", "run"]
        if not endpoints_via_env:
            argv += ["--etcd-endpoints", endpoints or self.etcd_endpoint]
        argv += ["--iface", self.veth(i), "--subnet-file", str(self.subnet_file(i))]
        argv += ["--mode", mode, "--stats-file", str(stats_path)]
        if healthz_port:
            argv += ["--healthz-port", str(healthz_port), "--healthz-ip", self.underlay_addr(i)]
        return argv + list(extra_args)

    def wait_node_ready(self, handle: EtcdNode, timeout: float = 30.0) -> float:
        """Wait for /readyz 200 (or ready line + TUN up without healthz); sets handle.ready_at."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            rc = handle.proc.poll()
            if rc is not None:
                handle.returncode = rc
                raise DaemonError(
                    f"daemon on node n{handle.index} exited with {rc} before it was ready\n"
                    f"argv: {' '.join(handle.argv)}\n--- log tail ---\n{handle.log_tail()}"
                )
            if handle.healthz_port:
                try:
                    status, body = handle.http_get("/readyz", timeout=1.0)
                    last = f"{status} {body.strip()!r}"
                except OSError as e:
                    status, last = 0, f"{e}"
                if status == 200:
                    break
            else:
                state = self.tun_state(handle.index, handle.tun_name)
                if state and state["up"] and READY_MARKER in handle.log_text():
                    break
                last = f"{handle.tun_name} {state}"
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"daemon on node n{handle.index} not ready after {timeout}s (last /readyz: "
                    f"{last})\nargv: {' '.join(handle.argv)}\n--- log tail ---\n"
                    f"{handle.log_tail()}"
                )
            time.sleep(0.01)
        handle.ready_at = time.time()
        return handle.ready_at - handle.spawned_at

    def stop_all(self, check: bool = False) -> dict[int, int]:
        """SIGTERM every running daemon; their exit codes by node index."""
        return {n.index: n.stop(check=check) for n in self.running()}

    def missing_peers(self, indices: Iterable[int] | None = None) -> dict[int, list[str]]:
        """For each running daemon: the other running daemons' subnets it does not route."""
        nodes = [self.nodes[i] for i in indices] if indices is not None else self.running()
        subnets = {n.index: (n.subnet(), n.public_ip) for n in nodes}
        missing: dict[int, list[str]] = {}
        for n in nodes:
            known = n.peers()
            gaps = [
                f"{s} via {ip}"
                for j, (s, ip) in subnets.items()
                if j != n.index and known.get(s) != ip
            ]
            if gaps:
                missing[n.index] = gaps
        return missing

    def wait_converged(self, timeout: float = 15.0, indices: Iterable[int] | None = None) -> float:
        """Wait until every running daemon routes every other one; returns the seconds waited."""
        idx = list(indices) if indices is not None else None
        start = time.monotonic()
        while True:
            missing = self.missing_peers(idx)
            if not missing:
                return time.monotonic() - start
            for n in self.running() if idx is None else [self.nodes[i] for i in idx]:
                if not n.alive:
                    raise DaemonError(f"daemon n{n.index} died\n{n.log_tail()}")
            if time.monotonic() - start > timeout:
                raise TestbedError(f"not converged after {timeout}s, missing routes: {missing}")
            time.sleep(0.05)

    # -- traffic --

    def ping_nodes(self, src: int, dst: int, count: int = 5, **kw: Any) -> PingResult:
        """Ping node dst's flannel0 address from node src (through the overlay)."""
        return self.ping(src, self.tun_addr(dst), count=count, **kw)

    def ping_all(
        self,
        count: int = 5,
        interval: float = 0.02,
        indices: Iterable[int] | None = None,
    ) -> dict[tuple[int, int], PingResult]:
        """Every ordered pair of (running) nodes pings the other's flannel0 address."""
        idx = list(indices) if indices is not None else [n.index for n in self.running()]
        return {
            (a, b): self.ping_nodes(a, b, count=count, interval=interval)
            for a in idx
            for b in idx
            if a != b
        }

    def iperf3(
        self, client: int, server: int, seconds: float = 3, extra: Sequence[str] = ()
    ) -> IperfResult:
        """iperf3 TCP from node client to node server's flannel0 address."""
        return self._iperf3(client, server, self.tun_addr(server), seconds, extra=extra)

    # -- pods --

    def cni_dir(self, i: int) -> Path:
        """host-local's dataDir on node i (/var/lib/cni/networks on a real node)."""
        d = self.workdir / "cni" / f"n{i}"
        if self.workdir / "cni" not in self._cleanup_paths:
            self._cleanup_paths.append(self.workdir / "cni")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def add_pod(self, i: int, **kw: Any) -> Pod:
        """A pod on node i through the real CNI plugins (bridge cni0 + host-local over the
        node's subnet.env, as flannel's plugin delegates); its netns goes with close()."""
        self._check_open()
        self._pod_seq[i] = self._pod_seq.get(i, 0) + 1
        kw.setdefault("key", f"n{i}-pod{self._pod_seq[i]}")
        pod = add_pod(self, self._key(i), self.subnet_file(i), self.cni_dir(i), **kw)
        self.pods.append(pod)
        return pod

    def del_pod(self, pod: Pod) -> None:
        """CNI DEL for the pod, then its netns is removed (cni0 stays, as on a real node)."""
        del_pod(pod)
        if pod in self.pods:
            self.pods.remove(pod)
