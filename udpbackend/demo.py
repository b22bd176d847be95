"""`udpbackend demo`: two nodes in throw-away network namespaces, ping and iperf3 across.

Lives here: run_demo() and its friendly output. It drives the daemon only as a subprocess through
udpbackend.testbed, so it must not import the data plane (or anything but testbed). Everything it
creates is removed on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from .testbed import (
    OVERLAY_NETWORK,
    UDP_PORT,
    DaemonError,
    Node,
    PingResult,
    Testbed,
    TestbedError,
    missing_requirements,
)

PING_COUNT = 20
NS_PREFIX = "ubdemo"


def _fmt_ping(label: str, res: PingResult) -> str:
    if not res.received:
        return f"  {label}  {res.received}/{res.sent} replies"
    return (
        f"  {label}  {res.received}/{res.sent} replies  "
        f"p50 {res.p50_ms:.3f} ms  avg {res.avg_ms:.3f} ms"
    )


def counters_summary(stats: dict[str, Any]) -> dict[str, float]:
    """Totals from a daemon stats document: packets each way, drops, mean batch, syscalls/pkt."""
    st = stats.get("stats", {})
    eg, ing = st.get("egress", {}), st.get("ingress", {})
    rx = eg.get("rx_packets", 0) + ing.get("rx_packets", 0)
    batches = eg.get("batches", 0) + ing.get("batches", 0)
    drops = sum(eg.get("drops", {}).values()) + sum(ing.get("drops", {}).values())
    syscalls = sum(st.get("syscalls", {}).values())
    return {
        "tun_to_udp": eg.get("tx_packets", 0),
        "udp_to_tun": ing.get("tx_packets", 0),
        "drops": drops,
        "mean_batch": rx / batches if batches else 0.0,
        "syscalls_per_packet": syscalls / rx if rx else 0.0,
        "icmp": st.get("icmp_unreachable", 0) + st.get("icmp_time_exceeded", 0),
    }


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the demo runs, so cleanup happens either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper child: just die, never unwind our stack
            os._exit(128 + signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_demo(mode: str = "batched", seconds: float = 3.0, out: TextIO | None = None) -> int:
    """Build two namespaces, run a daemon in each, show ping/iperf3/counters, remove it all.

    Returns 0 on success, 1 on failure, 130 on Ctrl-C (nothing is left behind in any case).
    """
    out = sys.stdout if out is None else out

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    missing = missing_requirements()
    if missing:
        say(f"udpbackend demo needs {', '.join(missing)}; missing here")
        return 1
    try:
        with _sigterm_as_interrupt(), Testbed(prefix=NS_PREFIX) as tb:
            return _demo(tb, mode, seconds, say)
    except KeyboardInterrupt:
        say("\ninterrupted: daemons stopped, namespaces removed")
        return 130
    except (TestbedError, OSError) as e:
        say(f"demo failed: {e}")
        say("(daemons stopped, namespaces removed)")
        return 1


def _demo(tb: Testbed, mode: str, seconds: float, say: Any) -> int:
    say(f"udpbackend demo, mode {mode}: two nodes in network namespaces joined by a veth pair")
    for n in ("a", "b"):
        say(
            f"  node {n.upper()}  netns {tb.ns[n]:<20} {tb.veth(n)} {tb.underlay_addr(n)}/24  "
            f"flannel0 {tb.tun_addr(n)}  owns {tb.subnet(n)}"
        )
    say(f"  overlay {OVERLAY_NETWORK}: packets read from flannel0 travel in UDP port {UDP_PORT}")

    t0 = time.monotonic()
    say("starting the daemons ...")
    nodes: dict[str, Node] = {n: tb.start_node(n, mode) for n in ("a", "b")}
    state = tb.tun_state("a") or {}
    say(
        f"  ready in {time.monotonic() - t0:.1f} s (pids {nodes['a'].pid}, {nodes['b'].pid}; "
        f"TUN MTU {state.get('mtu', '?')})"
    )

    say(f"ping over the overlay ({PING_COUNT} each):")
    ok = True
    for src, dst in (("a", "b"), ("b", "a")):
        res = tb.ping(src, tb.tun_addr(dst), count=PING_COUNT, interval=0.01)
        ok &= res.received == res.sent
        say(_fmt_ping(f"{src.upper()} {tb.tun_addr(src)} -> {dst.upper()} {tb.tun_addr(dst)}", res))
    base = tb.ping("a", tb.underlay_addr("b"), count=PING_COUNT, interval=0.01)
    say(f"  (plain veth A -> B without overlay: p50 {base.p50_ms:.3f} ms)")

    secs = max(1, round(seconds))
    ip = tb.iperf3("a", tb.tun_addr("b"), seconds=secs)
    say(
        f"TCP throughput A -> B over the overlay (iperf3, {secs} s): "
        f"{ip.gbps:.2f} Gbit/s, {ip.retransmits} retransmits"
    )

    codes = {n: node.stop(check=False) for n, node in nodes.items()}
    say("daemon counters (final, after SIGTERM):")
    for n, node in nodes.items():
        try:
            c = counters_summary(node.stats())
        except TestbedError as e:
            say(f"  {n.upper()}  no stats: {e}")
            ok = False
            continue
        say(
            f"  {n.upper()}  tun->udp {c['tun_to_udp']:,} pkts  udp->tun {c['udp_to_tun']:,} pkts  "
            f"drops {c['drops']:,}  mean batch {c['mean_batch']:.1f}  "
            f"syscalls/pkt {c['syscalls_per_packet']:.2f}"
        )
    if any(codes.values()):
        for n, node in nodes.items():
            if codes[n]:
                say(f"daemon {n.upper()} exited with {codes[n]}:\n{node.log_tail(10)}")
        raise DaemonError(f"daemon exit codes {codes}")
    say("both daemons exited 0 and removed flannel0; removing the namespaces.")
    if not ok:
        say("some pings were lost")
        return 1
    return 0
