"""`udpbackend bench`: the overlay benchmark ladder, measured side by side in one invocation.

Where each part lives: rungs.py (what each rung sets up), measure.py (the protocol of one
rung), iperf.py (TCP throughput, UDP packet rate), rtt.py (ping RTT idle and loaded), cpu.py
(CPU from /proc), counters.py (the daemons' own counters), figures.py (medians, ratios),
schema.py (results.json), report.py (tables, files), chart.py, explain.py, ladder.py (the whole
invocation), command.py (flags, output), settings.py, progress.py, machine.py. Must not: touch
anything outside the namespaces its Testbed creates, leave a namespace or process behind, or
import rich/matplotlib at module import time.
"""

from .command import add_arguments, main, run
from .settings import BenchError

__all__ = ["BenchError", "add_arguments", "main", "run"]
