# Both firewall modes against the real kernel, in namespaces this module creates: a "node"
# between a "pod" (198.19.7.2, in the overlay network) and an "outside" host (198.18.50.2) with no
# route back to the overlay. Lives here: the rules as `nft list` / `iptables -S` show them
# (flannel's text), missing() and ensure() after deletions, packets masqueraded to the node's
# address, the iptables backend choice, each mode removing the other's rules, and a real
# etcd-mode node switched iptables -> nftables -> iptables. Must not: touch anything outside the
# namespaces it created.
from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from udpbackend.host.iptables import (
    Iptables,
    IptablesFirewall,
    forward_rules,
    masq_rules,
    remove_flannel_chains,
)
from udpbackend.host.nftables import NftablesFirewall, remove_flannel_tables
from udpbackend.lab.addressing import OVERLAY_NETWORK
from udpbackend.lab.cluster import Cluster, cluster_missing_requirements
from udpbackend.lab.netns import NetnsLab

NS_PREFIX = "ubit"  # conftest.py checks that no ubit-<our pid>-* namespace is left behind
NET = ipaddress.IPv4Network("198.19.0.0/16")
POD = ipaddress.IPv4Network("198.19.7.0/24")
POD2 = ipaddress.IPv4Network("198.19.8.0/24")
IPV4 = "flannel-ipv4"
POD_GW, POD_ADDR = "198.19.7.1", "198.19.7.2"
NODE_OUT, OUT_ADDR = "198.18.50.1", "198.18.50.2"

pytestmark = pytest.mark.skipif(
    not (shutil.which("nft") and shutil.which("iptables-nft") and shutil.which("iptables-legacy")),
    reason="needs nft (apt-get install nftables) and iptables-nft/-legacy (iptables)",
)


# --- the namespaces ---------------------------------------------------------------------------


def _link(lab: NetnsLab, key: str, ifname: str, addr: str, plen: int) -> None:
    with lab.ipr(key) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=idx, address=addr, prefixlen=plen)
        ipr.link("set", index=idx, state="up")


def _veth(lab: NetnsLab, key: str, ifname: str, peer_key: str) -> None:
    """veth `ifname` in key, its peer "eth0" moved into peer_key."""
    with lab.ipr(key) as ipr:
        ipr.link("add", ifname=ifname, kind="veth", peer="eth0")
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], net_ns_fd=lab.ns_name(peer_key))


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(prefix=NS_PREFIX)
    try:
        for key in ("pod", "node", "out"):
            lab.add_netns(key)
            with lab.ipr(key) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        lab.sysctl("node", "net.ipv4.ip_forward", "1")
        _veth(lab, "node", "v-pod", "pod")
        _veth(lab, "node", "v-out", "out")
        _link(lab, "node", "v-pod", POD_GW, 24)
        _link(lab, "pod", "eth0", POD_ADDR, 24)
        _link(lab, "node", "v-out", NODE_OUT, 24)
        _link(lab, "out", "eth0", OUT_ADDR, 24)  # and no route to the overlay
        with lab.ipr("pod") as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=POD_GW)
        yield lab
    finally:
        lab.close()


def in_node(lab: NetnsLab, fn: Callable[[], Any]) -> Any:
    """fn() with this thread in the node's netns: the firewall's nft/iptables run there."""
    with lab.in_netns("node"):
        return fn()


def nft_fw(lab: NetnsLab, subnet: ipaddress.IPv4Network = POD, **kw: Any) -> NftablesFirewall:
    kw.setdefault("ip_masq", True)
    kw.setdefault("forward", True)
    kw.setdefault("remove_other", remove_flannel_chains)
    fw: NftablesFirewall = in_node(lab, lambda: NftablesFirewall(NET, subnet, **kw))
    return fw


def ipt_fw(lab: NetnsLab, subnet: ipaddress.IPv4Network = POD, **kw: Any) -> IptablesFirewall:
    kw.setdefault("ip_masq", True)
    kw.setdefault("forward", True)
    kw.setdefault("remove_other", remove_flannel_tables)
    fw: IptablesFirewall = in_node(lab, lambda: IptablesFirewall(NET, subnet, **kw))
    return fw


# --- reading the rules back -------------------------------------------------------------------


Lab = NetnsLab | Cluster
Key = str | int


def out(lab: Lab, key: Key, *argv: str) -> str:
    res = lab.run(key, list(argv))
    return res.stdout.decode() if res.returncode == 0 else ""


def nft_tables(lab: Lab, key: Key) -> list[tuple[str, str]]:
    objs = json.loads(out(lab, key, "nft", "-j", "list", "tables"))["nftables"]
    return [(o["table"]["family"], o["table"]["name"]) for o in objs if "table" in o]


def nft_chain(lab: Lab, key: Key, chain: str, family: str = "ip", table: str = IPV4) -> Any:
    """(the chain's JSON object without handle/comment, its comment or None, its text lines)."""
    doc = json.loads(out(lab, key, "nft", "-j", "list", "chain", family, table, chain) or "{}")
    objs = [o["chain"] for o in doc.get("nftables", []) if "chain" in o]
    if not objs:
        return None, None, []
    head = {k: v for k, v in objs[0].items() if k not in ("handle", "comment")}
    text = out(lab, key, "nft", "list", "chain", family, table, chain).splitlines()
    body = [ln.strip() for ln in text[2:-2] if not ln.strip().startswith("comment ")]
    return head, objs[0].get("comment"), body


def nft_rules(pod: str, net: str = str(NET), fully_random: bool = True) -> list[str]:
    """flannel's postrtg rules as `nft list` prints them (0x4000 as nft spells it)."""
    masq = "masquerade fully-random" if fully_random else "masquerade"
    return [
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark 0x00004000 return",
        f"ip saddr {pod} ip daddr {net} return",
        f"ip saddr {net} ip daddr {pod} return",
        f"ip saddr != {pod} ip daddr {net} return",
        f"ip saddr {net} ip daddr != 224.0.0.0/4 {masq}",
        f"ip saddr != {net} ip daddr {net} {masq}",
    ]


FWD_TEXT = [
    "type filter hook forward priority filter; policy accept;",
    f"ip saddr {NET} accept",
    f"ip daddr {NET} accept",
]


def assert_nft_mode(lab: Lab, key: Key, pod: str, fully_random: bool = True) -> None:
    """flannel's two tables only (iptables-nft's own tables aside), its chains exactly."""
    tables = [t for t in nft_tables(lab, key) if t[1] not in ("nat", "filter")]
    assert sorted(tables) == [("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")]
    head, comment, body = nft_chain(lab, key, "postrtg")
    ref = {"family": "ip", "table": "flannel-ipv4", "name": "postrtg"}
    assert head == {**ref, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}
    assert comment in (None, "chain to manage traffic masquerading by flannel")  # None: nft 1.0.6
    assert body == nft_rules(pod, fully_random=fully_random)
    head, comment, body = nft_chain(lab, key, "forward")
    ref = {"family": "ip", "table": "flannel-ipv4", "name": "forward"}
    assert head == {**ref, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}
    assert comment in (None, "chain to accept flannel traffic")
    assert body == FWD_TEXT
    six = json.loads(out(lab, key, "nft", "-j", "list", "table", "ip6", "flannel-ipv6"))
    assert [o for o in six["nftables"] if "chain" in o or "rule" in o] == []  # no IPv6 network


def iptables_rules(lab: Lab, key: Key, binary: str) -> dict[str, list[str]]:
    def s(*args: str) -> list[str]:
        return out(lab, key, binary, "-w", *args).splitlines()

    return {
        "POSTROUTING": [r for r in s("-t", "nat", "-S", "POSTROUTING") if r.startswith("-A")],
        "FLANNEL-POSTRTG": s("-t", "nat", "-S", "FLANNEL-POSTRTG"),
        "FORWARD": [r for r in s("-S", "FORWARD") if r.startswith("-A")],
        "FLANNEL-FWD": s("-S", "FLANNEL-FWD"),
    }


def want_iptables(pod: str, net: str = str(NET), random_fully: bool = True) -> dict[str, list[str]]:
    c, f = '-m comment --comment "flanneld masq"', '-m comment --comment "flanneld forward"'
    rf = " --random-fully" if random_fully else ""
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
        "FORWARD": [f"-A FORWARD {f} -j FLANNEL-FWD"],
        "FLANNEL-FWD": [
            "-N FLANNEL-FWD",
            f"-A FLANNEL-FWD -s {net} {f} -j ACCEPT",
            f"-A FLANNEL-FWD -d {net} {f} -j ACCEPT",
        ],
    }


NO_IPTABLES: dict[str, list[str]] = {
    "POSTROUTING": [],
    "FLANNEL-POSTRTG": [],
    "FORWARD": [],
    "FLANNEL-FWD": [],
}


def flannel_in_saves(lab: Lab, key: Key) -> dict[str, list[str]]:
    """Lines naming FLANNEL-* in each backend's iptables-save and ip6tables-save."""
    found = {}
    for tool in ("iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft"):
        text = out(lab, key, f"{tool}-save")
        found[tool] = [ln for ln in text.splitlines() if "FLANNEL-" in ln]
    return found


def no_flannel_chains(lab: Lab, key: Key) -> bool:
    return not any(flannel_in_saves(lab, key).values())


def nft_delete_rule(lab: Lab, key: Key, chain: str, index: int) -> None:
    """Delete the chain's index-th rule by its handle (nft's JSON interface, as the node)."""
    doc = json.loads(out(lab, key, "nft", "-j", "list", "chain", "ip", "flannel-ipv4", chain))
    handles = [o["rule"]["handle"] for o in doc["nftables"] if "rule" in o]
    rule = {"family": "ip", "table": "flannel-ipv4", "chain": chain, "handle": handles[index]}
    doc = {"nftables": [{"delete": {"rule": rule}}]}
    lab.run(key, ["nft", "-j", "-f", "-"], input=json.dumps(doc).encode(), check=True)


# --- packets ----------------------------------------------------------------------------------


def source_seen_outside(lab: NetnsLab) -> str | None:
    """A UDP datagram from the pod (a new flow each call) to the outside host: the source
    address it arrives with there (None: it did not arrive)."""
    with lab.socket("out", socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((OUT_ADDR, 0))
        rx.settimeout(2.0)
        with lab.socket("pod", socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"masq?", (OUT_ADDR, rx.getsockname()[1]))
            try:
                _, (src, _) = rx.recvfrom(64)
            except TimeoutError:
                return None
    return str(src)


def ping_answered(lab: NetnsLab) -> bool:
    """ICMP echo pod -> outside: answered only if masqueraded (outside cannot route back)."""
    return lab.run("pod", ["ping", "-c", "1", "-W", "1", OUT_ADDR]).returncode == 0


# --- nftables mode ----------------------------------------------------------------------------


def test_nftables_rules_exactly_flannels(lab: NetnsLab) -> None:
    fw = nft_fw(lab)
    assert in_node(lab, fw.missing) == 2 + 7 + 3  # nothing yet: two tables, two chains, 8 rules
    in_node(lab, fw.ensure)
    assert_nft_mode(lab, "node", str(POD))
    assert in_node(lab, fw.missing) == 0
    assert iptables_rules(lab, "node", "iptables-nft") == NO_IPTABLES


def test_nftables_resynced_after_deletion_and_another_subnet_replaces(lab: NetnsLab) -> None:
    fw = nft_fw(lab)
    in_node(lab, fw.ensure)
    nft_delete_rule(lab, "node", "postrtg", 2)
    assert in_node(lab, fw.missing) == 1
    in_node(lab, fw.ensure)
    assert_nft_mode(lab, "node", str(POD))
    assert in_node(lab, fw.missing) == 0
    lab.run("node", ["nft", "delete", "chain", "ip", "flannel-ipv4", "forward"], check=True)
    assert in_node(lab, fw.missing) == 3
    lab.run("node", ["nft", "delete", "table", "ip", "flannel-ipv4"], check=True)
    assert in_node(lab, fw.missing) == 1 + 7 + 3
    in_node(lab, fw.ensure)
    assert_nft_mode(lab, "node", str(POD))
    # a restart with another lease: one transaction leaves only the new subnet's rules
    in_node(lab, nft_fw(lab, POD2).ensure)
    assert_nft_mode(lab, "node", str(POD2))


def test_nftables_fully_random_disabled(lab: NetnsLab) -> None:
    in_node(lab, nft_fw(lab, fully_random=False).ensure)
    assert_nft_mode(lab, "node", str(POD), fully_random=False)


# --- iptables mode ----------------------------------------------------------------------------


def test_iptables_rules_exactly_flannels_and_resynced(lab: NetnsLab) -> None:
    fw = ipt_fw(lab)
    assert fw.tool.binary.endswith("/iptables-nft")  # an empty host: nft, like the wrapper
    in_node(lab, fw.ensure)
    assert iptables_rules(lab, "node", "iptables-nft") == want_iptables(str(POD))
    assert in_node(lab, fw.missing) == 0
    lab.run("node", ["iptables-nft", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"], check=True)
    lab.run("node", ["iptables-nft", "-w", "-D", "FORWARD", "1"], check=True)
    assert in_node(lab, fw.missing) == 2
    in_node(lab, fw.ensure)
    assert iptables_rules(lab, "node", "iptables-nft") == want_iptables(str(POD))
    in_node(lab, ipt_fw(lab, POD2).ensure)  # another lease: only its rules
    assert iptables_rules(lab, "node", "iptables-nft") == want_iptables(str(POD2))
    in_node(lab, ipt_fw(lab, POD2, fully_random=False).ensure)
    plain = want_iptables(str(POD2), random_fully=False)
    assert iptables_rules(lab, "node", "iptables-nft") == plain


def test_iptables_backend_follows_the_hosts_rules(lab: NetnsLab) -> None:
    for chain, opt in (("INPUT", "-i"), ("OUTPUT", "-o")):
        lab.run(
            "node", ["iptables-legacy", "-w", "-A", chain, opt, "lo", "-j", "ACCEPT"], check=True
        )
    fw = ipt_fw(lab)
    assert fw.tool.binary.endswith("/iptables-legacy")  # 2 legacy rules > 0 nft rules
    in_node(lab, fw.ensure)
    assert iptables_rules(lab, "node", "iptables-legacy") == want_iptables(str(POD))
    saves = flannel_in_saves(lab, "node")
    assert saves["iptables-nft"] == [] and len(saves["iptables-legacy"]) == 2 + 2 + 8


# --- both modes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fully_random"),
    [("nftables", True), ("iptables", True), ("nftables", False), ("iptables", False)],
)
def test_pod_traffic_leaves_masqueraded(lab: NetnsLab, mode: str, fully_random: bool) -> None:
    assert source_seen_outside(lab) == POD_ADDR  # forwarded as it is without the rules
    assert not ping_answered(lab)
    make = nft_fw if mode == "nftables" else ipt_fw
    in_node(lab, make(lab, fully_random=fully_random).ensure)
    assert source_seen_outside(lab) == NODE_OUT
    assert ping_answered(lab)


def test_each_mode_removes_the_others_rules(lab: NetnsLab) -> None:
    # flanneld's iptables rules in both backends (e.g. written by two differently set up runs)
    rules = masq_rules(NET, POD) + forward_rules(NET)
    for binary in ("iptables-legacy", "iptables-nft"):
        in_node(lab, lambda b=binary: Iptables(b).install(rules))
    assert all(flannel_in_saves(lab, "node")[b] for b in ("iptables-legacy", "iptables-nft"))
    in_node(lab, nft_fw(lab).ensure)  # iptables -> nftables
    assert no_flannel_chains(lab, "node")
    assert_nft_mode(lab, "node", str(POD))
    assert source_seen_outside(lab) == NODE_OUT
    in_node(lab, ipt_fw(lab).ensure)  # nftables -> iptables
    assert [t for t in nft_tables(lab, "node") if t[1].startswith("flannel-")] == []
    assert iptables_rules(lab, "node", "iptables-nft") == want_iptables(str(POD))
    assert source_seen_outside(lab) == NODE_OUT


# --- a real node, switched between modes by the network config --------------------------------

CLUSTER_MISSING = cluster_missing_requirements()


@pytest.mark.skipif(bool(CLUSTER_MISSING), reason=", ".join(CLUSTER_MISSING))
def test_real_node_switches_iptables_nftables_iptables() -> None:
    cl = Cluster(nodes=1, prefix=NS_PREFIX)
    try:
        args = ["--ip-masq", "--iptables-resync", "1"]

        def run(nftables: bool) -> str:
            config = {"Network": OVERLAY_NETWORK, "Backend": {"Type": "udp"}}
            cl.put_config({**config, "EnableNFTables": nftables})
            node = cl.start_etcd_node(0, extra_args=args)
            return node.subnet()

        pod = run(nftables=False)
        assert iptables_rules(cl, 0, "iptables") == want_iptables(pod, OVERLAY_NETWORK)
        assert cl.node(0).stop() == 0
        assert iptables_rules(cl, 0, "iptables") == want_iptables(pod, OVERLAY_NETWORK)  # kept

        assert run(nftables=True) == pod
        assert no_flannel_chains(cl, 0)
        tables = [t for t in nft_tables(cl, 0) if t[1].startswith("flannel-")]
        assert sorted(tables) == [("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")]
        want = nft_rules(pod, OVERLAY_NETWORK)
        assert nft_chain(cl, 0, "postrtg")[2] == want
        assert nft_chain(cl, 0, "forward")[2] == [
            "type filter hook forward priority filter; policy accept;",
            f"ip saddr {OVERLAY_NETWORK} accept",
            f"ip daddr {OVERLAY_NETWORK} accept",
        ]
        nft_delete_rule(cl, 0, "postrtg", 4)  # back within --iptables-resync 1
        t0 = time.monotonic()
        while nft_chain(cl, 0, "postrtg")[2] != want:
            assert time.monotonic() - t0 < 2.5, nft_chain(cl, 0, "postrtg")
            time.sleep(0.1)
        assert cl.node(0).stop() == 0
        assert nft_chain(cl, 0, "postrtg")[2] == want  # kept

        assert run(nftables=False) == pod
        assert [t for t in nft_tables(cl, 0) if t[1].startswith("flannel-")] == []
        assert iptables_rules(cl, 0, "iptables") == want_iptables(pod, OVERLAY_NETWORK)
        assert cl.node(0).stop() == 0
    finally:
        cl.close()
