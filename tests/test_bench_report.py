# udpbackend.lab.bench without a testbed: the schema validator (and its agreement with jsonschema),
# the UDP rate search on scripted probes, medians and ratios, the --explain text derived from
# the counters it is given, the Markdown table and the chart, on a synthetic results document;
# an iperf3 run that never started told from one that failed, retried (bounded) and recorded.
# Must not: need root or start anything (the end-to-end run is tests/integration/test_bench.py).
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from udpbackend.lab.bench import drain
from udpbackend.lab.bench.counters import PHASE_FIELDS, counters_of
from udpbackend.lab.bench.explain import explain
from udpbackend.lab.bench.figures import FIGURES, add_ratios, figures_of, lower_bounds
from udpbackend.lab.bench.iperf import LOSS_MAX, SETUP_RETRIES, IperfRunner, tcp_run, udp_search
from udpbackend.lab.bench.ladder import notes, retry_summary
from udpbackend.lab.bench.progress import Reporter
from udpbackend.lab.bench.report import TABLE_COLUMNS, markdown, write_outputs
from udpbackend.lab.bench.rungs import (
    DEFAULT_RUNGS,
    RUNG_BY_NAME,
    RungEnv,
    daemon_rung,
    parse_rungs,
)
from udpbackend.lab.bench.schema import RETRY, SCHEMA, SCHEMA_ID, validate
from udpbackend.lab.bench.settings import BenchError
from udpbackend.lab.errors import TestbedError
from udpbackend.lab.tools import (
    IperfResult,
    IperfSetupError,
    PingResult,
    never_started,
    parse_iperf3,
)

PHASE_KEYS = PHASE_FIELDS


def phase(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {k: None for k in PHASE_KEYS}
    base.update(drops={}, syscalls={}, packets=1000, gso_sends=0, gro_receives=0)
    base.update(tso_reads=0, tun_gro_writes=0)
    base.update(kw)
    return base


def run(
    gbps: float,
    pps64: float | None,
    rtt: float,
    busy: float,
    counters: dict[str, Any] | None = None,
    sender_bound: bool = False,
) -> dict[str, Any]:
    def tcp(g: float, streams: int) -> dict[str, Any]:
        return {
            "bits_per_second": g * 1e9,
            "sent_bits_per_second": g * 1e9,
            "retransmits": 3,
            "bytes": int(g * 1e9 / 8),
            "seconds": 1.0,
            "streams": streams,
        }

    def udp(size: int, pps: float | None) -> dict[str, Any]:
        probe = {"offered_pps": None, "sent_pps": 1e5, "received_pps": pps or 0, "loss": 0.0}
        return {
            "size": size,
            "pps": pps,
            "loss": 0.0 if pps else None,
            "sender_bound": sender_bound,
            "probes": [probe],
        }

    ping = {"sent": 10, "received": 10, "p50_ms": rtt, "p99_ms": rtt * 3}
    return {
        "tcp1": tcp(gbps, 1),
        "tcp4": tcp(gbps * 1.1, 4),
        "ping_idle": dict(ping),
        "ping_loaded": {**ping, "p50_ms": rtt * 10, "p99_ms": rtt * 30},
        "udp64": udp(64, pps64),
        "udp1400": udp(1400, pps64 and pps64 * 0.8),
        "cpu": {
            "busy_s": busy,
            "user_s": busy / 2,
            "system_s": busy / 3,
            "softirq_s": busy / 6,
            "daemon_s": busy / 2 if counters else None,
            "bytes": int(gbps * 1e9 / 8),
        },
        "counters": {"tcp": counters} if counters else None,
    }


LADDER: dict[str, tuple[float, float, float, float, dict[str, Any] | None]] = {
    # name: (TCP Gbit/s, UDP 64 B pps, RTT ms, busy CPU s, tcp counters)
    "veth": (20.0, 300e3, 0.01, 1.0, None),
    "vxlan": (15.0, 250e3, 0.02, 1.2, None),
    "python": (
        0.5,
        30e3,
        0.25,
        2.0,
        phase(syscalls_per_packet=2.02, daemon_cpu_us_per_packet=9.8, mean_batch=1.0),
    ),
    "per-packet": (
        1.4,
        100e3,
        0.1,
        2.0,
        phase(syscalls_per_packet=2.02, daemon_cpu_us_per_packet=3.1, mean_batch=1.0),
    ),
    "batched-nooffload": (
        1.5,
        130e3,
        0.12,
        2.0,
        phase(syscalls_per_packet=1.04, daemon_cpu_us_per_packet=3.3, mean_batch=28.0),
    ),
    "batched": (
        5.0,
        140e3,
        0.1,
        2.0,
        phase(
            syscalls_per_packet=0.05,
            daemon_cpu_us_per_packet=0.9,
            mean_batch=150.0,
            gso_sends=900,
            gro_receives=880,
            tso_reads=700,
            tun_gro_writes=650,
            packets_per_tun_read=40.0,
            packets_per_tun_write=30.0,
            user_kernel_copies_per_packet=4.0,
        ),
    ),
}
LADDER["multiqueue"] = (6.0, 150e3, 0.1, 2.0, LADDER["batched"][4])
LADDER["multiqueue-rt"] = (6.1, 150e3, 0.05, 2.0, LADDER["batched"][4])


def synthetic_doc(names: tuple[str, ...] = tuple(LADDER), runs: int = 3) -> dict[str, Any]:
    rungs = []
    for name in names:
        g, pps, rtt, busy, counters = LADDER[name]
        rung = RUNG_BY_NAME[name]
        rr = [
            run(g * f, pps * f, rtt, busy, counters, sender_bound=name == "veth")
            for f in (0.9, 1.0, 1.2)[:runs]
        ]
        rungs.append(
            {
                "name": name,
                "label": rung.label,
                "kind": rung.kind,
                "status": "ok",
                "error": None,
                "runs": rr,
                "figures": figures_of(rr),
                "counters": counters_of(rr, phase(mean_batch=20.0) if counters else None),
                "lower_bounds": lower_bounds(rr),
                "ratios_vs_vxlan": {},
            }
        )
    add_ratios(rungs)
    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "date": "2026-11-24T00:00:00+00:00",
        "duration_s": 1.0,
        "machine": {"cores": 2, "kernel": "6.18", "cpu_model": "test CPU", "memory_gib": 24.0},
        "versions": {"udpbackend": "0.1.0", "python": "3.11", "iperf3": "iperf 3.12"},
        "settings": {
            "quick": True,
            "runs": runs,
            "tcp_seconds": 1,
            "udp_seconds": 1,
            "udp_probes": 2,
            "udp_loss_max": 0.01,
            "udp_window": "4M",
            "pings_idle": 10,
            "ping_interval_s": 0.005,
            "loaded_ping_interval_s": 0.01,
            "zerocopy": True,
            "underlay_mtu": 1500,
            "rungs": list(names),
        },
        "figures": [
            {"key": f.key, "label": f.label, "unit": f.unit, "better": f.better} for f in FIGURES
        ],
        "rungs": rungs,
        "explain": [],
        "notes": [],
    }
    doc["explain"] = explain(doc)
    return doc


def test_synthetic_doc_is_valid() -> None:
    doc = synthetic_doc()
    assert validate(doc) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, SCHEMA)


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.pop("machine"), "missing 'machine'"),
        (lambda d: d["machine"].update(cores="two"), "$.machine.cores: expected integer"),
        (lambda d: d["rungs"][0].update(status="meh"), "is not one of"),
        (lambda d: d["rungs"][0]["figures"].update(warp=1.0), "unexpected 'warp'"),
        (lambda d: d["rungs"][1]["runs"][0]["udp64"].update(probes=[]), "fewer than 1"),
        (lambda d: d["rungs"][1]["runs"][0]["tcp1"].update(retransmits=-1), "< minimum"),
        (lambda d: d.update(schema="other/9"), "is not one of"),
    ],
)
def test_validator_catches_violations(mutate: Any, expect: str) -> None:
    doc = synthetic_doc(("veth", "vxlan"))
    mutate(doc)
    problems = validate(doc)
    assert any(expect in p for p in problems), problems
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_figures_are_medians_and_ratios_are_against_vxlan() -> None:
    doc = synthetic_doc()
    rungs = {r["name"]: r for r in doc["rungs"]}
    assert rungs["vxlan"]["figures"]["tcp1_gbps"] == pytest.approx(15.0)  # median of 0.9/1/1.2
    assert rungs["batched"]["ratios_vs_vxlan"]["tcp1_gbps"] == pytest.approx(5.0 / 15.0, 1e-3)
    assert rungs["vxlan"]["ratios_vs_vxlan"]["rtt_idle_p50_ms"] == 1.0
    assert rungs["veth"]["lower_bounds"] == ["udp64_kpps", "udp1400_kpps"]
    assert rungs["veth"]["figures"]["syscalls_per_packet"] is None  # kernel rung: no counters
    # without VXLAN in the run there is nothing to take a ratio against
    alone = synthetic_doc(("python", "batched"))
    assert all(v is None for r in alone["rungs"] for v in r["ratios_vs_vxlan"].values())


def test_explain_walks_the_ladder_with_this_runs_numbers() -> None:
    text = "\n".join(synthetic_doc()["explain"])
    assert "veth -> kernel VXLAN" in text
    assert "udpbackend python -> udpbackend per-packet C" in text
    assert "9.80 -> 3.10" in text  # daemon CPU per packet, from the counters given
    assert "6.70 us of daemon CPU saved per packet" in text
    assert "syscalls/packet 2.02 -> 1.04" in text
    assert "700 TUN reads were TCP super-packets" in text
    doc = synthetic_doc()
    fig = {r["name"]: r["figures"] for r in doc["rungs"]}
    mq, rt = fig["multiqueue"], fig["multiqueue-rt"]
    assert f"4-stream TCP {fig['batched']['tcp4_gbps']:.2f} -> {mq['tcp4_gbps']:.2f} Gbit/s" in text
    assert "SCHED_RR" in text
    assert f"p99 {mq['rtt_loaded_p99_ms']:.2f} -> {rt['rtt_loaded_p99_ms']:.2f} ms" in text
    # other numbers, other text: nothing canned
    for r in doc["rungs"]:
        if r["name"] == "batched-nooffload":
            r["counters"]["tcp"]["syscalls_per_packet"] = 1.5
    assert "syscalls/packet 2.02 -> 1.50" in "\n".join(explain(doc))


def test_markdown_table_and_chart(tmp_path: Path) -> None:
    doc = synthetic_doc()
    md = markdown(doc)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(LADDER)  # header + one row per rung
    assert all(row.count("|") == len(TABLE_COLUMNS) + 1 for row in rows)
    assert ">= 300" in md  # veth's sender-bound UDP rate is a lower bound
    assert "(0.33x)" in md  # batched TCP vs VXLAN
    paths = write_outputs(doc, tmp_path)
    assert [p.name for p in paths] == ["results.json", "results.md", "ladder.png"]
    assert paths[2].read_bytes().startswith(b"\x89PNG")


# --- the UDP search -----------------------------------------------------------------------------


def scripted(capacity: float, sender: float = 500e3) -> tuple[Any, list[float | None]]:
    """A path that delivers up to `capacity` pps without loss; one sender makes `sender`."""
    offered: list[float | None] = []

    def probe(pps: float | None) -> dict[str, Any]:
        offered.append(pps)
        sent = sender if pps is None else min(pps, sender)
        got = min(sent, capacity) if sent <= capacity else capacity * 0.8  # overload collapses
        return {
            "offered_pps": pps,
            "sent_pps": sent,
            "received_pps": got,
            "loss": max(0.0, 1 - got / sent),
        }

    return probe, offered


def test_udp_search_sender_bound() -> None:
    probe, offered = scripted(capacity=1e6)
    res = udp_search(probe, 4, 64)
    assert res["sender_bound"] and res["pps"] == 500e3 and offered == [None]


def test_udp_search_bisects_below_the_overload_point() -> None:
    probe, offered = scripted(capacity=150e3)
    res = udp_search(probe, 5, 64)
    assert not res["sender_bound"]
    assert res["loss"] <= LOSS_MAX
    assert 100e3 <= res["pps"] <= 150e3
    assert len(offered) == 5 and offered[0] is None


def test_udp_search_warm_start_begins_at_the_previous_result() -> None:
    probe, offered = scripted(capacity=150e3)
    hint = {"pps": 140e3, "sender_bound": False}
    res = udp_search(probe, 2, 64, hint)
    assert offered == [140e3]  # one probe fewer, no unlimited run
    assert res["pps"] == 140e3


def test_parse_rungs() -> None:
    assert parse_rungs("batched, veth") == ["veth", "batched"]  # ladder order
    with pytest.raises(BenchError, match="warp"):
        parse_rungs("veth,warp")
    assert set(DEFAULT_RUNGS) == {
        "veth",
        "vxlan",
        "python",
        "flannel-proxy",
        "per-packet",
        "batched-nooffload",
        "batched",
        "multiqueue",
        "multiqueue-rt",
    }


def test_a_new_rung_is_a_name_and_a_setup() -> None:
    rung = daemon_rung("batched-x", "udpbackend batched, x", "batched", ["--x"])
    assert rung.kind == "daemon" and rung.default
    doc = synthetic_doc(("vxlan",))
    assert validate(copy.deepcopy(doc)) == []


# --- iperf3 runs that never started (issue 14) --------------------------------------------------

SETUP_FAILED = {  # iperf3 3.12 -J when the datagram that sets up the UDP stream got no answer
    "start": {"connected": [], "version": "iperf 3.12"},
    "intervals": [],
    "end": {},
    "error": "unable to read from stream socket: Resource temporarily unavailable",
}
FAILED_LATER = {  # the test ran, then failed: a measurement that went wrong, not a set-up
    "start": {"connected": [{"socket": 5, "local_port": 40000, "remote_port": 5201}]},
    "intervals": [{"sum": {"bytes": 1000}}],
    "end": {},
    "error": "control socket has closed unexpectedly",
}


def completed(doc: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.CompletedProcess(["iperf3"], 1, json.dumps(doc).encode(), b"")


def test_a_test_that_never_started_is_told_from_one_that_failed() -> None:
    assert never_started(SETUP_FAILED)
    assert not never_started(FAILED_LATER)
    assert not never_started({"start": {"connected": []}, "intervals": [], "end": {}})
    with pytest.raises(IperfSetupError) as e:
        parse_iperf3(completed(SETUP_FAILED), "198.19.2.0", False)
    assert e.value.reason == SETUP_FAILED["error"]
    with pytest.raises(TestbedError) as f:
        parse_iperf3(completed(FAILED_LATER), "198.19.2.0", False)
    assert not isinstance(f.value, IperfSetupError)


class FakeTestbed:
    """iperf3 fails as scripted (an exception, or a result), ping always answers."""

    def __init__(self, script: list[Exception | None]) -> None:
        self.script = script
        self.ports: list[int] = []
        self.pings = 0

    def iperf3(self, client: str, dst: str, port: int, **kw: Any) -> IperfResult:
        self.ports.append(port)
        step = self.script.pop(0)
        if step is not None:
            raise step
        return IperfResult(1e9, 1e9, 0, 125_000_000, 1.0, False, raw={"end": {}})

    def ping(self, node: str, dst: str, count: int, interval: float) -> PingResult:
        self.pings += 1
        return PingResult(dst, count, [0.1] * count)


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drain, "wait_quiet", lambda tb: 0.05)
    monkeypatch.setattr(drain, "SETTLE_S", 0.0)


def test_a_run_that_never_started_is_run_again_and_recorded(no_waiting: None) -> None:
    setup = IperfSetupError("198.18.0.2", SETUP_FAILED["error"])
    tb = FakeTestbed([setup, None])
    ip = IperfRunner(tb, RungEnv("198.18.0.2"), Reporter())  # type: ignore[arg-type]
    r, doc = tcp_run(ip, 2, 1, False, 4, "veth run 2/3")
    assert doc["streams"] == 4 and r.bytes == 125_000_000
    assert ip.retries == [
        {
            "step": "tcp4",
            "run": 2,
            "offered_pps": None,
            "attempt": 1,
            "reason": SETUP_FAILED["error"],
            "drain": "ping",
            "drain_s": ip.retries[0]["drain_s"],
        }
    ]
    assert tb.pings == 1  # the drained path answered before the run was repeated
    assert len(set(tb.ports)) == 2  # the repeated run did not reuse the failed run's port
    assert validate(ip.retries[0], RETRY) == []


def test_retries_are_bounded_and_a_failed_measurement_is_not_retried(no_waiting: None) -> None:
    setup = IperfSetupError("198.18.0.2", SETUP_FAILED["error"])
    tb = FakeTestbed([setup] * (SETUP_RETRIES + 1))
    ip = IperfRunner(tb, RungEnv("198.18.0.2"), Reporter())  # type: ignore[arg-type]
    with pytest.raises(IperfSetupError):
        tcp_run(ip, 1, 1, False, 1, "veth run 1/3")
    assert [x["attempt"] for x in ip.retries] == list(range(1, SETUP_RETRIES + 1))
    tb = FakeTestbed([TestbedError("iperf3 to 198.18.0.2: control socket has closed")])
    ip = IperfRunner(tb, RungEnv("198.18.0.2"), Reporter())  # type: ignore[arg-type]
    with pytest.raises(TestbedError):
        tcp_run(ip, 1, 1, False, 1, "veth run 1/3")
    assert ip.retries == [] and tb.pings == 0


def test_retries_are_in_the_schema_and_the_summary() -> None:
    doc = synthetic_doc(("vxlan", "multiqueue"))
    retry = {
        "step": "udp64",
        "run": 2,
        "offered_pps": 140000.0,
        "attempt": 1,
        "reason": SETUP_FAILED["error"],
        "drain": "counters",
        "drain_s": 1.9,
    }
    doc["rungs"][0]["retries"] = []
    doc["rungs"][1]["retries"] = [retry]
    doc["retries"] = retry_summary(doc["rungs"])
    doc["notes"] = notes(doc)
    assert doc["retries"] == {
        "count": 1,
        "rungs": {"multiqueue": 1},
        "reasons": {SETUP_FAILED["error"]: 1},
    }
    assert validate(doc) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, SCHEMA)
    md = markdown(doc)
    assert "1 iperf3 run(s) never started and were run again" in md
    assert "multiqueue 1" in md and "unable to read from stream socket" in md
    doc["rungs"][1]["retries"][0]["drain"] = "hope"
    assert any("is not one of" in p for p in validate(doc))


def test_explain_says_where_an_idle_round_trip_goes() -> None:
    doc = synthetic_doc()
    rungs = {r["name"]: r for r in doc["rungs"]}
    default, vx = rungs["multiqueue"], rungs["vxlan"]["figures"]["rtt_idle_p50_ms"]
    idle = dict(default["counters"]["tcp"])
    idle.update(packets=1200, daemon_cpu_us_per_packet=12.5, wakeups_per_packet=0.75)
    idle.update(syscalls_per_packet=1.5)
    default["counters"]["idle"] = idle
    text = "\n".join(explain(doc))
    added = (default["figures"]["rtt_idle_p50_ms"] - vx) * 1000
    assert f"An idle round trip through {default['label']}: p50" in text
    assert f"{added:+.0f} us against kernel VXLAN" in text
    assert "the daemons woke 3.0 times, made 6.0 syscalls and used 50 us of CPU" in text
    assert "Against flannel's proxy loop" not in text  # no such rung in this document
    del default["counters"]["idle"]
    assert "An idle round trip" not in "\n".join(explain(doc))  # no counters, no paragraph
