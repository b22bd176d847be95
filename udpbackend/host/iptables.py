"""flannel's iptables rules: FLANNEL-POSTRTG (--ip-masq) in nat and FLANNEL-FWD
(--iptables-forward-rules) in filter, with flannel's exact rule text and comments; install
with one iptables-restore per table, check for the periodic resync.  The backend (legacy or
nft) is the one the host's rules are in, as iptables-wrapper picks it; --random-fully where
iptables has it (>= 1.6.2, flannel's test).  Also removes FLANNEL-* from every backend (for
nftables mode).  Only runs the iptables binaries; knows nothing of packets or etcd.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .firewall import FirewallError

log = logging.getLogger(__name__)

MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
FLANNEL_CHAINS = ("FLANNEL-POSTRTG", "FLANNEL-FWD")
BACKENDS = ("legacy", "nft")
SBIN = "/usr/sbin:/sbin"
RANDOM_FULLY_SINCE = (1, 6, 2)  # go-iptables' HasRandomFully, which flannel asks


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


# --- which backend ----------------------------------------------------------------------------

_KUBELET_CHAINS = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.M)


def count_rules(save_output: str) -> int:
    """The rules in iptables-save output (its `-A` lines), as iptables-wrapper counts them."""
    return sum(1 for line in save_output.splitlines() if line.startswith("-"))


def pick_backend(legacy_save: str, nft_save: str) -> str:
    """iptables-wrapper's choice from both backends' iptables-save + ip6tables-save output:
    the one holding kubelet's marker chains (nft looked at first), else the one holding more
    rules; a tie (an empty host too) is nft, as the wrapper and Debian's default have it."""
    if _KUBELET_CHAINS.search(nft_save):
        return "nft"
    if _KUBELET_CHAINS.search(legacy_save):
        return "legacy"
    return "legacy" if count_rules(legacy_save) > count_rules(nft_save) else "nft"


def has_random_fully(version_output: str) -> bool:
    """`iptables --version` (e.g. "iptables v1.8.9 (nf_tables)") is 1.6.2 or later."""
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", version_output)
    return m is not None and tuple(int(g) for g in m.groups()) >= RANDOM_FULLY_SINCE


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def _run_quiet(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(list(argv), 1, "", str(e))


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _saves(backend: str, run: Runner) -> str:
    """Both families' iptables-save output of one backend ("" where it cannot say)."""
    out = []
    for family in ("iptables", "ip6tables"):
        path = _which(f"{family}-{backend}-save")
        if path:
            r = run([path])
            out.append(r.stdout if r.returncode == 0 else "")
    return "".join(out)


def detect_binary(run: Runner = _run_quiet) -> str:
    """The iptables to use: iptables-legacy or iptables-nft by pick_backend where both are
    installed (Debian's package has both), else whichever there is, else plain iptables."""
    have = [b for b in BACKENDS if _which(f"iptables-{b}")]
    if len(have) == 2:
        legacy, nft = _saves("legacy", run), _saves("nft", run)
        backend = pick_backend(legacy, nft)
        log.info(
            "iptables: %s backend (legacy holds %d rules, nft %d)",
            backend,
            count_rules(legacy),
            count_rules(nft),
        )
        return f"iptables-{backend}"
    return f"iptables-{have[0]}" if have else "iptables"


class Iptables:
    """Runs iptables / iptables-restore (with -w, the xtables lock) of one backend."""

    def __init__(self, binary: str | None = None) -> None:
        name = binary or detect_binary()
        path = _which(name)
        if not path:
            raise IptablesError(
                f"{name} not found: --ip-masq and the forward rules need it "
                '(Debian package iptables), or "EnableNFTables": true'
            )
        self.binary = path
        restore = shutil.which(f"{name}-restore", path=f"{path.rsplit('/', 1)[0]}")
        if not restore:
            raise IptablesError(f"{name}-restore not found next to {path}")
        self.restore = restore
        self.random_fully = has_random_fully(_run_quiet([path, "--version"]).stdout)

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


# --- nftables mode: what iptables mode left -----------------------------------------------


def removal_script(save_output: str) -> str:
    """iptables-restore --noflush input deleting flannel's chains and every jump to them from
    iptables-save output ("" when there are none)."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split(" ", 1)[0] in FLANNEL_CHAINS:
            tables.setdefault(table, ([], []))[1].append(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            words = line.split()
            chain, target = words[1], words[words.index("-j") + 1] if "-j" in words else ""
            if target in FLANNEL_CHAINS and chain not in FLANNEL_CHAINS:
                tables.setdefault(table, ([], []))[0].append("-D" + line[2:])
    out = []
    for name, (jumps, chains) in tables.items():
        out += [f"*{name}", *jumps]
        out += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def remove_flannel_chains(run: Runner = _run_quiet) -> int:
    """Delete FLANNEL-POSTRTG / FLANNEL-FWD and their jumps wherever they are: both backends
    (legacy, nft), IPv4 and IPv6 (what iptables mode left, for nftables mode).  How many
    backends had some; a backend not installed is skipped."""
    done = 0
    for backend in BACKENDS:
        for family in ("iptables", "ip6tables"):
            save = _which(f"{family}-{backend}-save")
            restore = _which(f"{family}-{backend}-restore")
            if not (save and restore):
                continue
            r = run([save])
            script = removal_script(r.stdout) if r.returncode == 0 else ""
            if not script:
                continue
            res = _run_quiet([restore, "-w", "--noflush"], stdin=script)
            if res.returncode != 0:
                msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
                raise IptablesError(f"{restore} (removing iptables mode's rules): {msg}")
            log.info("iptables mode's FLANNEL-* chains removed (%s-%s)", family, backend)
            done += 1
    return done


class IptablesFirewall:
    """host.firewall.Firewall through iptables: FLANNEL-POSTRTG (with --ip-masq) and
    FLANNEL-FWD (with forward rules) for one network and subnet.  fully_random=False is
    --ip-masq-fully-random-disable; remove_other clears nftables mode's rules after ensure."""

    name = "iptables"

    def __init__(
        self,
        network: ipaddress.IPv4Network,
        subnet: ipaddress.IPv4Network,
        *,
        ip_masq: bool,
        forward: bool,
        fully_random: bool = True,
        tool: Iptables | None = None,
        remove_other: Callable[[], object] | None = None,
    ) -> None:
        self.tool = tool or Iptables()
        self.remove_other = remove_other
        # a tool that cannot say (a test double) is taken to have --random-fully
        rf = fully_random and getattr(self.tool, "random_fully", True)
        self.rules = (masq_rules(network, subnet, rf) if ip_masq else []) + (
            forward_rules(network) if forward else []
        )

    def ensure(self) -> None:
        self.tool.install(self.rules)
        if self.remove_other is not None:
            self.remove_other()

    def missing(self) -> int:
        return len(self.tool.missing(self.rules))
