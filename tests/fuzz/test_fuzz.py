"""The sanitizer fuzz tier (issue Trust, item 4): csrc/ under ASan + UBSan, driven by libFuzzer.

csrc/fuzz/ holds one libFuzzer harness per part of fastpath.h, each checking what it drives
against a model or properties (see the comment at the top of each file):

    packet  fp_ctx_init, fp_checksum, fp_egress, fp_ingress (verdicts, drop reasons, forwarded
            bytes, ICMP errors, token bucket, source check) against a reference model
    route   fp_routes_* and the peer table against a brute-force list
    split   fp_gso_split, fp_gso_split_hdrs, fp_egress_super against segments built from
            scratch; split -> fp_gro_coalesce(_spans) -> split round trip
    gro     fp_gro_coalesce(_spans) on any packet lists: merged writes split back to the inputs
    pump    fp_tun_to_udp, fp_udp_to_tun, fp_run, fp_serve, fp_udp_offloads over a socketpair
            (the TUN) and loopback UDP, every batch geometry fastpath.h allows and some it does
            not, against the sans-IO core on a twin context
    steer   fp_reuseport_steer against the kernel's choice in a real SO_REUSEPORT group

conftest.py builds them with clang (a separate build; the installed extension is untouched).
A session fixture runs them all, two at a time, for UDPBACKEND_FUZZ_INPUTS inputs in total
(default 1,000,000: CI's tier, a couple of minutes on 2 cores), split by SHARES, from a seed
corpus that fuzz_seeds.py generates, with a fixed libFuzzer seed (UDPBACKEND_FUZZ_SEED, default
1; 0 lets libFuzzer pick).  Any sanitizer report, property violation, leak, timeout or crash
fails that harness's test, with the report, the input (hex) and the command that replays it.

The long campaign, 10^7 inputs (run it on a quiet machine, or under nice):

    UDPBACKEND_FUZZ_INPUTS=10000000 nice -n 10 .venv/bin/python -m pytest tests/fuzz -q

(the "fuzz tier" section at the end says how many inputs each harness ran, in how long).

Replay one input:  .pytest_cache/d/fuzz-build/<hash>/fuzz_<harness> <file>
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

import pytest
from fuzz_build import SUMMARY, Fuzzers, harness_names
from fuzz_seeds import HARNESSES, write

# Share of the inputs each harness gets (in the order they start: the longest first), and the
# largest input it is fed (bytes).  The shares follow the harnesses' speed under ASan, as
# measured (niced, on a 2-core machine shared with other work): packet 8-11,000 inputs/s,
# route 5-6,500/s, steer 50,000/s (one datagram each), gro 1-2,000/s, pump 1,200/s (a dozen
# syscalls per input), split 150-350/s (64 KiB super-packets cut, checked, merged, cut again).
SHARES = {"packet": 0.55, "split": 0.012, "route": 0.20, "gro": 0.06, "pump": 0.03, "steer": 0.148}
MAX_LEN = {"packet": 512, "route": 512, "split": 512, "gro": 512, "pump": 1024, "steer": 256}
TOTAL = int(float(os.environ.get("UDPBACKEND_FUZZ_INPUTS", "1000000")))
SEED = int(os.environ.get("UDPBACKEND_FUZZ_SEED", "1"))
ENV = {
    **os.environ,
    # leaks count: the fast path never mallocs but in fp_routes_*, and every harness frees
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:malloc_context_size=10",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
REPORT_MARKS = (
    "PROPERTY VIOLATED",
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "ERROR: libFuzzer",
    "==ERROR",
)


@dataclass
class Run:
    name: str
    wanted: int
    returncode: int
    done: int
    seconds: float
    log: Path
    artifacts: list[Path]
    binary: Path

    def report(self) -> str:
        """The sanitizer or property report, the input and how to replay it."""
        text = self.log.read_text(errors="replace")
        starts = [text.find(m) for m in REPORT_MARKS if m in text]
        at = min(starts) if starts else max(0, len(text) - 4000)
        out = [text[max(0, at - 300) : at + 6000]]
        for a in self.artifacts:
            data = a.read_bytes()
            out.append(f"input {a} ({len(data)} bytes): {data[:600].hex()}")
            out.append(f"replay: {self.binary} {a}")
        return "\n".join(out)


def _shares() -> dict[str, int]:
    assert set(SHARES) == set(harness_names()) == set(HARNESSES), "a harness without a share"
    return {n: max(1000, int(TOTAL * SHARES[n])) for n in SHARES}


def _command(f: Fuzzers, name: str, runs: int, corpus: Path, seeds: Path, art: Path) -> list[str]:
    return [
        str(f.binary(name)),
        f"-runs={runs}",
        f"-seed={SEED}",
        f"-max_len={MAX_LEN[name]}",
        "-timeout=30",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={art}/",
        "-print_final_stats=1",
        str(corpus),
        str(seeds),
    ]


@pytest.fixture(scope="session")
def seed_dirs(tmp_path_factory) -> dict[str, Path]:
    return write(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="session")
def campaign(fuzzers: Fuzzers, seed_dirs: dict[str, Path], tmp_path_factory) -> dict[str, Run]:
    """Every harness for its share of the inputs, min(2, cores) processes at a time."""
    base = tmp_path_factory.mktemp("campaign")
    todo = list(_shares().items())  # SHARES's order: the longest first
    running: dict[str, tuple[subprocess.Popen[bytes], float, IO[bytes]]] = {}
    runs: dict[str, Run] = {}
    workers = min(2, os.cpu_count() or 1)
    deadline = time.monotonic() + 900 * max(1.0, TOTAL / 1e6)
    while todo or running:
        while todo and len(running) < workers:
            name, n = todo.pop(0)
            d = base / name
            (d / "corpus").mkdir(parents=True)
            (d / "art").mkdir()
            out: IO[bytes] = open(d / "log.txt", "wb")  # noqa: SIM115 - closed when it ends
            cmd = _command(fuzzers, name, n, d / "corpus", seed_dirs[name], d / "art")
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=d)
            running[name] = (proc, time.monotonic(), out)
        time.sleep(0.2)
        for name, (p, t0, log) in list(running.items()):
            if p.poll() is None:
                if time.monotonic() > deadline:
                    p.kill()
                    p.wait()
                else:
                    continue
            log.close()
            d = base / name
            text = (d / "log.txt").read_text(errors="replace")
            m = re.search(r"Done (\d+) runs in", text)
            runs[name] = Run(
                name,
                _shares()[name],
                p.returncode,
                int(m.group(1)) if m else 0,
                time.monotonic() - t0,
                d / "log.txt",
                sorted((d / "art").iterdir()),
                fuzzers.binary(name),
            )
            del running[name]
    return runs


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz(campaign: dict[str, Run], name: str) -> None:
    r = campaign[name]
    text = r.log.read_text(errors="replace")
    assert r.returncode == 0 and not r.artifacts, f"fuzz_{name} failed:\n{r.report()}"
    for mark in REPORT_MARKS:
        assert mark not in text, f"fuzz_{name} reported {mark!r}:\n{r.report()}"
    assert r.done >= r.wanted, f"fuzz_{name} ran {r.done} of {r.wanted} inputs:\n{r.report()}"


def test_fuzz_total(campaign: dict[str, Run], request: pytest.FixtureRequest) -> None:
    done = sum(r.done for r in campaign.values())
    summary = ", ".join(
        f"{r.name} {r.done} in {r.seconds:.0f} s ({r.done / max(r.seconds, 1e-3):.0f}/s)"
        for r in campaign.values()
    )
    request.config.stash[SUMMARY] = f"{done} inputs (seed {SEED}): {summary}"
    assert done >= TOTAL, f"{done} inputs run, {TOTAL} wanted"


# --- regressions: what the fuzzer found, pinned -------------------------------------------


def test_gro_keeps_every_segments_ip_flags(c_impl: ModuleType) -> None:
    """fuzz_gro: a segment whose IPv4 reserved flag bit (0x8000) is set took part in a merge,
    so the merged super-packet carried the first segment's flags for all of them and the
    kernel's re-segmentation changed the others' headers (Linux's inet_gro_receive flushes on
    any frag_off bit but DF).  Such a segment now passes alone, byte for byte.  (C only: the
    pure-Python twin's _gro_candidate still masks 0x3FFF.)"""
    from packets import DF, flow, mutate

    pkts = flow([1000, 1000, 500])
    for at in range(3):
        run = list(pkts)
        run[at] = mutate(run[at], flags_frag=0x8000 | DF)
        out = c_impl.gro_coalesce(run)
        lone = [b for b, n in out if n == 1]
        shape = [(len(b), n) for b, n in out]
        assert bytes(10) + run[at] in lone, f"reserved bit on segment {at}: writes {shape}"
        assert sum(n for _, n in out) == 3


@pytest.fixture
def fds() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """The pump's end of a fake TUN, the kernel's end, the pump's UDP socket, a peer's."""
    pump_tun, kernel_tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (pump_tun, kernel_tun, sock, peer):
        s.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    peer.bind(("127.0.0.1", 0))
    yield pump_tun, kernel_tun, sock, peer
    for s in (pump_tun, kernel_tun, sock, peer):
        s.close()


@pytest.mark.parametrize("mode", ["per-packet", "batched"])
def test_datagram_over_the_slot_counts_its_length(c_impl: ModuleType, fds, mode: str) -> None:
    """fuzz_pump: a datagram longer than the slot (cut by the kernel, an OVERSIZE drop) added
    its length to ingress rx_bytes per-packet (recvfrom with MSG_TRUNC, as the twin, whose
    buffer holds any datagram) but only the slot's bytes batched: recvmmsg had no MSG_TRUNC."""
    from packets import ip, ipv4_udp

    ffi, lib = c_impl.ffi, c_impl.lib
    cx = c_impl.Context(ip("198.18.0.1"), 1400, per_packet=mode == "per-packet", peer_check="off")
    routes = c_impl.Routes()
    pump_tun, _, sock, peer = fds
    big = ipv4_udp("198.19.1.5", "198.18.5.5", payload=bytes(1500 - 28))
    peer.sendto(big, sock.getsockname())
    assert select.select([sock], [], [], 2.0)[0]
    arena = ffi.new("uint8_t[]", 8 * 1401)
    b = ffi.new("fp_batch *")
    b.arena, b.slot_size, b.nslots = arena, 1401, 8
    assert lib.fp_udp_to_tun(cx._cx, routes._rt, b, sock.fileno(), pump_tun.fileno(), 64) == 1
    i = cx._cx.stats.ingress
    assert i.drops[lib.FP_DROP_OVERSIZE] == 1
    assert i.rx_bytes == len(big)


def test_reproducers_replay_clean(fuzzers: Fuzzers, tmp_path: Path) -> None:
    """Every input the fuzzer found a bug with (fuzz_seeds.REGRESSIONS), replayed."""
    from fuzz_seeds import REGRESSIONS

    for name, cases in REGRESSIONS.items():
        files = []
        for case, data in cases:
            f = tmp_path / f"{name}-{case}"
            f.write_bytes(data)
            files.append(str(f))
        done = subprocess.run(
            [str(fuzzers.binary(name)), *files], capture_output=True, text=True, env=ENV
        )
        assert done.returncode == 0, f"fuzz_{name} on {files}:\n{done.stderr[-6000:]}"
