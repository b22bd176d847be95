"""flannel's iptables rules: FLANNEL-POSTRTG (--ip-masq) in nat and FLANNEL-FWD
(--iptables-forward-rules) in filter, with flannel's exact rule text and comments; install
with one iptables-restore per table, check for the periodic resync, remove on shutdown.
Only runs the iptables binaries; knows nothing of packets or etcd.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

from .firewall import FirewallError

MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"


class IptablesError(FirewallError):
    """An iptables command failed (message says which, in one line)."""


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]


def _c(comment: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", comment)


def masq_rules(
    network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, random_fully: bool = True
) -> list[Rule]:
    """flannel's masquerade rule set (flannel-compat.md §5.1), in order."""
    net, pod, c = str(network), str(subnet), _c(MASQ_COMMENT)
    rf = ("--random-fully",) if random_fully else ()
    chain = "FLANNEL-POSTRTG"
    return [
        Rule("nat", "POSTROUTING", (*c, "-j", chain)),
        Rule("nat", chain, ("-m", "mark", "--mark", "0x4000/0x4000", *c, "-j", "RETURN")),
        Rule("nat", chain, ("-s", pod, "-d", net, *c, "-j", "RETURN")),
        Rule("nat", chain, ("-s", net, "-d", pod, *c, "-j", "RETURN")),
        Rule("nat", chain, ("!", "-s", net, "-d", pod, *c, "-j", "RETURN")),
        Rule("nat", chain, ("-s", net, "!", "-d", "224.0.0.0/4", *c, "-j", "MASQUERADE", *rf)),
        Rule("nat", chain, ("!", "-s", net, "-d", net, *c, "-j", "MASQUERADE", *rf)),
    ]


def forward_rules(network: ipaddress.IPv4Network) -> list[Rule]:
    """flannel's FORWARD accept rules (flannel-compat.md §5.2), in order."""
    net, c, chain = str(network), _c(FWD_COMMENT), "FLANNEL-FWD"
    return [
        Rule("filter", "FORWARD", (*c, "-j", chain)),
        Rule("filter", chain, ("-s", net, *c, "-j", "ACCEPT")),
        Rule("filter", chain, ("-d", net, *c, "-j", "ACCEPT")),
    ]


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


class Iptables:
    """Runs iptables / iptables-restore (with -w, the xtables lock)."""

    def __init__(self, binary: str = "iptables") -> None:
        path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        if not path:
            raise IptablesError(f"{binary} not found: --ip-masq and forward rules need it")
        self.binary = path
        restore = shutil.which(f"{binary}-restore", path=f"{path.rsplit('/', 1)[0]}")
        if not restore:
            raise IptablesError(f"{binary}-restore not found next to {path}")
        self.restore = restore

    def _run(
        self, *args: str, check: bool = True, stdin: str | None = None, binary: str | None = None
    ) -> bool:
        cmd = [binary or self.binary, *args]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
            raise IptablesError(f"{' '.join(cmd[:6])}...: {msg}")
        return r.returncode == 0

    def exists(self, rule: Rule) -> bool:
        return self._run("-w", "-t", rule.table, "-C", rule.chain, *rule.spec, check=False)

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._run("-w", "-t", table, "-S", chain, check=False)

    def install(self, rules: list[Rule]) -> None:
        """Make the rules present, in order and contiguous: our chains are (re)declared,
        which flushes them, and the jump from the built-in chain is deleted if present and
        appended again, all in one iptables-restore --noflush per table."""
        for table in dict.fromkeys(r.table for r in rules):
            ours = [r for r in rules if r.table == table]
            own_chains = dict.fromkeys(r.chain for r in ours if r.chain.startswith("FLANNEL-"))
            lines = [f"*{table}"] + [f":{ch} - [0:0]" for ch in own_chains]
            for r in ours:
                if r.chain not in own_chains and self.exists(r):
                    lines.append(" ".join(["-D", r.chain, *map(_quote, r.spec)]))
                lines.append(" ".join(["-A", r.chain, *map(_quote, r.spec)]))
            lines.append("COMMIT")
            self._run("-w", "--noflush", stdin="\n".join(lines) + "\n", binary=self.restore)

    def missing(self, rules: list[Rule]) -> list[Rule]:
        return [r for r in rules if not self.exists(r)]

    def remove(self, rules: list[Rule]) -> None:
        """Delete the jumps, then flush and delete our chains; what is already gone is fine."""
        for r in rules:
            if not r.chain.startswith("FLANNEL-"):
                while self.exists(r):
                    self._run("-w", "-t", r.table, "-D", r.chain, *r.spec, check=False)
        for table, chain in dict.fromkeys(
            (r.table, r.chain) for r in rules if r.chain.startswith("FLANNEL-")
        ):
            if self.chain_exists(table, chain):
                self._run("-w", "-t", table, "-F", chain, check=False)
                self._run("-w", "-t", table, "-X", chain, check=False)


class IptablesFirewall:
    """host.firewall.Firewall through iptables: FLANNEL-POSTRTG (with --ip-masq) and
    FLANNEL-FWD (with forward rules) for one network and subnet."""

    name = "iptables"

    def __init__(
        self,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        *,
        ip_masq: bool,
        forward: bool,
        tool: Iptables | None = None,
    ) -> None:
        self.tool = tool or Iptables()
        self.rules = (masq_rules(network, subnet) if ip_masq else []) + (
            forward_rules(network) if forward else []
        )

    def ensure(self) -> None:
        self.tool.install(self.rules)

    def missing(self) -> int:
        return len(self.tool.missing(self.rules))
