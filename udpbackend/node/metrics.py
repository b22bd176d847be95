"""Prometheus text exposition of a node's data-plane counters and control-plane state, for
the health server's /metrics route: ``render(stats_doc, control) -> bytes`` with CONTENT_TYPE.

Lives here: the metric names, help texts, labels and units (Prometheus conventions:
``udpbackend_`` prefix, ``_total`` counters, units in the name, labels for direction, reason,
kind). Must not: keep global state (each scrape builds a fresh CollectorRegistry around one
custom collector), read files or sockets, or import the data plane: it formats the documents it
is given.

``stats_doc`` is ``DataPlane.stats_doc()`` (the same JSON the daemon keeps in --stats-file):
``{"mode", "routes", "tun", "mtu", "offloads": {name: bool}, "stats": {"egress": {...},
"ingress": {...}, "icmp_unreachable", "icmp_time_exceeded", "icmp_ratelimited", "gso_sends",
"gro_receives", "syscalls": {kind: n}}, "queues": n, "per_queue": [{"egress": packets,
"ingress": packets}, ...]}``; an empty dict when the data plane is not up yet.

``control`` (every key optional; a missing or None value leaves its metric out)::

    routes          int    peer routes programmed (default: stats_doc["routes"])
    lease_expiry    float  epoch seconds when this node's subnet lease expires (None: a
                           reservation, no TTL)
    etcd_connected  bool   the registry answers (None: static mode, no etcd)
    ready           bool   /readyz would answer 200
    subnet          str    this node's subnet, e.g. "10.5.52.0/24"
    public_ip       str    the address peers send to
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "PREFIX", "DataPlaneCollector", "render"]

# The classic text format generate_latest() writes (every name here is a legacy-valid name, so
# nothing needs escaping): what every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "udpbackend"
DIRECTIONS = {
    "egress": "TUN -> UDP (leaving this node)",
    "ingress": "UDP -> TUN (arriving at this node)",
}
ICMP_TYPES = {"icmp_unreachable": "dest_unreachable", "icmp_time_exceeded": "time_exceeded"}


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else 0.0


def _bucket_bounds(buckets: int) -> list[str]:
    """Upper bounds of the daemon's power-of-two batch buckets: bucket k holds sizes
    [2^k, 2^(k+1)), so its inclusive upper bound is 2^(k+1) - 1; the last one is +Inf."""
    return [str(float((1 << (k + 1)) - 1)) for k in range(buckets - 1)] + ["+Inf"]


class DataPlaneCollector(Collector):
    """Yields the metric families of one stats document and one control-state mapping."""

    def __init__(self, stats_doc: Mapping[str, Any], control: Mapping[str, Any]) -> None:
        self.doc = stats_doc or {}
        self.control = control or {}

    def collect(self) -> Iterator[Metric]:
        yield from self._dataplane()
        yield from self._control()

    # -- data plane ----------------------------------------------------------------------------

    def _dataplane(self) -> Iterator[Metric]:
        doc = self.doc
        st = doc.get("stats") or {}
        if doc.get("mode") is not None:
            info = InfoMetricFamily(
                f"{PREFIX}_dataplane", "The data plane: mode and TUN device.", labels=[]
            )
            info.add_metric([], {"mode": str(doc.get("mode")), "tun": str(doc.get("tun") or "")})
            yield info
        if doc.get("mtu"):
            g = GaugeMetricFamily(
                f"{PREFIX}_tun_mtu_bytes", "MTU of the TUN device (underlay MTU - 28)."
            )
            g.add_metric([], _num(doc["mtu"]))
            yield g
        offloads = doc.get("offloads") or {}
        if offloads:
            g = GaugeMetricFamily(
                f"{PREFIX}_offload_enabled",
                "1 if the UDP segmentation offload is on for the tunnel socket.",
                labels=["offload"],
            )
            for name, on in sorted(offloads.items()):
                g.add_metric([name], 1.0 if on else 0.0)
            yield g
        per_queue = doc.get("per_queue") or []
        if per_queue:
            c = CounterMetricFamily(
                f"{PREFIX}_queue_tx_packets",
                "Packets passed on by each data-plane queue (TUN queue + socket + thread).",
                labels=["queue", "direction"],
            )
            for i, q in enumerate(per_queue):
                for d in DIRECTIONS:
                    c.add_metric([str(i), d], _num(q.get(d)))
            yield c
        if not st:
            return
        dirs = [(d, st.get(d) or {}) for d in DIRECTIONS]
        taken = "taken in: read from the TUN (egress) or received over UDP (ingress)"
        passed = "passed on: sent to a peer over UDP (egress) or written into the TUN (ingress)"
        for stage, unit, what in (
            ("rx", "packets", taken),
            ("rx", "bytes", taken),
            ("tx", "packets", passed),
            ("tx", "bytes", passed),
        ):
            c = CounterMetricFamily(
                f"{PREFIX}_{stage}_{unit}", f"{unit.capitalize()} {what}.", labels=["direction"]
            )
            for d, ds in dirs:
                c.add_metric([d], _num(ds.get(f"{stage}_{unit}")))
            yield c
        drops = CounterMetricFamily(
            f"{PREFIX}_dropped_packets",
            "Packets dropped by the data plane, by direction and reason.",
            labels=["direction", "reason"],
        )
        for d, ds in dirs:
            for reason, n in sorted((ds.get("drops") or {}).items()):
                drops.add_metric([d, reason], _num(n))
        yield drops
        hist = HistogramMetricFamily(
            f"{PREFIX}_batch_size_packets",
            "Packets taken in per pump round (a batch); sum = packets taken in.",
            labels=["direction"],
        )
        for d, ds in dirs:
            counts = [int(_num(x)) for x in ds.get("batch_hist") or []]
            if not counts:
                continue
            cumulative, running = [], 0
            for bound, n in zip(_bucket_bounds(len(counts)), counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            hist.add_metric([d], cumulative, sum_value=_num(ds.get("rx_packets")))
        yield hist
        icmp = CounterMetricFamily(
            f"{PREFIX}_icmp_sent",
            "ICMP errors the data plane generated, by type.",
            labels=["type"],
        )
        for key, label in ICMP_TYPES.items():
            icmp.add_metric([label], _num(st.get(key)))
        yield icmp
        yield CounterMetricFamily(
            f"{PREFIX}_icmp_ratelimited",
            "ICMP errors suppressed by the token bucket.",
            value=_num(st.get("icmp_ratelimited")),
        )
        sc = CounterMetricFamily(
            f"{PREFIX}_syscalls",
            "Syscalls made by the data plane, by kind (calls that returned EAGAIN included).",
            labels=["kind"],
        )
        for kind, n in sorted((st.get("syscalls") or {}).items()):
            sc.add_metric([kind], _num(n))
        yield sc
        yield CounterMetricFamily(
            f"{PREFIX}_gso_sends",
            "Egress messages that carried several datagrams (UDP_SEGMENT).",
            value=_num(st.get("gso_sends")),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_gro_receives",
            "Ingress receives that held several datagrams (UDP_GRO).",
            value=_num(st.get("gro_receives")),
        )
        for key, name, text in (
            ("tso_reads", "tun_tso_reads", "TUN reads that were TCP super-packets (split in C)."),
            ("tun_gro_writes", "tun_gro_writes", "TUN writes that merged several segments."),
        ):
            if key in st:
                yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=_num(st[key]))

    # -- control plane -------------------------------------------------------------------------

    def _control(self) -> Iterator[Metric]:
        ctl = self.control
        routes = ctl.get("routes", self.doc.get("routes"))
        if routes is not None:
            g = GaugeMetricFamily(f"{PREFIX}_routes", "Peer subnet routes programmed.")
            g.add_metric([], _num(routes))
            yield g
        if ctl.get("lease_expiry") is not None:
            g = GaugeMetricFamily(
                f"{PREFIX}_lease_expiry_timestamp_seconds",
                "When this node's subnet lease expires (Unix time).",
            )
            g.add_metric([], _num(ctl["lease_expiry"]))
            yield g
        for key, name, doc in (
            ("etcd_connected", "etcd_connected", "1 while the etcd registry answers."),
            ("ready", "ready", "1 once subnet.env is written and the rules are in (/readyz)."),
        ):
            if ctl.get(key) is not None:
                g = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
                g.add_metric([], 1.0 if ctl[key] else 0.0)
                yield g
        if ctl.get("subnet") or ctl.get("public_ip"):
            info = InfoMetricFamily(f"{PREFIX}_lease", "This node's subnet lease.", labels=[])
            info.add_metric(
                [],
                {
                    "subnet": str(ctl.get("subnet") or ""),
                    "public_ip": str(ctl.get("public_ip") or ""),
                },
            )
            yield info


def render(stats_doc: Mapping[str, Any] | None, control: Mapping[str, Any] | None = None) -> bytes:
    """The Prometheus text exposition (CONTENT_TYPE) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DataPlaneCollector(stats_doc or {}, control or {}))
    return generate_latest(registry)
