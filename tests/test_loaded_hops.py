# benchmarks/loaded_hops.py's pure parts: reading echoes out of the captures (raw IPv4 on a TUN,
# Ethernet + IPv4 + UDP 8285 around the packet on a veth) and splitting round trips into hops.
# Pure unit tests on pcaps built here byte by byte; the measurement itself needs root, iperf3 and
# tcpdump and is not run in CI.  Addresses: 198.18.0.0/15 only.
from __future__ import annotations

import importlib.util
import socket
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "loaded_hops.py"


@pytest.fixture(scope="module")
def lh() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loaded_hops", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loaded_hops"] = mod
    spec.loader.exec_module(mod)
    return mod


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return hdr + payload


def echo(kind: int, seq: int, ident: int = 7) -> bytes:
    src, dst = ("198.19.1.0", "198.19.2.0") if kind == 8 else ("198.19.2.0", "198.19.1.0")
    return ipv4(src, dst, 1, struct.pack("!BBHHH", kind, 0, 0, ident, seq) + bytes(56))


def outer(inner: bytes, dport: int = 8285) -> bytes:
    udp = struct.pack("!HHHH", 8285, dport, 8 + len(inner), 0) + inner
    return bytes(12) + b"\x08\x00" + ipv4("198.18.0.1", "198.18.0.2", 17, udp)


def pcap(path: Path, linktype: int, packets: list[tuple[float, bytes]]) -> Path:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for ts, data in packets:
        sec, usec = int(ts), round((ts - int(ts)) * 1e6)
        out.append(struct.pack("<IIII", sec, usec, len(data), len(data)) + data)
    path.write_bytes(b"".join(out))
    return path


def test_echoes_on_a_tun_and_inside_the_outer_udp(lh: ModuleType, tmp_path: Path) -> None:
    tun = pcap(
        tmp_path / "tun.pcap",
        101,
        [
            (10.0, echo(8, 1)),
            (10.5, echo(0, 1)),
            (11.0, echo(8, 1)),  # a second sighting of the same echo keeps the first time
            (11.5, ipv4("198.19.1.0", "198.19.2.0", 6, bytes(20))),  # TCP: not an echo
            (12.0, ipv4("198.19.1.0", "198.19.2.0", 1, bytes([3, 0]) + bytes(30))),  # unreach
        ],
    )
    assert lh.echoes(tun, outer=False) == {("req", 1): 10.0, ("rep", 1): 10.5}
    wire = pcap(
        tmp_path / "wire.pcap",
        1,
        [
            (20.25, outer(echo(8, 3))),
            (20.75, outer(echo(0, 3))),
            (21.0, outer(echo(8, 4), dport=9)),  # not our port
            (21.5, outer(b"\x45" + bytes(10))),  # a runt inside the datagram
        ],
    )
    assert lh.echoes(wire, outer=True) == {("req", 3): 20.25, ("rep", 3): 20.75}


def test_split_hops_needs_all_eight_points(lh: ModuleType) -> None:
    t = {  # the path of seq 1, 1 ms per step; seq 2 missed by b's wire capture on the way back
        ("a", "tun"): {("req", 1): 0.000, ("rep", 1): 0.007, ("req", 2): 1.0, ("rep", 2): 1.007},
        ("a", "wire"): {("req", 1): 0.001, ("rep", 1): 0.006, ("req", 2): 1.001, ("rep", 2): 1.006},
        ("b", "wire"): {("req", 1): 0.002, ("rep", 1): 0.005, ("req", 2): 1.002},
        ("b", "tun"): {("req", 1): 0.003, ("rep", 1): 0.004, ("req", 2): 1.003, ("rep", 2): 1.004},
    }
    hops, complete = lh.split_hops(t)
    assert complete == 1
    assert {name: [round(x, 6) for x in v] for name, v in hops.items()} == {
        "a daemon: TUN -> UDP": [1.0],
        "wire a -> b": [1.0],
        "b daemon: UDP -> TUN": [1.0],
        "b kernel: echo reply": [1.0],
        "b daemon: TUN -> UDP": [1.0],
        "wire b -> a": [1.0],
        "a daemon: UDP -> TUN": [1.0],
        "round trip": [7.0],
    }
    assert lh.split_hops({}) == ({name: [] for name, _, _ in lh.HOPS}, 0)


def test_pct_picks_an_observed_value(lh: ModuleType) -> None:
    xs = [float(i) for i in range(1, 101)]
    assert (lh.pct(xs, 0.5), lh.pct(xs, 0.99), lh.pct([3.0], 0.99)) == (50.0, 99.0, 3.0)
