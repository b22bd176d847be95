"""flannel's nftables mode ("EnableNFTables": true): tables flannel-ipv4 / flannel-ipv6, chain
postrtg (--ip-masq) and chain forward (forward rules), named, commented, hooked and ordered as
flannel's trafficmngr/nftables has them.  Talks to the `nft` binary only through its JSON
interface (`nft -j -f -` with a document built here as Python structures, `nft -j list table`
to read back).  Must not: build nft script text, or know of packets or etcd.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .firewall import FirewallError

log = logging.getLogger(__name__)

IPV4_TABLE = "flannel-ipv4"
IPV6_TABLE = "flannel-ipv6"
TABLES = (("ip", IPV4_TABLE), ("ip6", IPV6_TABLE))
POSTRTG_CHAIN = "postrtg"
FORWARD_CHAIN = "forward"
POSTRTG_COMMENT = "chain to manage traffic masquerading by flannel"
FORWARD_COMMENT = "chain to accept flannel traffic"
PROBE_CHAIN = "masqueradeTest"  # flannel's fully-random probe, only ever --check'ed
PROBE_COMMENT = "chain to test if masquerade random fully is supported"
KUBE_PROXY_MARK = 0x4000
# knftables' named priorities as the kernel stores them (nft -j lists them as numbers)
SRCNAT_PRIORITY = 100
FILTER_PRIORITY = 0
MULTICAST = {"ip": "224.0.0.0/4", "ip6": "ff00::/8"}

Json = dict[str, Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NftablesError(FirewallError):
    """An nft command failed (message says which, in one line)."""


def table_comment(name: str) -> str:
    return f"rules for {name}"


# --- rule expressions (nft JSON, in the shapes `nft -j list` gives back) ------------------------


def _addr(family: str, field: str) -> Json:
    return {"payload": {"protocol": family, "field": field}}


def _prefix(net: IPNetwork | str) -> Json:
    n = ipaddress.ip_network(net)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _masquerade(fully_random: bool) -> Json:
    return {"masquerade": {"flags": "fully-random"} if fully_random else None}


@dataclass(frozen=True)
class Chain:
    """One of our base chains and its rules (each rule an nft JSON expression list), in order."""

    family: str  # "ip" or "ip6"
    table: str
    name: str
    type: str
    hook: str
    prio: int
    comment: str
    rules: tuple[list[Json], ...]


def masq_chain(
    family: str, network: IPNetwork, subnet: IPNetwork, fully_random: bool = True
) -> Chain:
    """flannel's postrtg chain and its six rules, in flannel's order.  Rule 4 is flannel's own:
    `saddr != <subnet> daddr <network> return` (its iptables twin reads `! -s <network>`), so
    traffic from the host into the overlay is not masqueraded in nftables mode: as flannel."""
    net, pod = _prefix(network), _prefix(subnet)
    saddr, daddr = _addr(family, "saddr"), _addr(family, "daddr")
    ret = {"return": None}
    masq = _masquerade(fully_random)
    rules = (
        # not what kube-proxy marked for its own masquerade (no double NAT)
        [_match({"meta": {"key": "mark"}}, KUBE_PROXY_MARK), ret],
        # nothing within the overlay
        [_match(saddr, pod), _match(daddr, net), ret],
        [_match(saddr, net), _match(daddr, pod), ret],
        [_match(saddr, pod, "!="), _match(daddr, net), ret],
        # pods to anywhere but multicast
        [_match(saddr, net), _match(daddr, _prefix(MULTICAST[family]), "!="), masq],
        # anything else into the overlay
        [_match(saddr, net, "!="), _match(daddr, net), masq],
    )
    table = IPV4_TABLE if family == "ip" else IPV6_TABLE
    return Chain(
        family, table, POSTRTG_CHAIN, "nat", "postrouting", SRCNAT_PRIORITY, POSTRTG_COMMENT, rules
    )


def forward_chain(family: str, network: IPNetwork) -> Chain:
    """flannel's forward chain: accept from and to the overlay network."""
    net = _prefix(network)
    rules = (
        [_match(_addr(family, "saddr"), net), {"accept": None}],
        [_match(_addr(family, "daddr"), net), {"accept": None}],
    )
    table = IPV4_TABLE if family == "ip" else IPV6_TABLE
    return Chain(
        family, table, FORWARD_CHAIN, "filter", "forward", FILTER_PRIORITY, FORWARD_COMMENT, rules
    )


# --- documents --------------------------------------------------------------------------------

_METAINFO: Json = {"metainfo": {"json_schema_version": 1}}


def _table_obj(family: str, name: str, comment: bool = False) -> Json:
    obj: Json = {"family": family, "name": name}
    if comment:
        obj["comment"] = table_comment(name)
    return {"table": obj}


def _chain_ref(c: Chain) -> Json:
    return {"chain": {"family": c.family, "table": c.table, "name": c.name}}


def _chain_obj(c: Chain) -> Json:
    ref = _chain_ref(c)["chain"]
    return {"chain": {**ref, "type": c.type, "hook": c.hook, "prio": c.prio, "comment": c.comment}}


def _rule_obj(c: Chain, expr: list[Json]) -> Json:
    return {"rule": {"family": c.family, "table": c.table, "chain": c.name, "expr": expr}}


def ensure_document(chains: list[Chain], tables: tuple[tuple[str, str], ...] = TABLES) -> Json:
    """One transaction: add the tables, then per chain add it, flush it, add its rules.

    The comments are in the document as flannel words them; nft 1.0.6 (Debian 12) reads no
    table or chain comment from JSON and drops them, later nft keeps them."""
    cmds: list[Json] = [_METAINFO]
    cmds += [{"add": _table_obj(family, name, comment=True)} for family, name in tables]
    for c in chains:
        cmds.append({"add": _chain_obj(c)})
        cmds.append({"flush": _chain_ref(c)})
        cmds += [{"add": _rule_obj(c, expr)} for expr in c.rules]
    return {"nftables": cmds}


def delete_tables_document(tables: list[tuple[str, str]]) -> Json:
    return {"nftables": [_METAINFO] + [{"delete": _table_obj(f, n)} for f, n in tables]}


def probe_document() -> Json:
    """flannel's check for `masquerade fully-random`: run with --check, never committed."""
    probe = Chain(
        "ip",
        IPV4_TABLE,
        PROBE_CHAIN,
        "nat",
        "postrouting",
        SRCNAT_PRIORITY,
        PROBE_COMMENT,
        ([_match(_addr("ip", "saddr"), "127.0.0.1", "!="), _masquerade(True)],),
    )
    return ensure_document([probe], tables=(("ip", IPV4_TABLE),))


# --- reading back -----------------------------------------------------------------------------


def _normal(expr: list[Json]) -> list[Json]:
    """An expression list as nft lists it: a one-element flag list is listed as its string."""
    out = []
    for e in expr:
        m = e.get("masquerade")
        if isinstance(m, dict) and isinstance(m.get("flags"), list) and len(m["flags"]) == 1:
            e = {"masquerade": {**m, "flags": m["flags"][0]}}
        out.append(e)
    return out


def chain_missing(c: Chain, listing: list[Json] | None) -> int:
    """How many of chain c's parts `nft -j list table` output (None: no table) lacks: the
    chain itself (1, with all its rules), its hook (1), each rule not where it belongs."""
    if listing is None:
        return 1 + len(c.rules)
    found = [o["chain"] for o in listing if o.get("chain", {}).get("name") == c.name]
    if not found:
        return 1 + len(c.rules)
    head = found[0]
    n = int((head.get("type"), head.get("hook"), head.get("prio")) != (c.type, c.hook, c.prio))
    have = [_normal(o["rule"]["expr"]) for o in listing if o.get("rule", {}).get("chain") == c.name]
    want = [_normal(r) for r in c.rules]
    if have != want:
        n += max(1, sum(1 for r in want if r not in have))
    return n


# --- the tool ---------------------------------------------------------------------------------


class Nft:
    """Runs `nft -j` (the JSON interface) with documents built as Python structures."""

    def __init__(self, binary: str = "nft") -> None:
        path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        if not path:
            raise NftablesError(
                f'{binary} not found: "EnableNFTables": true needs it (Debian package nftables)'
            )
        self.binary = path

    def _nft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.binary, *args], input=stdin, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftablesError(f"nft {' '.join(args)}: {e}") from None

    def apply(self, doc: Json, check: bool = False) -> None:
        """One transaction: every command in doc or none (`nft -j [-c] -f -`)."""
        args = ("-j", "-c", "-f", "-") if check else ("-j", "-f", "-")
        r = self._nft(*args, stdin=json.dumps(doc))
        if r.returncode != 0:
            lines = [ln.strip() for ln in r.stderr.splitlines() if "Error" in ln]
            msg = (lines or r.stderr.strip().splitlines() or ["failed"])[0]
            raise NftablesError(f"nft {' '.join(args)}: {msg.removeprefix('internal:0:0-0: ')}")

    def list_table(self, family: str, name: str) -> list[Json] | None:
        """The table's objects from `nft -j list table` (None when there is no such table)."""
        r = self._nft("-j", "list", "table", family, name)
        if r.returncode != 0:
            if "No such file or directory" in r.stderr:
                return None
            msg = (r.stderr.strip().splitlines() or ["failed"])[0]
            raise NftablesError(f"nft -j list table {family} {name}: {msg}")
        objs: list[Json] = json.loads(r.stdout)["nftables"]
        return objs

    def tables(self) -> list[tuple[str, str]]:
        r = self._nft("-j", "list", "tables")
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["failed"])[0]
            raise NftablesError(f"nft -j list tables: {msg}")
        objs = json.loads(r.stdout)["nftables"]
        return [(o["table"]["family"], o["table"]["name"]) for o in objs if "table" in o]

    def supports_fully_random(self) -> bool:
        try:
            self.apply(probe_document(), check=True)
        except NftablesError as e:
            log.warning("nftables: masquerade fully-random unsupported (%s)", e)
            return False
        return True


def remove_flannel_tables(tool: Nft | None = None) -> int:
    """Delete flannel's nftables tables where they are (what nftables mode left, for iptables
    mode); how many were deleted.  Without the nft binary there is nothing to do."""
    if tool is None:
        try:
            tool = Nft()
        except NftablesError:
            return 0
    try:
        listed = tool.tables()
    except NftablesError as e:  # nft there but no nf_tables to ask: none of ours either
        log.debug("nftables mode's tables not looked for: %s", e)
        return 0
    present = [t for t in listed if t in TABLES]
    if present:
        tool.apply(delete_tables_document(present))
        log.info("nftables mode's tables removed: %s", ", ".join(n for _, n in present))
    return len(present)


class NftablesFirewall:
    """host.firewall.Firewall through nftables: flannel-ipv4's postrtg (with --ip-masq) and
    forward (with forward rules) chains for one network and subnet."""

    name = "nftables"

    def __init__(
        self,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        *,
        ip_masq: bool,
        forward: bool,
        fully_random: bool = True,
        ipv6_network: ipaddress.IPv6Network | None = None,
        tool: Nft | None = None,
        remove_other: Callable[[], object] | None = None,
    ) -> None:
        self.tool = tool or Nft()
        self.remove_other = remove_other
        chains = []
        if ip_masq:
            fully_random = fully_random and self.tool.supports_fully_random()
            chains.append(masq_chain("ip", network, subnet, fully_random))
        if forward:
            chains.append(forward_chain("ip", network))
        # IPv6: flannel accepts an IPv6 network's traffic in flannel-ipv6's forward chain; its
        # masquerade chain needs this node's IPv6 subnet, which the seam does not carry (the
        # UDP data plane is IPv4-only), so there is none.
        if forward and ipv6_network is not None:
            chains.append(forward_chain("ip6", ipv6_network))
        self.chains = chains
        # Both tables always: flannel's Init creates flannel-ipv6 (empty) even without IPv6.
        self.tables = TABLES

    def document(self) -> Json:
        return ensure_document(self.chains, self.tables)

    def ensure(self) -> None:
        self.tool.apply(self.document())
        if self.remove_other is not None:
            self.remove_other()

    def missing(self) -> int:
        listings = {t: self.tool.list_table(*t) for t in self.tables}
        n = sum(1 for t in self.tables if listings[t] is None)
        return n + sum(chain_missing(c, listings[(c.family, c.table)]) for c in self.chains)
