# Multi-queue data plane in real daemons (--queues N): a multi-queue TUN, an SO_REUSEPORT socket
# and a thread per queue, flows steered so each stays on one queue in both directions, and
# interop with a single-queue node (the wire format does not change).
# Must not: touch anything outside the namespaces the testbed creates.
from __future__ import annotations

from typing import Any

import pytest

from udpbackend.lab.daemons import Node
from udpbackend.lab.testbed import Testbed

pytestmark = pytest.mark.netns

B_TUN = Testbed.tun_addr("b")


def queue_packets(node: Node, direction: str, total: int) -> list[int]:
    """Per-queue packets passed on in ``direction`` once the stats file shows ``total``."""
    st = node.wait_stats(lambda s: s["stats"][direction]["tx_packets"] >= total, timeout=5.0)
    return [q[direction] for q in st["per_queue"]]


def start_pair(tb: Testbed, qa: int, qb: int, extra: tuple[str, ...] = ()) -> tuple[Node, Node]:
    a = tb.start_node("a", extra_args=("--queues", str(qa), *extra))
    b = tb.start_node("b", extra_args=("--queues", str(qb), *extra))
    return a, b


def test_flows_spread_over_queues_and_each_stays_on_one(testbed: Testbed) -> None:
    a, b = start_pair(testbed, 2, 2)
    assert a.wait_stats(lambda s: True)["queues"] == 2
    # Sixteen streams: with two queues picked per flow by a hash (ours on ingress, the TUN's
    # on egress) all of them land on one queue with probability 2^-15; with eight it was 2^-7,
    # and one CI run in about twenty hit it.
    res = testbed.iperf3("a", B_TUN, seconds=2, extra=("-P", "16"))
    assert res.bytes > 0, res.raw.get("end")
    sent = a.stats()["stats"]["egress"]["tx_packets"]
    egress = queue_packets(a, "egress", sent)
    ingress = queue_packets(b, "ingress", sent)
    # Each queue gets a real share.
    for name, per_queue in (("A egress", egress), ("B ingress", ingress)):
        assert min(per_queue) > 0.05 * sum(per_queue), f"{name} not spread: {per_queue}"


def test_one_flow_stays_on_one_queue(testbed: Testbed) -> None:
    """A single TCP stream is never split across queues (no reordering by design)."""
    a, b = start_pair(testbed, 2, 2)
    res = testbed.iperf3("a", B_TUN, seconds=2)
    assert res.bytes > 0
    sent = a.stats()["stats"]["egress"]["tx_packets"]
    for node, direction in ((a, "egress"), (b, "ingress")):
        per_queue = queue_packets(node, direction, sent)
        # iperf3's control connection is a second flow of a few dozen packets.
        assert max(per_queue) >= sum(per_queue) - 200, f"{direction}: {per_queue}"


@pytest.mark.parametrize("qa, qb", [(2, 1), (1, 3)])
def test_multi_queue_node_talks_to_single_queue_node(testbed: Testbed, qa: int, qb: int) -> None:
    start_pair(testbed, qa, qb)
    for src, dst in (("a", B_TUN), ("b", Testbed.tun_addr("a"))):
        res = testbed.ping(src, dst, count=5, interval=0.01)
        assert res.received == 5, res.output
    assert testbed.iperf3("a", B_TUN, seconds=1, extra=("-P", "4")).bytes > 0


@pytest.mark.parametrize("extra", [("--driver", "c"), ("--mode", "per-packet")])
def test_queues_in_other_drivers_and_modes(testbed: Testbed, extra: tuple[str, ...]) -> None:
    a, _ = start_pair(testbed, 2, 2, extra)
    res = testbed.ping("a", B_TUN, count=10, interval=0.01)
    assert res.received == 10, res.output
    assert testbed.iperf3("a", B_TUN, seconds=1, extra=("-P", "4")).bytes > 0
    assert a.wait_stats(lambda s: s["stats"]["egress"]["tx_packets"] > 10)["queues"] == 2


def test_tun_has_one_queue_per_worker(testbed: Testbed) -> None:
    testbed.start_node("a", extra_args=("--queues", "3"))
    with testbed.ipr("a") as ipr:
        link: Any = ipr.link("get", ifname="flannel0")[0]
    assert link.get_attr("IFLA_NUM_TX_QUEUES") >= 3
    assert link.get_attr("IFLA_NUM_RX_QUEUES") >= 3


def test_rt_priority_runs_only_the_queue_threads_in_sched_rr(testbed: Testbed) -> None:
    import os

    a, _ = start_pair(testbed, 2, 2, ("--rt-priority", "2"))
    res = testbed.ping("a", B_TUN, count=5, interval=0.01)
    assert res.received == 5, res.output
    policies = {}
    for tid in os.listdir(f"/proc/{a.pid}/task"):
        policies[int(tid)] = (os.sched_getscheduler(int(tid)), os.sched_getparam(int(tid)))
    rr = [t for t, (pol, prm) in policies.items() if pol == os.SCHED_RR]
    assert len(rr) == 2, f"one SCHED_RR thread per queue: {policies}"
    assert all(policies[t][1].sched_priority == 2 for t in rr)
    assert policies[a.pid][0] == os.SCHED_OTHER, "the control plane's thread stays normal"
