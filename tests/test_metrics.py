# udpbackend.node.metrics: the Prometheus exposition of the data-plane counters and control-plane
# state. Lives here: parsing render()'s output with prometheus_client's own text parser (names,
# types, labels, units, histogram shape, control metrics present or left out, no global state),
# and, in the netns tier, counters rising between two scrapes of a live daemon's stats file while
# traffic runs. Must not: need root for anything but the live test (marked and skipped).
from __future__ import annotations

import copy
import os
import shutil
from typing import Any

import pytest
from packets import ip, ipv4_icmp_echo
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from udpbackend.dataplane import packet, plane
from udpbackend.node import metrics

TUN_IP = ip("198.19.1.0")


def _contexts() -> list[Any]:
    out: list[Any] = [packet.Context]
    try:
        from udpbackend.dataplane import fastpath
    except ImportError:  # the C extension is not built: the twin alone
        return out
    return [*out, fastpath.Context]


def stats_doc(ctx_cls: Any = packet.Context) -> dict[str, Any]:
    """A stats document of the daemon's shape around a real Context's counters: one packet
    without a route (a no_route drop and an ICMP error), then pump-level numbers filled in."""
    cx = ctx_cls(TUN_IP, 1472)
    routes = packet.Routes() if ctx_cls is packet.Context else _c_routes()
    pkt = bytearray(ipv4_icmp_echo("198.19.1.5", "198.19.9.9"))
    decide = packet.egress if ctx_cls is packet.Context else _c_egress()
    decide(cx, routes, pkt, 1_000_000_000)
    st = cx.stats()
    st["egress"].update(rx_packets=120, rx_bytes=120_000, tx_packets=119, tx_bytes=119_000)
    st["egress"].update(batches=6, batch_hist=[2, 1, 0, 0, 1, 0, 2, 0])
    st["ingress"].update(rx_packets=40, rx_bytes=4_000, tx_packets=40, tx_bytes=4_000)
    st["ingress"].update(batches=40, batch_hist=[40, 0, 0, 0, 0, 0, 0, 0])
    st["syscalls"] = {k: i + 1 for i, k in enumerate(packet.SYSCALL_KINDS)}
    return {
        "mode": "batched",
        "routes": 3,
        "tun": "flannel0",
        "mtu": 1472,
        "offloads": {"udp_gso": True, "udp_gro": False},
        "stats": st,
        "queues": 2,
        "per_queue": [{"egress": 70, "ingress": 10}, {"egress": 49, "ingress": 30}],
    }


def _c_routes() -> Any:
    from udpbackend.dataplane import fastpath

    return fastpath.Routes()


def _c_egress() -> Any:
    from udpbackend.dataplane import fastpath

    return fastpath.egress


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def samples(fams: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in fams.values()
        for s in f.samples
        if s.name == name
    }


CONTROL = {
    "lease_expiry": 1_900_000_000.5,
    "etcd_connected": True,
    "ready": False,
    "subnet": "198.19.1.0/24",
    "public_ip": "198.18.0.1",
}


@pytest.mark.parametrize("ctx_cls", _contexts(), ids=lambda c: c.__module__.split(".")[-1])
def test_render_follows_prometheus_conventions(ctx_cls: Any) -> None:
    doc = stats_doc(ctx_cls)
    fams = families(metrics.render(doc, CONTROL))
    assert all(name.startswith("udpbackend_") for name in fams)
    for f in fams.values():
        if f.type == "counter":
            assert all(s.name == f.name + "_total" for s in f.samples), f.name
        assert f.documentation, f"{f.name} has no HELP"
    types = {name: f.type for name, f in fams.items()}
    assert types["udpbackend_rx_packets"] == "counter"
    assert types["udpbackend_tx_bytes"] == "counter"
    assert types["udpbackend_dropped_packets"] == "counter"
    assert types["udpbackend_syscalls"] == "counter"
    assert types["udpbackend_icmp_sent"] == "counter"
    assert types["udpbackend_batch_size_packets"] == "histogram"
    assert types["udpbackend_routes"] == "gauge"
    assert types["udpbackend_lease_expiry_timestamp_seconds"] == "gauge"

    rx = samples(fams, "udpbackend_rx_packets_total")
    assert rx == {(("direction", "egress"),): 120.0, (("direction", "ingress"),): 40.0}
    assert samples(fams, "udpbackend_tx_bytes_total")[(("direction", "egress"),)] == 119_000
    drops = samples(fams, "udpbackend_dropped_packets_total")
    reasons = {dict(k)["reason"] for k in drops}
    assert reasons == set(doc["stats"]["egress"]["drops"])  # every reason, zeros included
    assert drops[(("direction", "egress"), ("reason", "no_route"))] == 1.0
    icmp = samples(fams, "udpbackend_icmp_sent_total")
    assert icmp[(("type", "dest_unreachable"),)] == 1.0
    assert icmp[(("type", "time_exceeded"),)] == 0.0
    sys_ = samples(fams, "udpbackend_syscalls_total")
    assert {dict(k)["kind"] for k in sys_} == set(packet.SYSCALL_KINDS)
    gauges = samples(fams, "udpbackend_offload_enabled")
    assert gauges == {(("offload", "udp_gro"),): 0.0, (("offload", "udp_gso"),): 1.0}
    assert samples(fams, "udpbackend_routes") == {(): 3.0}
    assert samples(fams, "udpbackend_tun_mtu_bytes") == {(): 1472.0}
    info = samples(fams, "udpbackend_dataplane_info")
    assert info == {(("mode", "batched"), ("tun", "flannel0")): 1.0}
    per_queue = samples(fams, "udpbackend_queue_tx_packets_total")
    assert per_queue == {
        (("direction", "egress"), ("queue", "0")): 70.0,
        (("direction", "ingress"), ("queue", "0")): 10.0,
        (("direction", "egress"), ("queue", "1")): 49.0,
        (("direction", "ingress"), ("queue", "1")): 30.0,
    }


@pytest.mark.parametrize("ctx_cls", _contexts(), ids=lambda c: c.__module__.split(".")[-1])
def test_source_check_drops_reach_metrics(ctx_cls: Any) -> None:
    """The drop reasons of the ingress source check (unknown_peer, spoofed_source, not_local)
    flow from a real Context's counters, summed over queues as the daemon does, into /metrics."""
    if ctx_cls is packet.Context:
        routes, ingress = packet.Routes(), packet.ingress
    else:
        from udpbackend.dataplane import fastpath

        routes, ingress = fastpath.Routes(), fastpath.ingress
    peer = ip("198.18.0.2")
    routes.set(ip("198.19.2.0"), 24, peer, 8285)
    queues = []
    for _ in range(2):
        cx = ctx_cls(TUN_IP, 1472, subnet=(TUN_IP, 24))
        for outer, src, dst in (
            (ip("198.18.0.66"), "198.19.2.5", "198.19.1.5"),  # a stranger
            (peer, "198.18.50.50", "198.19.1.5"),  # a source outside the peer's subnet
            (peer, "198.18.50.50", "198.19.1.5"),
            (peer, "198.19.2.5", "198.19.3.5"),  # not for this node
            (peer, "198.19.2.5", "198.19.1.5"),  # fine
        ):
            ingress(cx, routes, bytearray(ipv4_icmp_echo(src, dst)), outer, 1_000_000_000)
        queues.append(cx.stats())
    doc = {"mode": "batched", "routes": 1, "stats": plane.sum_stats(queues)}
    drops = samples(families(metrics.render(doc, {})), "udpbackend_dropped_packets_total")
    ingress_drops = {
        dict(k)["reason"]: v for k, v in drops.items() if ("direction", "ingress") in k
    }
    assert ingress_drops["unknown_peer"] == 2.0
    assert ingress_drops["spoofed_source"] == 4.0
    assert ingress_drops["not_local"] == 2.0
    assert set(ingress_drops) == set(packet.DROP_REASONS)


def test_batch_histogram_is_cumulative_with_power_of_two_bounds() -> None:
    fams = families(metrics.render(stats_doc(), {}))
    buckets = samples(fams, "udpbackend_batch_size_packets_bucket")
    egress = {dict(k)["le"]: v for k, v in buckets.items() if dict(k)["direction"] == "egress"}
    # daemon buckets [2^k, 2^(k+1)): 1 | 2-3 | 4-7 | 8-15 | 16-31 | 32-63 | 64-127 | 128+
    assert egress == {
        "1.0": 2.0,
        "3.0": 3.0,
        "7.0": 3.0,
        "15.0": 3.0,
        "31.0": 4.0,
        "63.0": 4.0,
        "127.0": 6.0,
        "+Inf": 6.0,
    }
    count = samples(fams, "udpbackend_batch_size_packets_count")
    total = samples(fams, "udpbackend_batch_size_packets_sum")
    assert count[(("direction", "egress"),)] == 6.0  # batches
    assert total[(("direction", "egress"),)] == 120.0  # packets taken in


def test_control_plane_metrics() -> None:
    fams = families(metrics.render(stats_doc(), CONTROL))
    assert samples(fams, "udpbackend_lease_expiry_timestamp_seconds") == {(): 1_900_000_000.5}
    assert samples(fams, "udpbackend_etcd_connected") == {(): 1.0}
    assert samples(fams, "udpbackend_ready") == {(): 0.0}
    lease = samples(fams, "udpbackend_lease_info")
    assert lease == {(("public_ip", "198.18.0.1"), ("subnet", "198.19.1.0/24")): 1.0}
    # control["routes"] wins over the data plane's count
    fams = families(metrics.render(stats_doc(), {"routes": 7}))
    assert samples(fams, "udpbackend_routes") == {(): 7.0}


def test_unknown_state_is_left_out() -> None:
    """Static mode (no etcd), a reservation (no expiry), a data plane not up yet."""
    fams = families(metrics.render({}, {"etcd_connected": None, "lease_expiry": None}))
    assert "udpbackend_etcd_connected" not in fams
    assert "udpbackend_lease_expiry_timestamp_seconds" not in fams
    assert "udpbackend_rx_packets" not in fams
    assert metrics.render(None, None) == b""


def test_each_render_is_independent() -> None:
    """A fresh registry per scrape: no global state, values never leak between scrapes."""
    doc = stats_doc()
    first = metrics.render(doc)
    bigger = copy.deepcopy(doc)
    bigger["stats"]["egress"]["rx_packets"] = 999
    second = families(metrics.render(bigger))
    assert samples(second, "udpbackend_rx_packets_total")[(("direction", "egress"),)] == 999
    assert metrics.render(doc) == first
    global_names = {f.name for f in REGISTRY.collect()}
    assert not any(n.startswith("udpbackend") for n in global_names)


def test_content_type_is_the_text_format() -> None:
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


# --- live: a daemon's stats file, scraped twice around traffic --------------------------------


def _live_missing() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        return "needs root and /dev/net/tun"
    if shutil.which("iperf3") is None:
        return "needs iperf3"
    return None


@pytest.mark.netns
@pytest.mark.skipif(_live_missing() is not None, reason=str(_live_missing()))
def test_counters_rise_between_scrapes_of_a_live_daemon() -> None:
    from udpbackend.lab.testbed import Testbed

    def scrape(doc: dict[str, Any]) -> dict[str, Any]:
        return families(metrics.render(doc, {"routes": doc.get("routes")}))

    def total(fams: dict[str, Any], name: str) -> float:
        return sum(samples(fams, name).values())

    with Testbed(prefix="ubit") as tb:
        a = tb.start_node("a", "batched")
        tb.start_node("b", "batched")
        doc0 = a.wait_stats(lambda d: "stats" in d)
        before = scrape(doc0)
        sent0 = doc0["stats"]["egress"]["tx_packets"]
        tb.iperf3("a", tb.tun_addr("b"), seconds=1)
        doc1 = a.wait_stats(lambda d: d["stats"]["egress"]["tx_packets"] > sent0 + 1000)
        after = scrape(doc1)
    for name in (
        "udpbackend_rx_packets_total",
        "udpbackend_rx_bytes_total",
        "udpbackend_tx_packets_total",
        "udpbackend_tx_bytes_total",
        "udpbackend_syscalls_total",
        "udpbackend_batch_size_packets_count",
        "udpbackend_batch_size_packets_sum",
    ):
        assert total(after, name) > total(before, name), name
    assert samples(after, "udpbackend_routes") == {(): 1.0}
    assert total(after, "udpbackend_dropped_packets_total") == total(
        before, "udpbackend_dropped_packets_total"
    )
