"""The firewall seam: what the node lifecycle asks of flannel's masquerade and FORWARD rules,
whichever tool keeps them (host/iptables.py today, nftables beside it).  Must not: hold rule
text (each tool's module does) or decide when rules change (the lifecycle does).
"""

from __future__ import annotations

from typing import Protocol


class FirewallError(RuntimeError):
    """The rules could not be read or written; str() is one line for the user."""


class Firewall(Protocol):
    """One node's rule set for one network and subnet, fixed at construction."""

    name: str  # "iptables" or "nftables": for log lines

    def ensure(self) -> None:
        """Make every rule present, in order, rewriting our own chains in one transaction
        (so a previous run's rules for another subnet are replaced, never absent a moment),
        and remove what the other tool's mode left.  Blocking: run it in a thread."""
        ...

    def missing(self) -> int:
        """How many of the rules are not there now (someone deleted them).  Blocking."""
        ...
