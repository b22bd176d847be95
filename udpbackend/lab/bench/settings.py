"""What one `udpbackend bench` invocation is asked to do: Settings, the full and --quick presets.

Also BenchError, the one-line user-facing problem (bad flag, missing tool; exit code 2). Must
not: measure anything or import the testbed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NS_PREFIX = "ubbench"  # the bench's namespaces: ubbench-<pid>-<n>-a / -b


class BenchError(Exception):
    """A user-facing problem (bad flag, missing tool): one line, exit code 2."""


@dataclass
class Settings:
    runs: int = 3
    tcp_seconds: int = 5
    udp_seconds: int = 1
    udp_probes: int = 4
    pings_idle: int = 300
    ping_interval: float = 0.005
    loaded_ping_interval: float = 0.01
    quick: bool = False
    zerocopy: bool = True
    underlay_mtu: int = 1500
    rungs: list[str] = field(default_factory=list)


FULL = Settings()
QUICK = Settings(runs=3, tcp_seconds=1, udp_seconds=1, udp_probes=2, pings_idle=60, quick=True)
