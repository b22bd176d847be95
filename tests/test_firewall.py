"""The firewall's rule sets without touching a firewall: the nft JSON documents of nftables mode
(flannel's tables, chains, priorities, comments and rule order), the iptables rule lists, the
iptables-wrapper backend choice, the --random-fully version test, the removal script for
nftables mode, and compose picking the class.  Pure: tools are fakes, no binary runs.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from typing import Any

import pytest

from udpbackend import cli
from udpbackend.control.network import NetworkConfig
from udpbackend.host import iptables as ipt
from udpbackend.host import nftables as nft
from udpbackend.host.firewall import FirewallError
from udpbackend.node import compose
from udpbackend.options import RunOptions

NET = ipaddress.IPv4Network("198.19.0.0/16")
POD = ipaddress.IPv4Network("198.19.7.0/24")
NET6 = ipaddress.IPv6Network("fd00:198:19::/56")


def cfg(**kw: Any) -> NetworkConfig:
    return NetworkConfig(
        network=NET,
        subnet_len=24,
        subnet_min=ipaddress.IPv4Address("198.19.1.0"),
        subnet_max=ipaddress.IPv4Address("198.19.255.0"),
        **kw,
    )


def p(addr: str, length: int) -> dict[str, Any]:
    return {"prefix": {"addr": addr, "len": length}}


def m(family: str, field: str, right: Any, op: str = "==") -> dict[str, Any]:
    left = {"payload": {"protocol": family, "field": field}}
    return {"match": {"op": op, "left": left, "right": right}}


def table(family: str, name: str) -> dict[str, Any]:
    return {"add": {"table": {"family": family, "name": name, "comment": f"rules for {name}"}}}


RET: dict[str, Any] = {"return": None}
MASQ_FR = {"masquerade": {"flags": "fully-random"}}
MASQ = {"masquerade": None}
MARK = {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 16384}}

# flannel's postrtg rules for network 198.19.0.0/16 and subnet 198.19.7.0/24, in its order
POSTRTG_RULES = [
    [MARK, RET],
    [m("ip", "saddr", p("198.19.7.0", 24)), m("ip", "daddr", p("198.19.0.0", 16)), RET],
    [m("ip", "saddr", p("198.19.0.0", 16)), m("ip", "daddr", p("198.19.7.0", 24)), RET],
    [m("ip", "saddr", p("198.19.7.0", 24), "!="), m("ip", "daddr", p("198.19.0.0", 16)), RET],
    [m("ip", "saddr", p("198.19.0.0", 16)), m("ip", "daddr", p("224.0.0.0", 4), "!="), MASQ_FR],
    [m("ip", "saddr", p("198.19.0.0", 16), "!="), m("ip", "daddr", p("198.19.0.0", 16)), MASQ_FR],
]
FORWARD_RULES = [
    [m("ip", "saddr", p("198.19.0.0", 16)), {"accept": None}],
    [m("ip", "daddr", p("198.19.0.0", 16)), {"accept": None}],
]


def _rule(chain: str, expr: list[Any], family: str = "ip", table: str = "flannel-ipv4") -> Any:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}}


# --- nftables: the documents ------------------------------------------------------------------


def test_ensure_document_is_flannels_transaction() -> None:
    chains = [nft.masq_chain("ip", NET, POD), nft.forward_chain("ip", NET)]
    ref_p = {"family": "ip", "table": "flannel-ipv4", "name": "postrtg"}
    ref_f = {"family": "ip", "table": "flannel-ipv4", "name": "forward"}
    assert nft.ensure_document(chains) == {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            table("ip", "flannel-ipv4"),
            table("ip6", "flannel-ipv6"),
            {
                "add": {
                    "chain": {
                        **ref_p,
                        "type": "nat",
                        "hook": "postrouting",
                        "prio": 100,
                        "comment": "chain to manage traffic masquerading by flannel",
                    }
                }
            },
            {"flush": {"chain": ref_p}},
            *[_rule("postrtg", r) for r in POSTRTG_RULES],
            {
                "add": {
                    "chain": {
                        **ref_f,
                        "type": "filter",
                        "hook": "forward",
                        "prio": 0,
                        "comment": "chain to accept flannel traffic",
                    }
                }
            },
            {"flush": {"chain": ref_f}},
            *[_rule("forward", r) for r in FORWARD_RULES],
        ]
    }
    json.dumps(nft.ensure_document(chains))  # plain JSON all through


def test_masquerade_without_fully_random() -> None:
    chain = nft.masq_chain("ip", NET, POD, fully_random=False)
    assert [r[-1] for r in chain.rules] == [RET, RET, RET, RET, MASQ, MASQ]


def test_ipv6_chains_use_ip6_and_flannels_multicast() -> None:
    pod6 = ipaddress.IPv6Network("fd00:198:19:7::/64")
    chain = nft.masq_chain("ip6", NET6, pod6)
    assert (chain.family, chain.table) == ("ip6", "flannel-ipv6")
    assert chain.rules[4][1] == m("ip6", "daddr", p("ff00::", 8), "!=")
    assert chain.rules[1][0] == m("ip6", "saddr", p("fd00:198:19:7::", 64))
    fwd = nft.forward_chain("ip6", NET6)
    assert fwd.rules[0] == [m("ip6", "saddr", p("fd00:198:19::", 56)), {"accept": None}]


def test_probe_and_delete_documents() -> None:
    probe = nft.probe_document()["nftables"]
    assert probe[1] == table("ip", "flannel-ipv4")
    assert probe[2]["add"]["chain"]["name"] == "masqueradeTest"
    assert probe[2]["add"]["chain"]["comment"] == (
        "chain to test if masquerade random fully is supported"
    )
    assert probe[4]["add"]["rule"]["expr"] == [m("ip", "saddr", "127.0.0.1", "!="), MASQ_FR]
    assert len(probe) == 5
    assert nft.delete_tables_document([("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")]) == {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"delete": {"table": {"family": "ip", "name": "flannel-ipv4"}}},
            {"delete": {"table": {"family": "ip6", "name": "flannel-ipv6"}}},
        ]
    }


# --- nftables: reading back -------------------------------------------------------------------


def listing(chains: list[nft.Chain]) -> list[Any]:
    """What `nft -j list table` gives for these chains (handles, policy, no comments: 1.0.6)."""
    out: list[Any] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "flannel-ipv4", "handle": 1}},
    ]
    h = 1
    for c in chains:
        out.append(
            {
                "chain": {
                    "family": c.family,
                    "table": c.table,
                    "name": c.name,
                    "handle": h,
                    "type": c.type,
                    "hook": c.hook,
                    "prio": c.prio,
                    "policy": "accept",
                }
            }
        )
        for expr in c.rules:
            h += 1
            rule = {"family": c.family, "table": c.table, "chain": c.name, "handle": h}
            out.append({"rule": {**rule, "expr": expr}})
    return out


def test_chain_missing_counts_what_is_not_there() -> None:
    masq, fwd = nft.masq_chain("ip", NET, POD), nft.forward_chain("ip", NET)
    full = listing([masq, fwd])
    assert nft.chain_missing(masq, full) == 0 and nft.chain_missing(fwd, full) == 0
    assert nft.chain_missing(masq, None) == 7  # no table: chain + 6 rules
    assert nft.chain_missing(masq, listing([fwd])) == 7
    one_gone = [o for o in full if o.get("rule", {}).get("handle") != 3]
    assert nft.chain_missing(masq, one_gone) == 1
    flushed = [o for o in full if o.get("rule", {}).get("chain") != "forward"]
    assert nft.chain_missing(fwd, flushed) == 2
    swapped = listing([nft.masq_chain("ip", NET, POD)])
    swapped[3], swapped[4] = swapped[4], swapped[3]
    assert nft.chain_missing(masq, swapped) == 1  # all there, out of order
    other_prio = listing([masq])
    other_prio[2]["chain"]["prio"] = 0
    assert nft.chain_missing(masq, other_prio) == 1
    # a flag list is what nft may be handed; a listing gives the single flag as a string
    as_list = listing([masq])
    as_list[-1]["rule"]["expr"][-1] = {"masquerade": {"flags": ["fully-random"]}}
    assert nft.chain_missing(masq, as_list) == 0


class FakeNft:
    def __init__(self, fully_random: bool = True) -> None:
        self.applied: list[tuple[Any, bool]] = []
        self.tables_: dict[tuple[str, str], list[Any] | None] = {}
        self.fully_random = fully_random
        self.probed = 0

    def apply(self, doc: Any, check: bool = False) -> None:
        self.applied.append((doc, check))

    def list_table(self, family: str, name: str) -> list[Any] | None:
        return self.tables_.get((family, name))

    def tables(self) -> list[tuple[str, str]]:
        return [t for t, v in self.tables_.items() if v is not None]

    def supports_fully_random(self) -> bool:
        self.probed += 1
        return self.fully_random


def test_nftables_firewall_ensure_is_one_transaction_then_removes_iptables_mode() -> None:
    tool, calls = FakeNft(), []
    fw = nft.NftablesFirewall(
        NET, POD, ip_masq=True, forward=True, tool=tool, remove_other=lambda: calls.append(1)
    )
    assert fw.name == "nftables"
    fw.ensure()
    assert tool.applied == [(fw.document(), False)] and calls == [1]
    assert fw.document() == nft.ensure_document(
        [nft.masq_chain("ip", NET, POD), nft.forward_chain("ip", NET)]
    )


def test_nftables_firewall_missing() -> None:
    tool = FakeNft()
    fw = nft.NftablesFirewall(NET, POD, ip_masq=True, forward=True, tool=tool)
    assert fw.missing() == 2 + 7 + 3  # two tables, both chains with their rules
    tool.tables_[("ip", "flannel-ipv4")] = listing(fw.chains)
    tool.tables_[("ip6", "flannel-ipv6")] = [{"table": {"family": "ip6", "name": "flannel-ipv6"}}]
    assert fw.missing() == 0


def test_fully_random_as_nft_and_the_flag_allow() -> None:
    plain = nft.NftablesFirewall(NET, POD, ip_masq=True, forward=False, tool=FakeNft(False))
    assert plain.chains[0].rules[-1][-1] == MASQ
    tool = FakeNft(True)
    off = nft.NftablesFirewall(NET, POD, ip_masq=True, forward=False, fully_random=False, tool=tool)
    assert off.chains[0].rules[-1][-1] == MASQ and tool.probed == 0
    fwd_only = nft.NftablesFirewall(NET, POD, ip_masq=False, forward=True, tool=FakeNft())
    assert [c.name for c in fwd_only.chains] == ["forward"]


def test_ipv6_network_adds_flannel_ipv6_forward_chain_only() -> None:
    fw = nft.NftablesFirewall(
        NET, POD, ip_masq=True, forward=True, ipv6_network=NET6, tool=FakeNft()
    )
    assert [(c.family, c.name) for c in fw.chains] == [
        ("ip", "postrtg"),
        ("ip", "forward"),
        ("ip6", "forward"),
    ]
    # without IPv6 the table is still created, as flannel's Init does
    assert nft.NftablesFirewall(NET, POD, ip_masq=True, forward=True, tool=FakeNft()).tables == (
        ("ip", "flannel-ipv4"),
        ("ip6", "flannel-ipv6"),
    )


def test_remove_flannel_tables_deletes_only_flannels() -> None:
    tool = FakeNft()
    tool.tables_ = {("ip", "nat"): [], ("ip", "flannel-ipv4"): [], ("inet", "flannel-ipv6"): []}
    assert nft.remove_flannel_tables(tool) == 1
    assert tool.applied == [(nft.delete_tables_document([("ip", "flannel-ipv4")]), False)]
    empty = FakeNft()
    assert nft.remove_flannel_tables(empty) == 0 and empty.applied == []

    class NoNfTables(FakeNft):  # nft installed, the kernel without nf_tables: iptables mode runs
        def tables(self) -> list[tuple[str, str]]:
            raise nft.NftablesError("nft -j list tables: Error: Operation not supported")

    assert nft.remove_flannel_tables(NoNfTables()) == 0


def test_missing_nft_binary_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(FirewallError) as e:
        nft.Nft()
    assert str(e.value) == (
        'nft not found: "EnableNFTables": true needs it (Debian package nftables)'
    )
    assert nft.remove_flannel_tables() == 0  # iptables mode without nft: nothing to remove


# --- iptables ---------------------------------------------------------------------------------

C = ("-m", "comment", "--comment", "flanneld masq")


def test_masq_rules_with_and_without_random_fully() -> None:
    rules = ipt.masq_rules(NET, POD)
    rf = ("-j", "MASQUERADE", "--random-fully")
    assert [r.spec for r in rules[-2:]] == [
        ("-s", "198.19.0.0/16", "!", "-d", "224.0.0.0/4", *C, *rf),
        ("!", "-s", "198.19.0.0/16", "-d", "198.19.0.0/16", *C, *rf),
    ]
    plain = ipt.masq_rules(NET, POD, random_fully=False)
    assert [r.spec[-1] for r in plain[-2:]] == ["MASQUERADE", "MASQUERADE"]
    assert plain[:-2] == rules[:-2]


class FakeIptables:
    def __init__(self, random_fully: bool) -> None:
        self.random_fully = random_fully
        self.installed: list[list[ipt.Rule]] = []

    def install(self, rules: list[ipt.Rule]) -> None:
        self.installed.append(rules)


@pytest.mark.parametrize(
    ("supported", "wanted", "expect"),
    [(True, True, True), (False, True, False), (True, False, False), (False, False, False)],
)
def test_iptables_firewall_random_fully(supported: bool, wanted: bool, expect: bool) -> None:
    tool = FakeIptables(supported)
    fw = ipt.IptablesFirewall(NET, POD, ip_masq=True, forward=True, fully_random=wanted, tool=tool)
    assert fw.rules == ipt.masq_rules(NET, POD, expect) + ipt.forward_rules(NET)


def test_iptables_firewall_ensure_then_removes_nftables_mode() -> None:
    tool, calls = FakeIptables(True), []
    fw = ipt.IptablesFirewall(
        NET, POD, ip_masq=True, forward=False, tool=tool, remove_other=lambda: calls.append(1)
    )
    fw.ensure()
    assert tool.installed == [fw.rules] and calls == [1]


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("iptables v1.8.9 (nf_tables)", True),
        ("iptables v1.8.9 (legacy)", True),
        ("iptables v1.6.2", True),
        ("iptables v1.6.1", False),
        ("iptables v1.4.21", False),
        ("iptables v2.0.0", True),
        ("", False),
    ],
)
def test_random_fully_from_version(version: str, ok: bool) -> None:
    assert ipt.has_random_fully(version) is ok


def save(*rules: str, chains: tuple[str, ...] = ()) -> str:
    head = ["# Generated by iptables-save", "*nat", ":POSTROUTING ACCEPT [0:0]"]
    return "\n".join([*head, *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""])


def test_pick_backend_as_iptables_wrapper() -> None:
    three = save("-A POSTROUTING -j A", "-A POSTROUTING -j B", "-A POSTROUTING -j C")
    one = save("-A POSTROUTING -j A")
    assert ipt.count_rules(three) == 3 and ipt.count_rules(save()) == 0
    assert ipt.pick_backend(three, one) == "legacy"
    assert ipt.pick_backend(one, three) == "nft"
    assert ipt.pick_backend(save(), save()) == "nft"  # empty host: nft, Debian's default
    assert ipt.pick_backend(one, one) == "nft"
    hint = save(chains=("KUBE-IPTABLES-HINT",))
    canary = save(chains=("KUBE-KUBELET-CANARY",))
    assert ipt.pick_backend(three, hint) == "nft"  # kubelet's chains beat the count
    assert ipt.pick_backend(canary, three) == "legacy"
    assert ipt.pick_backend(hint, hint) == "nft"


def test_detect_binary_asks_both_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipt, "_which", lambda name: f"/usr/sbin/{name}")
    outputs = {
        "iptables-legacy-save": save("-A POSTROUTING -j A", "-A POSTROUTING -j B"),
        "ip6tables-legacy-save": "",
        "iptables-nft-save": save("-A POSTROUTING -j A"),
        "ip6tables-nft-save": save("-A POSTROUTING -j A"),
    }
    asked: list[str] = []

    def run(argv: Any) -> Any:
        name = argv[0].rsplit("/", 1)[1]
        asked.append(name)
        import subprocess

        return subprocess.CompletedProcess(argv, 0, outputs[name], "")

    assert ipt.detect_binary(run) == "iptables-nft"  # 2 legacy rules, 2 nft: a tie
    outputs["ip6tables-legacy-save"] = save("-A POSTROUTING -j A")
    assert ipt.detect_binary(run) == "iptables-legacy"
    assert sorted(set(asked)) == sorted(outputs)
    monkeypatch.setattr(ipt, "_which", lambda name: None if "nft" in name else f"/sbin/{name}")
    assert ipt.detect_binary(run) == "iptables-legacy"  # only one installed: that one
    monkeypatch.setattr(ipt, "_which", lambda name: None)
    assert ipt.detect_binary(run) == "iptables"


def test_missing_iptables_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(FirewallError) as e:
        ipt.Iptables()
    assert str(e.value) == (
        "iptables not found: --ip-masq and the forward rules need it (Debian package "
        'iptables), or "EnableNFTables": true'
    )
    assert "\n" not in str(e.value)


def test_removal_script_deletes_jumps_then_chains() -> None:
    text = "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":FLANNEL-FWD - [0:0]",
            ":KEEP - [0:0]",
            "-A FORWARD -j KEEP",
            '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
            '-A FLANNEL-FWD -s 198.19.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
            "COMMIT",
            "*nat",
            ":POSTROUTING ACCEPT [0:0]",
            ":FLANNEL-POSTRTG - [0:0]",
            '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
            "-A FLANNEL-POSTRTG -j RETURN",
            "COMMIT",
            "*mangle",
            ":PREROUTING ACCEPT [0:0]",
            "COMMIT",
        ]
    )
    assert ipt.removal_script(text) == "\n".join(
        [
            "*filter",
            '-D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
            "-F FLANNEL-FWD",
            "-X FLANNEL-FWD",
            "COMMIT",
            "*nat",
            '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
            "-F FLANNEL-POSTRTG",
            "-X FLANNEL-POSTRTG",
            "COMMIT",
            "",
        ]
    )
    assert ipt.removal_script(save("-A POSTROUTING -j MASQUERADE")) == ""


# --- compose and the CLI ----------------------------------------------------------------------


class Recorder:
    def __init__(self, *args: Any, **kw: Any) -> None:
        self.args, self.kw = args, kw


def test_compose_picks_the_firewall_by_enable_nftables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft, "NftablesFirewall", type("N", (Recorder,), {}))
    monkeypatch.setattr(compose, "IptablesFirewall", type("I", (Recorder,), {}))
    opts = RunOptions(ip_masq=True, ip_masq_fully_random_disable=True)
    n: Any = compose.firewall(opts, cfg(enable_nftables=True), POD)
    assert type(n).__name__ == "N" and n.args == (NET, POD)
    assert n.kw == {
        "ip_masq": True,
        "forward": True,
        "fully_random": False,
        "ipv6_network": None,
        "remove_other": ipt.remove_flannel_chains,
    }
    i: Any = compose.firewall(RunOptions(), cfg(), POD)
    assert type(i).__name__ == "I" and i.args == (NET, POD)
    assert i.kw == {
        "ip_masq": False,
        "forward": True,
        "fully_random": True,
        "remove_other": nft.remove_flannel_tables,
    }
    v6: Any = compose.firewall(
        opts, cfg(enable_nftables=True, enable_ipv6=True, ipv6_network=NET6), POD
    )
    assert v6.kw["ipv6_network"] == NET6


def test_compose_missing_tool_is_a_firewall_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(FirewallError, match=r"^nft not found"):
        compose.firewall(RunOptions(ip_masq=True), cfg(enable_nftables=True), POD)
    with pytest.raises(FirewallError, match=r"^iptables not found"):
        compose.firewall(RunOptions(ip_masq=True), cfg(), POD)


def test_cli_ip_masq_fully_random_disable_is_a_real_flag() -> None:
    assert "--ip-masq-fully-random-disable" not in cli.UNSUPPORTED
    parser, _ = cli._parser()
    args = parser.parse_args(["run", "--ip-masq-fully-random-disable"])
    assert args.ip_masq_fully_random_disable is True
    assert cli.unsupported_warnings(args, {}) == []
    assert parser.parse_args(["run"]).ip_masq_fully_random_disable is False
    assert RunOptions().ip_masq_fully_random_disable is False
