"""Pods: network namespaces inside a lab node, wired by the real CNI plugins as a runtime does.

Lives here: Pod, add_pod/del_pod/check_pod (Debian's containernetworking-plugins bridge,
host-local and loopback from /usr/lib/cni, invoked with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
CNI_IFNAME, CNI_PATH and the config on stdin, as containerd's libcni invokes them), and
trace_ping: one ICMP echo followed interface by interface through every namespace it crosses.
The config is what `udpbackend cni-config` prints for the node's subnet.env (host/cniconf.py
derives it), plus host-local's dataDir in the lab's temp dir. Must not: import the planes or
host (the config comes from the command line, as the lab drives nodes only as processes), or
touch anything outside the lab's namespaces and temp dir.

    node netns (the "host")                              pod netns
    cni0 <gw>/<subnet len>  (bridge plugin, isGateway)
      `-- vethXXXXXXXX  <------------ veth ------------>  eth0 <pod ip>, default via <gw>
                                                          lo (loopback plugin)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .addressing import IPERF_PORT, UDP_PORT
from .errors import TestbedError
from .netns import NetnsLab, _daemon_env, next_tag
from .tools import IperfResult, PingResult

CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback")
POD_IFNAME = "eth0"
CNI_BRIDGE = "cni0"  # the bridge plugin's default name; flannel's delegate keeps it
# kube-flannel.yml's cni-conf.json "delegate" object
KUBE_FLANNEL_DELEGATE: Mapping[str, Any] = {"hairpinMode": True, "isDefaultGateway": True}
LOOPBACK_CONF: Mapping[str, Any] = {"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}


def cni_missing_requirements() -> list[str]:
    """The CNI plugins this host lacks (empty list = all there)."""
    return [
        f"{CNI_BIN_DIR / p} (apt-get install containernetworking-plugins)"
        for p in CNI_PLUGINS
        if not os.access(CNI_BIN_DIR / p, os.X_OK)
    ]


def _version(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


@dataclass
class Pod:
    """One pod: netns ``key`` inside node ``node``, eth0 on the node's cni0.

    ``config`` is the network config the plugins got, ``result`` the bridge plugin's ADD
    result; ``ip``/``gateway``/``mac``/``host_veth`` are read from it.
    """

    lab: NetnsLab
    node: str  # the node's netns key ("n0"): the pod's host
    key: str  # the pod's netns key ("n0-pod1")
    netns: str  # its `ip netns` name
    container_id: str
    config: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def name(self) -> str:
        return self.key

    def _ip_entry(self) -> dict[str, Any]:
        ips = self.result.get("ips") or []
        v4 = [e for e in ips if ipaddress.ip_interface(e["address"]).version == 4]
        if not v4:
            raise TestbedError(f"pod {self.key}: CNI result has no IPv4 address: {self.result}")
        return dict(v4[0])

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self._ip_entry()["address"])

    @property
    def ip(self) -> str:
        return str(self.interface.ip)

    @property
    def gateway(self) -> str:
        return str(self._ip_entry().get("gateway", ""))

    @property
    def mtu(self) -> int:
        return int(self.config["mtu"])

    def _iface(self, in_sandbox: bool, name: str | None = None) -> dict[str, Any]:
        for itf in self.result.get("interfaces") or []:
            if bool(itf.get("sandbox")) == in_sandbox and (name is None or itf["name"] == name):
                return dict(itf)
        raise TestbedError(f"pod {self.key}: no such interface in the CNI result {self.result}")

    @property
    def mac(self) -> str:
        return str(self._iface(True, POD_IFNAME)["mac"])

    @property
    def host_veth(self) -> str:
        """The host side of the pod's veth, in the node's netns (bridged into cni0)."""
        bridge = self.config.get("bridge", CNI_BRIDGE)
        for itf in self.result.get("interfaces") or []:
            if not itf.get("sandbox") and itf["name"] != bridge:
                return str(itf["name"])
        raise TestbedError(f"pod {self.key}: no host veth in the CNI result {self.result}")

    @property
    def data_dir(self) -> Path:
        """host-local's directory for this network on the pod's node."""
        return Path(self.config["ipam"]["dataDir"]) / str(self.config["name"])

    # -- traffic from the pod --

    def ping(self, dst: str, count: int = 5, **kw: Any) -> PingResult:
        return self.lab.ping(self.key, dst, count=count, **kw)

    def ping_start(self, dst: str, count: int, **kw: Any) -> Callable[[], PingResult]:
        return self.lab.ping_start(self.key, dst, count, **kw)

    def iperf3(
        self, server: Pod, seconds: float = 3, extra: Sequence[str] = (), port: int = IPERF_PORT
    ) -> IperfResult:
        """iperf3 TCP from this pod to the server pod's IP (the server runs in its netns)."""
        return self.lab._iperf3(self.key, server.key, server.ip, seconds, extra=extra, port=port)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return self.lab.run(self.key, argv, **kw)

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        return self.lab.socket(self.key, family, type, proto)

    def __repr__(self) -> str:
        ip = self.ip if self.result else "?"
        return f"<Pod {self.key} on {self.node} {ip} deleted={self.deleted}>"


# --- the runtime side: config and plugin invocation -----------------------------------------


def pod_network_config(
    lab: NetnsLab,
    node: str | int,
    subnet_env: Path,
    data_dir: Path,
    delegate: Mapping[str, Any] = KUBE_FLANNEL_DELEGATE,
) -> dict[str, Any]:
    """`udpbackend cni-config -f <subnet.env> --delegate <delegate>` (run in the node's netns,
    as flannel's plugin would derive it there), plus host-local's ``dataDir``."""
    argv = [sys.executable, "-m", "udpbackend", "cni-config", "-f", str(subnet_env)]
    argv += ["--delegate", json.dumps(dict(delegate))]
    res = lab.run(node, argv, timeout=30, env=_daemon_env(os.environ))
    if res.returncode != 0:
        raise TestbedError(
            f"udpbackend cni-config -f {subnet_env} exited {res.returncode}: "
            f"{res.stderr.decode(errors='replace').strip()}"
        )
    conf: dict[str, Any] = json.loads(res.stdout)
    conf["ipam"]["dataDir"] = str(data_dir)
    return conf


def _cni_env(
    command: str, container_id: str, netns_path: str, ifname: str, pod_key: str
) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": str(CNI_BIN_DIR),
        # what containerd passes for a Kubernetes pod; the plugins used here ignore it
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_key};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }


def invoke_plugin(
    lab: NetnsLab,
    node: str | int,
    command: str,
    conf: Mapping[str, Any],
    container_id: str,
    netns_path: str,
    ifname: str,
    pod_key: str = "",
) -> dict[str, Any]:
    """Run the plugin ``conf["type"]`` in the node's netns as a runtime does; its JSON result
    ({} for DEL/CHECK). TestbedError with the plugin's error message if it fails."""
    plugin = CNI_BIN_DIR / str(conf["type"])
    env = _cni_env(command, container_id, netns_path, ifname, pod_key)
    res = lab.run(node, [str(plugin)], timeout=30, input=json.dumps(conf).encode(), env=env)
    out = res.stdout.decode(errors="replace").strip()
    if res.returncode != 0:
        try:
            err = json.loads(out)
            msg = f"{err.get('msg')} {err.get('details') or ''}".strip()
        except ValueError:
            msg = out or res.stderr.decode(errors="replace").strip()
        raise TestbedError(f"CNI {command} {conf['type']} ({ifname}, {pod_key}) failed: {msg}")
    return json.loads(out) if out else {}


def _with_prev(conf: Mapping[str, Any], prev: Mapping[str, Any]) -> dict[str, Any]:
    """libcni's injection: prevResult in the config for DEL and CHECK from CNI 0.4.0 on."""
    d = dict(conf)
    if prev and _version(str(conf.get("cniVersion", "0.1.0"))) >= (0, 4, 0):
        d["prevResult"] = dict(prev)
    return d


def add_pod(
    lab: NetnsLab,
    node: str | int,
    subnet_env: Path,
    data_dir: Path,
    *,
    key: str | None = None,
    delegate: Mapping[str, Any] = KUBE_FLANNEL_DELEGATE,
    cni_version: str | None = None,
) -> Pod:
    """A new netns inside node, then CNI ADD: loopback for lo, the bridge plugin for eth0.

    data_dir: host-local's dataDir for this node (each node is a host of its own).
    cni_version: override the config's cniVersion (CHECK needs >= 0.4.0; flannel's is 0.3.1).
    The namespace is registered with the lab first, so close() removes it on any failure.
    """
    missing = cni_missing_requirements()
    if missing:
        raise TestbedError("pods need " + ", ".join(missing))
    node_key = lab._key(node)
    conf = pod_network_config(lab, node_key, subnet_env, data_dir, delegate)
    if cni_version is not None:
        conf["cniVersion"] = cni_version
    tag = next_tag()
    pod_key = key or f"{node_key}-pod{tag}"
    name = lab.add_netns(pod_key)
    # IPv6 off as in the nodes (no router solicitations on cni0); lo is the loopback plugin's.
    if os.path.exists("/proc/sys/net/ipv6"):
        lab.sysctl(pod_key, "net.ipv6.conf.all.disable_ipv6", "1")
        lab.sysctl(pod_key, "net.ipv6.conf.default.disable_ipv6", "1")
    container_id = f"udpbackend{os.getpid()}x{tag}"
    pod = Pod(lab, node_key, pod_key, name, container_id, conf)
    lo = dict(LOOPBACK_CONF)
    try:
        invoke_plugin(lab, node_key, "ADD", lo, container_id, pod.netns_path, "lo", pod_key)
        pod.result = invoke_plugin(
            lab, node_key, "ADD", conf, container_id, pod.netns_path, POD_IFNAME, pod_key
        )
    except TestbedError:
        # As a runtime does after a failed ADD: DEL (whatever ADD got done is undone), then
        # the sandbox goes.
        with contextlib.suppress(TestbedError):
            del_pod(pod)
        if not pod.deleted and pod_key in lab.ns:
            lab.remove_netns(pod_key)
        raise
    return pod


def check_pod(pod: Pod) -> None:
    """CNI CHECK with the ADD result as prevResult (TestbedError if the plugin objects).

    As libcni, refuses a config older than CNI 0.4.0 (flannel's 0.3.1 one has no CHECK)."""
    if _version(str(pod.config.get("cniVersion", "0.1.0"))) < (0, 4, 0):
        raise TestbedError(
            f"CNI CHECK needs cniVersion >= 0.4.0; the config says {pod.config.get('cniVersion')}"
        )
    conf = _with_prev(pod.config, pod.result)
    invoke_plugin(
        pod.lab, pod.node, "CHECK", conf, pod.container_id, pod.netns_path, POD_IFNAME, pod.key
    )


def del_pod(pod: Pod, remove_netns: bool = True) -> None:
    """CNI DEL (bridge for eth0, then loopback), then the pod's netns is deleted.

    The bridge plugin removes the veth and has host-local release the address; cni0 stays, as
    on a real node. Idempotent, as CNI DEL is."""
    if pod.deleted:
        return
    conf = _with_prev(pod.config, pod.result)
    path = pod.netns_path if pod.netns in pod.lab.ns.values() else ""
    invoke_plugin(pod.lab, pod.node, "DEL", conf, pod.container_id, path, POD_IFNAME, pod.key)
    lo = dict(LOOPBACK_CONF)
    invoke_plugin(pod.lab, pod.node, "DEL", lo, pod.container_id, path, "lo", pod.key)
    if remove_netns and pod.key in pod.lab.ns:
        pod.lab.remove_netns(pod.key)
    pod.deleted = True


def ipam_allocations(data_dir: Path, network: str) -> list[str]:
    """The addresses host-local holds in ``<data_dir>/<network>`` (one file per address;
    its ``lock`` and ``last_reserved_ip.*`` bookkeeping files are not allocations)."""
    d = data_dir / network
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.iterdir()):
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.ip_address(p.name)))
    return out


# --- one ping followed hop by hop -------------------------------------------------------------

_ETH_P_ALL = 0x0003
_ETH_P_IP = 0x0800
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_PACKET_OUTGOING = 4
TRACE_ICMP_ID = 0x7562  # "ub"
TRACE_PAYLOAD = b"udpbackend trace: one packet, every hop"


@dataclass
class Hop:
    """Where the traced packet was seen: one interface, one direction."""

    ts: float
    where: str  # the namespace key ("n0-pod1", "n0", "hub")
    ifname: str
    direction: str  # "in" or "out"
    src: str
    dst: str
    ttl: int
    length: int
    outer: tuple[str, int, str, int, int] | None = None  # (src, sport, dst, dport, ttl)
    layers: list[str] = field(default_factory=list)  # trace.layer_lines of the capture


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    csum = _icmp_checksum(head + payload)
    return struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload


def trace_ping(
    lab: NetnsLab,
    src: Pod,
    dst_ip: str,
    where: Sequence[str],
    port: int = UDP_PORT,
    timeout: float = 3.0,
) -> list[Hop]:
    """Send one ICMP echo request from pod src to dst_ip and return every sighting of it on
    every interface of the namespaces ``where`` (netns keys), in kernel timestamp order.

    AF_PACKET capture sockets (read-only, no promiscuous mode) in each namespace; decoding with
    trace.py's scapy layers, a flannel datagram's inner packet included. Needs scapy.
    """
    from . import trace

    trace.bind_flannel(port)
    seq = next_tag() & 0xFFFF
    socks: dict[socket.socket, str] = {}
    try:
        for key in dict.fromkeys([src.key, *where]):
            s = lab.socket(key, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
            socks[s] = key
            s.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            s.setblocking(False)
        icmp = src.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with icmp:
            icmp.sendto(_echo_request(TRACE_ICMP_ID, seq, TRACE_PAYLOAD), (dst_ip, 0))
            hops: list[Hop] = []
            deadline = time.monotonic() + timeout
            replied = False
            quiet_until: float | None = None
            while time.monotonic() < deadline:
                if quiet_until is not None and time.monotonic() > quiet_until:
                    break
                ready, _, _ = select.select([*socks, icmp], [], [], 0.05)
                for s in ready:
                    if s is icmp:
                        data = s.recv(65535)
                        ihl = (data[0] & 0x0F) * 4
                        t, _c, _k, ident, rseq = struct.unpack_from("!BBHHH", data, ihl)
                        if t == 0 and ident == TRACE_ICMP_ID and rseq == seq:
                            replied = True
                            quiet_until = time.monotonic() + 0.2  # late sightings, then stop
                        continue
                    for hop in _drain(s, socks[s], port, seq, trace):
                        hops.append(hop)
            if not replied:
                raise TestbedError(
                    f"traced ping {src.ip} -> {dst_ip} got no reply; seen at "
                    + ", ".join(f"{h.where}/{h.ifname} {h.direction}" for h in hops)
                )
    finally:
        for s in socks:
            s.close()
    return sorted(hops, key=lambda h: h.ts)


def _drain(s: socket.socket, key: str, port: int, seq: int, trace: Any) -> list[Hop]:
    hops: list[Hop] = []
    while True:
        try:
            data, anc, _flags, addr = s.recvmsg(65535, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return hops
        if addr[1] != _ETH_P_IP or len(data) < 20 or data[0] >> 4 != 4:
            continue
        ts = time.time()
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack("qq", raw[:16])
                ts = sec + nsec / 1e9
        pkt = trace.decode(data)
        inner = trace.inner_ip(pkt, port)
        ip = inner if inner is not None else pkt
        if not _is_ours(ip, seq):
            continue
        outer = None
        if inner is not None:
            udp = pkt.payload
            outer = (pkt.src, int(udp.sport), pkt.dst, int(udp.dport), int(pkt.ttl))
        hops.append(
            Hop(
                ts=ts,
                where=key,
                ifname=addr[0],
                direction="out" if addr[2] == _PACKET_OUTGOING else "in",
                src=ip.src,
                dst=ip.dst,
                ttl=int(ip.ttl),
                length=len(data),
                outer=outer,
                layers=trace.layer_lines(pkt, port),
            )
        )


def _is_ours(ip: Any, seq: int) -> bool:
    from scapy.layers.inet import ICMP

    if ICMP not in ip:
        return False
    icmp = ip[ICMP]
    return bool(icmp.type == 8 and icmp.id == TRACE_ICMP_ID and icmp.seq == seq)


__all__ = [
    "CNI_BIN_DIR",
    "CNI_BRIDGE",
    "KUBE_FLANNEL_DELEGATE",
    "POD_IFNAME",
    "Hop",
    "Pod",
    "add_pod",
    "check_pod",
    "cni_missing_requirements",
    "del_pod",
    "invoke_plugin",
    "ipam_allocations",
    "pod_network_config",
    "trace_ping",
]
