"""/metrics on a running static node: Prometheus text that parses, with counters that rise
while traffic crosses the overlay.  Real daemons in network namespaces (marker netns)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from udpbackend.lab.testbed import Testbed

pytestmark = pytest.mark.netns

PORT = 9099


def scrape(tb: Testbed, node: str, path: str = "/metrics") -> tuple[int, str]:
    with tb.socket(node, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((tb.underlay_addr(node), PORT))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in values.items() if n == name and want <= set(lab))


def test_metrics_rise_with_traffic() -> None:
    with Testbed() as tb:
        args = ["--healthz-port", str(PORT), "--healthz-ip", "0.0.0.0"]
        a = tb.start_node("a", "batched", extra_args=args)
        tb.start_node("b", "batched", extra_args=args)
        assert scrape(tb, "a", "/healthz") == (200, "flanneld is running")
        assert scrape(tb, "a", "/readyz") == (200, "flanneld is ready")
        status, before_text = scrape(tb, "a")
        assert status == 200
        before = samples(before_text)
        names = {n for n, _ in before}
        assert any(n.startswith("udpbackend_") and n.endswith("_total") for n in names), names
        res = tb.ping("a", tb.tun_addr("b"), count=20, interval=0.01)
        assert res.received == 20
        after = samples(scrape(tb, "a")[1])
        # find the packets counter by convention rather than by a hard-coded full name
        pkt_names = {n for n, _ in after if "packets" in n and n.endswith("_total")}
        assert pkt_names, sorted({n for n, _ in after})
        rose = [n for n in pkt_names if total(after, n) >= total(before, n) + 20]
        assert rose, {n: (total(before, n), total(after, n)) for n in pkt_names}
        assert scrape(tb, "a", "/nope")[0] == 404
        a.stop()
