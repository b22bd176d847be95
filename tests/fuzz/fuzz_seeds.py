"""Seed corpora for the libFuzzer harnesses of csrc/fuzz/, generated (never committed as blobs).

Each harness reads its input as a recipe (csrc/fuzz/fuzz.h): one byte per choice, 0 the plain
valid one, and an input that runs out reads as zeros.  The encoders below write recipes in
the harnesses' byte order, so that a seed names a configuration (a TSO super-packet at the mtu,
a UDP_SEGMENT train into a GRO socket, a strict source check, fp_serve on vnet batches...)
and the fuzzer starts from every one of them.  Any byte string is a valid input: a seed that
drifts from the decoder after a harness changes still runs, it just means something else.

    python tests/fuzz/fuzz_seeds.py OUTDIR      # OUTDIR/<harness>/<name> for every seed
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

HARNESSES = ("packet", "route", "split", "gro", "pump", "steer")


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def _mod_pick(n: int, base: int = 0xC0, top: int = 0x100) -> int:
    """A byte in [base, top) that is n modulo 11 (fz_build_ip's option-word count)."""
    return next(v for v in range(base, top) if v % 11 == n)


# pick_total's selectors (fuzz.h): the total lengths at the boundaries
TOTAL = {
    "default": 0,
    "0": 6,
    "1": 7,
    "19": 8,
    "20": 9,
    "21": 10,
    "ihl-1": 11,
    "ihl+1": 12,
    "hl": 13,
    "hl+1": 14,
    "mtu-1": 15,
    "mtu": 16,
    "mtu+1": 17,
    "65535": 18,
    "slot-1": 19,
    "slot": 20,
    "slot+1": 21,
}
FRAG = {"none": 0, "df": 1, "mf": 3, "offset": 4, "evil": 5, "df+mf": 6}
TTL = {"64": 0, "1": 3, "0": 4, "2": 5, "255": 6}
# pick_addr's pool
ADDR = {
    "routed": 0,
    "src": 1,
    "unrouted": 2,
    "blackhole": 3,
    "host32": 4,
    "local": 5,
    "zero": 6,
    "multicast": 7,
    "broadcast": 8,
}
ICMP_TYPE = {"echo": 0, "reply": 1, "unreach": 3, "time-exceeded": 4, "quench": 5}
# recipe flags
BAD_IPCSUM, FIX_TOTLEN, FLIPS, TRAILER = 0x01, 0x02, 0x04, 0x08
L4_FULL, L4_PARTIAL, L4_ZERO, L4_GARBAGE = 0x00, 0x10, 0x20, 0x30


def ip(
    kind: str = "tcp",
    flags: int = 0,
    opts: int = 0,
    tcp_opts: str = "none",
    extra: int = 0,
    total: str = "default",
    tos: int = 0,
    frag: str = "none",
    ttl: str = "64",
    src: str = "routed",
    dst: str = "routed",
    tcpflags: int = 0,
    icmp: str = "echo",
    trailer: int = 0,
    proto: int = 47,
    raw: bytes = b"",
) -> bytes:
    """fz_build_ip's recipe."""
    kinds = {"tcp": 0, "udp": 2, "icmp": 4, "proto": 6, "raw": 7}
    out = bytearray([kinds[kind], flags])
    if kind == "raw":
        return bytes(out + u16(len(raw)) + raw)
    if kind == "proto":
        out.append(proto)
    out.append(_mod_pick(opts) if opts else 0)
    if kind == "tcp":
        out.append({"none": 0, "ts": 0x80}.get(tcp_opts, 0xC0 + 6))
    out.append(extra)
    out.append(TOTAL[total])
    out.append(tos)
    out += u16(0x1234)
    out.append(FRAG[frag])
    out.append(TTL[ttl])
    out.append(ADDR[src])
    out.append(ADDR[dst])
    ihl = 20 + opts * 4
    out += bytes(max(0, ihl - 21))
    if kind in ("tcp", "udp"):
        out += bytes([1, 2])
    if kind == "tcp":
        out += u32(1000) + u32(2000) + bytes([tcpflags, 0, 0])
    if kind == "icmp":
        out += bytes([ICMP_TYPE[icmp], 0]) + u32(0x00010001)
    out.append(0x5A)  # payload pattern
    if flags & 0x30 == L4_GARBAGE:
        out.append(7)
    if flags & TRAILER:
        out.append(trailer)
    if flags & BAD_IPCSUM:
        out.append(1)
    return bytes(out)


GSO = {"none": 0, "tcpv4": 1, "udp_l4": 3, "tcpv4-ecn": 5, "udp_l4-ecn": 6, "ufo": 7, "tcpv6": 8}
# pick_gso's selectors
GSO_SIZE = {"fit": 0, "fit+1": 4, "fit-1": 5, "0": 6, "1": 7, "pay": 8, "64segs": 11, "65segs": 12}


def frame(
    gso: str = "tcpv4",
    vflags: int = 0,
    mtus: int = 10,
    tail: int = 0,
    jumbo: bool = False,
    gso_size: str = "fit",
    **kw,
) -> bytes:
    """fz_build_frame's recipe: a virtio-net header + an IPv4 packet (super-packets of `mtus`
    MTUs, or 64 KiB)."""
    out = bytearray([GSO[gso], vflags])
    out += ip(**kw)
    if gso in ("tcpv4", "udp_l4", "tcpv4-ecn", "udp_l4-ecn"):
        out += bytes([0, mtus - 1, tail, 0xE0 if jumbo else 0, 0x33])
        out.append(GSO_SIZE[gso_size])
    return bytes(out)


# --- per harness -------------------------------------------------------------------------


def packet_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_packet: context (mtu, pp, rate, burst, local subnet, peer check, routes, now),
    then packets (ctl, source, recipe, checksum offsets)."""

    def ctx(mtu: int = 0, rate: int = 0, burst: int = 0, lnet: int = 0, check: int = 0) -> bytes:
        return bytes([mtu, 0, rate, burst, lnet, check, 0, 0])

    def pkt(recipe: bytes, ingress: bool = False, src: int = 0) -> bytes:
        return bytes([1 if ingress else 0, src]) + recipe + bytes([3, 1])

    yield "tcp", ctx() + pkt(ip())
    yield "udp", ctx() + pkt(ip("udp"))
    yield "icmp-echo-ttl1", ctx() + pkt(ip("icmp", ttl="1"))
    yield "icmp-error-ttl1", ctx() + pkt(ip("icmp", icmp="unreach", ttl="1"))
    yield "unrouted", ctx() + pkt(ip(dst="unrouted"))
    yield "df-over-mtu", ctx() + pkt(ip(frag="df", total="mtu+1"))
    yield "mtu-68", ctx(mtu=3) + pkt(ip(total="mtu"))
    yield "mtu-65535", ctx(mtu=5) + pkt(ip("udp", total="65535"))
    yield "options", ctx() + pkt(ip(opts=10, tcp_opts="max"))
    yield "fragment-ttl0", ctx() + pkt(ip(frag="offset", ttl="0"))
    yield "bad-checksum", ctx() + pkt(ip(flags=BAD_IPCSUM))
    yield "truncated", ctx() + pkt(ip(flags=TRAILER, trailer=9))
    yield "trailer", ctx() + pkt(ip(flags=TRAILER, trailer=40))
    yield "cut-fixed", ctx() + pkt(ip(flags=TRAILER | FIX_TOTLEN, trailer=41))
    for name, total in (("short0", "0"), ("short19", "19"), ("ihl-1", "ihl-1"), ("hl", "hl")):
        yield name, ctx() + pkt(ip(total=total, opts=2))
    yield "multicast", ctx() + pkt(ip(src="multicast", ttl="1"))
    yield "ratelimited", ctx(rate=2, burst=2) + b"".join(pkt(ip(ttl="1")) for _ in range(8))
    yield "no-icmp", ctx(rate=1) + pkt(ip(ttl="1"))
    for check in (1, 2):
        yield (
            f"peer-check-{check}",
            ctx(check=check)
            + b"".join(
                pkt(ip(src=s, dst=d), ingress=True, src=peer)
                for s, d, peer in (("routed", "src", 0), ("src", "src", 0), ("routed", "routed", 1))
            ),
        )
    yield "stranger", ctx(check=1) + pkt(ip(), ingress=True, src=2)
    yield "ctx-invalid", ctx(mtu=8, check=3) + pkt(ip())
    yield (
        "mixed",
        ctx()
        + b"".join(
            pkt(ip(k, ttl=t), ingress=i)
            for k, t, i in (("tcp", "64", False), ("udp", "1", True), ("icmp", "2", False))
        ),
    )


def route_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_route: operations (set 0-2, del 3-4, lookup 5-6, bulk 7, bulk del 8, peer 9,
    count 10)."""

    def setr(net: int, plen: int, peer: int = 0) -> bytes:
        return bytes([0, plen, net, peer]) + u16(8285)

    yield "flannel", setr(0, 0) + setr(1, 0) + setr(2, 1) + bytes([5, 0, 10, 9, 0, 0])
    yield "nested", setr(10, 0) + setr(0, 1) + setr(4, 2) + bytes([5, 4, 5, 0, 6, 3, 10])
    yield "replace", setr(0, 0, 0) + setr(0, 0, 1) + bytes([9, 0, 0, 10])
    yield "invalid", bytes([0x80, 8, 0, 0]) + u16(1) + bytes([3, 8, 4, 0x80, 9, 1])
    yield "grow", bytes([7, 3]) + u16(299) + bytes([5, 10, 8, 40, 10])
    yield "grow-32", bytes([0x87, 1]) + u16(200) + bytes([8, 63, 10, 0x49, 3])
    yield "peers-many", bytes([7, 9]) + u16(40) + bytes([1]) + bytes([0x49, 0, 0xC9, 0, 5, 10])
    yield "delete-all", bytes([7, 5]) + u16(64) + bytes([8, 63, 8, 63, 10])


def split_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_split: mtu, frame, then caps (max_segs, out_cap, hdrs_cap: 0 = exactly)."""
    mtus = {"1400": 0, "1500": 1, "9000": 2, "65535": 3, "68": 4, "576": 5}

    def s(mtu: str, fr: bytes, caps: bytes = b"") -> bytes:
        return bytes([mtus[mtu]]) + fr + caps

    yield "tso", s("1400", frame(tcp_opts="ts", frag="df"))
    yield "tso-psh-fin-cwr", s("1500", frame(tcpflags=0x80 | 0x19, mtus=4))
    yield "tso-64k", s("1500", frame(jumbo=True))
    yield "tso-64segs", s("9000", frame(jumbo=True, gso_size="64segs"))
    yield "tso-65segs", s("9000", frame(jumbo=True, gso_size="65segs"))
    yield "tso-fit+1", s("1400", frame(gso_size="fit+1"))
    yield "tso-ecn", s("1400", frame("tcpv4-ecn"))
    yield "tso-options", s("1400", frame(opts=5, tcp_opts="max"))
    yield "uso", s("1400", frame("udp_l4", kind="udp"))
    yield "uso-64k", s("65535", frame("udp_l4", kind="udp", jumbo=True))
    yield "gso-none-partial", s("1500", frame("none", kind="tcp", flags=L4_PARTIAL))
    yield "gso-none-udp", s("1500", frame("none", kind="udp", flags=L4_PARTIAL))
    yield "gso-none-icmp", s("1500", frame("none", kind="icmp", flags=L4_PARTIAL))
    yield "gso-none-over-mtu", s("68", frame("none", total="mtu+1"))
    yield "ufo", s("1400", frame("ufo", kind="udp"))
    yield "tcpv6", s("1400", frame("tcpv6"))
    yield "mismatch", s("1400", frame("tcpv4", vflags=0x80, kind="udp"))
    yield "near-csum", s("1400", frame("none", vflags=0x20, flags=L4_PARTIAL))
    yield "anything", s("1400", frame("tcpv4", vflags=0x30))
    yield "fragment", s("1400", frame(frag="mf"))
    yield "mss-1", s("1400", frame(gso_size="1"))
    yield "caps-tight", s("1400", frame(), bytes([1, 1, 1]))
    yield "caps-zero", s("1400", frame(), bytes([3, 3, 3]))
    yield "ttl1", s("1400", frame(ttl="1"))
    yield "unrouted", s("1400", frame(dst="unrouted"))


def gro_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_gro: caps (4 bytes), then runs (kind 0/1: k, mss, 1448?, [optw], seq, last,
    tweaks), other packets (kind 2) and jumbos (kind 3)."""

    def run(k: int, mss: int = 1448, last: int = 0, kind: int = 0, tweaks: bytes = b"") -> bytes:
        out = bytes([kind, k - 1]) + u16(mss - 1) + bytes([0]) + u32(5000) + u16(last)
        return out + bytes([len(tweaks) // 3]) + tweaks

    plenty = bytes(4)
    yield "one-run", plenty + run(10)
    yield "run-64", plenty + run(64)
    yield "run-80", plenty + run(80)
    yield "run-psh", plenty + run(5, kind=0x40)
    yield "run-ts", plenty + run(20, kind=0x10)
    yield "short-last", plenty + run(6, last=700)
    yield "two-flows", plenty + run(5) + run(7, mss=536)
    yield "between", plenty + run(3) + bytes([2]) + ip("udp") + run(3)
    for name, what in (("flag", 0), ("seq", 1), ("ttl", 2), ("tos", 3), ("df", 4), ("evil", 5)):
        yield f"tweak-{name}", plenty + run(6, tweaks=bytes([2, what, 8]))
    yield "tweak-csum", plenty + run(6, tweaks=bytes([1, 14, 3]))
    yield "jumbo", plenty + bytes([3]) + u16(0) + u32(1) + bytes([3]) + u16(5) + u32(9)
    yield "tight", bytes([3, 0x40, 0, 1]) + run(12) + run(3)
    yield "tight-spans", bytes([5, 0x10, 0, 3]) + run(12) + run(3)


def pump_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_pump: mtu, mode, driver, budget, nslots, slot_size, aux, kstate, then inputs."""
    EGRESS, INGRESS, PP, VNET, GSO, GRO, NOICMP = 0, 1, 2, 4, 8, 16, 0x80

    def check(n: int) -> int:
        return n << 5

    def scen(
        mode: int,
        inputs: bytes,
        n: int,
        drv: int = 0,
        budget: int = 0,
        slots: int = 0,
        slot: int = 0,
        aux: int = 0,
        mtu: int = 0,
    ) -> bytes:
        return bytes([mtu, mode, drv, budget, slots, slot, aux, n - 1]) + inputs

    def pk(recipe: bytes, rep: int = 0) -> bytes:
        return bytes([rep]) + recipe

    flow3 = b"".join(pk(ip(k)) for k in ("tcp", "udp", "icmp"))
    yield "egress", scen(EGRESS, flow3, 3)
    yield "egress-pp", scen(EGRESS | PP, flow3, 3)
    yield "egress-gso", scen(EGRESS | GSO, pk(ip("udp"), 0xF0) + bytes([20]), 21)
    yield "egress-blackhole", scen(EGRESS | GSO, pk(ip(dst="blackhole"), 0xF0) + bytes([5]), 6)
    yield "egress-ttl1", scen(EGRESS, pk(ip(ttl="1")) + pk(ip(dst="unrouted")), 2)
    yield "egress-df", scen(EGRESS, pk(ip(frag="df", total="mtu+1")), 1)
    yield "egress-over-slot", scen(EGRESS, pk(ip(total="slot+1")), 1, slot=7)
    yield (
        "egress-vnet",
        scen(EGRESS | VNET, pk(frame()) + pk(frame("udp_l4", kind="udp")), 2, slots=3, slot=3),
    )
    yield "egress-vnet-64k", scen(EGRESS | VNET, pk(frame(jumbo=True)), 1, slots=3, slot=3)
    yield (
        "egress-vnet-bad",
        scen(EGRESS | VNET, pk(frame("tcpv6")) + pk(frame(gso_size="0")), 2, slots=3, slot=3),
    )
    yield (
        "egress-vnet-fit+1",
        scen(EGRESS | VNET, pk(frame(gso_size="fit+1", frag="df")), 1, slots=3, slot=3),
    )
    yield "egress-vnet-tight", scen(EGRESS | VNET, pk(frame()), 1, slots=0, slot=8, aux=0x80)
    yield "egress-budget1", scen(EGRESS, flow3, 3, budget=1, slots=1)
    yield "ingress", scen(INGRESS, flow3, 3)
    yield "ingress-pp", scen(INGRESS | PP, flow3, 3)
    yield "ingress-ttl1", scen(INGRESS, pk(ip(ttl="1")), 1)
    yield (
        "ingress-gro",
        scen(INGRESS | GRO, bytes([2]) + ip("udp") + bytes([40]) + ip("udp"), 42, slot=3),
    )
    yield (
        "ingress-vnet",
        scen(INGRESS | VNET, bytes([2]) + ip(extra=200) + bytes([30]), 31, slots=3, slot=3),
    )
    yield "ingress-over-slot", scen(INGRESS, pk(ip("udp", total="slot+1")), 1, slot=7)
    yield "ingress-stranger", scen(INGRESS | check(1), pk(ip(), 1), 1)
    yield "ingress-strict", scen(INGRESS | check(2), pk(ip(dst="src")) + pk(ip()), 2)
    yield "fp_run", scen(EGRESS, flow3, 3, drv=2)
    yield "fp_serve", scen(INGRESS, flow3, 3, drv=3)
    yield "fp_serve-vnet", scen(EGRESS | VNET, pk(frame()), 1, drv=3, slots=3, slot=3)
    yield "no-icmp", scen(EGRESS | NOICMP, pk(ip(ttl="1")), 1)

    def flow(k: int, mss: int, last_cut: int = 0, train: bool = True, ts: bool = False) -> bytes:
        rep = 3 | (8 if train else 0) | (0x10 if ts else 0)
        return bytes([rep, k - 1]) + u16(mss - 1) + u16(last_cut) + u32(1000)

    vnet_in = INGRESS | VNET
    yield "ingress-vnet-flow", scen(vnet_in, flow(40, 1400), 1, slots=3, slot=3)
    yield (
        "ingress-vnet-flows",
        scen(vnet_in | check(2), flow(20, 1000, 300, False) * 2, 2, slots=3, slot=3),
    )
    yield (
        "ingress-vnet-gro-flows",
        scen(vnet_in | GRO, flow(64, 100, ts=True) * 9, 9, slots=3, slot=3, budget=4),
    )
    yield "ingress-gro-trains", scen(INGRESS | GRO, flow(30, 1200) + flow(64, 500), 2, slot=3)
    # 300-segment super-packets, mtu 270 (0xf0: 68 + the u16 that follows)
    jumbo = pk(frame(jumbo=True, tcp_opts="ts"))
    head = bytes([EGRESS | VNET, 0, 4, 3, 3, 0, 2])  # budget 1000: the three in one call
    yield "egress-vnet-queue-full", bytes([0xF0]) + u16(270 - 68) + head + jumbo * 3
    full = 0x80  # driver byte: the TUN's queue towards the kernel full, replies refused
    yield "tun-full-ttl1", scen(EGRESS, pk(ip(ttl="1")), 1, drv=full)
    yield "tun-full-unrouted", scen(EGRESS | PP, pk(ip(dst="unrouted")) + pk(ip()), 2, drv=full)
    yield "tun-full-fp_serve", scen(EGRESS, pk(ip(frag="df", total="mtu+1")), 1, drv=full | 3)
    yield "tun-full-ingress", scen(INGRESS, pk(ip()) + pk(ip(ttl="1")), 2, drv=full)
    for name, slots, slot, aux in (
        ("nslots-0", 6, 0, 0),
        ("nslots-65", 7, 0, 0),
        ("slot-mtu", 0, 1, 0),
        ("slot-65537", 0, 4, 0),
    ):
        yield f"invalid-{name}", scen(EGRESS, flow3, 3, slots=slots, slot=slot, aux=aux)
    yield "invalid-aux", scen(EGRESS | VNET, pk(frame()), 1, slots=3, slot=3, aux=1)
    yield "invalid-gro-slot", scen(INGRESS | GRO, flow3, 3, slot=5)
    yield "slots-64", scen(EGRESS, pk(ip(), 0xF0) + bytes([69]), 70, slots=3)


def steer_seeds() -> Iterator[tuple[str, bytes]]:
    """fuzz_steer: nsocks check (>= 0xc0 runs it), group, packet."""
    for g in range(6):
        yield f"tcp-{g}", bytes([0, g]) + ip()
        yield f"udp-{g}", bytes([0xC1, g]) + ip("udp")
    yield "fragment", bytes([0xC2, 3]) + ip(frag="mf")
    yield "icmp", bytes([0xC0, 4]) + ip("icmp")
    yield "short", bytes([0xC3, 5]) + ip(total="19")
    yield "ports-cut", bytes([0xC4, 5]) + ip(total="21", opts=1)
    yield "options", bytes([0, 5]) + ip(opts=10)


# Inputs the fuzzer found bugs with, replayed by test_fuzz.py (and part of the seed corpus).
REGRESSIONS: dict[str, list[tuple[str, bytes]]] = {
    # A run whose first segment has the IPv4 reserved flag bit set merged with segments that
    # do not (and the other way round): the merge must leave such a segment alone.
    "gro": [
        ("reserved-bit-first", bytes.fromhex("000000000031fff8f8f8f8f8f8ffffffffff95")),
        ("reserved-bit-later", bytes.fromhex("000000000085c585c5c5c585c5c5c5c5c5c5c5")),
    ],
    # Batched ingress, 8 slots of 1402 bytes (mtu 1400): a 1403-byte datagram added 1402 to
    # rx_bytes (recvmmsg without MSG_TRUNC), per-packet mode 1403.
    "pump": [
        (
            "cut-datagram-rx-bytes",
            bytes.fromhex("00010000000700000002000000150034120000000001025a"),
        ),
    ],
}


def all_seeds() -> dict[str, list[tuple[str, bytes]]]:
    seeds = {
        "packet": list(packet_seeds()),
        "route": list(route_seeds()),
        "split": list(split_seeds()),
        "gro": list(gro_seeds()),
        "pump": list(pump_seeds()),
        "steer": list(steer_seeds()),
    }
    for harness, cases in REGRESSIONS.items():
        seeds[harness] += [(f"regression-{name}", data) for name, data in cases]
    return seeds


def write(outdir: Path) -> dict[str, Path]:
    """OUTDIR/<harness>/<name> for every seed; returns the directories."""
    dirs = {}
    for harness, seeds in all_seeds().items():
        d = outdir / harness
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds:
            (d / name).write_bytes(data)
        dirs[harness] = d
    return dirs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for harness, d in write(Path(sys.argv[1])).items():
        print(f"{harness}: {len(list(d.iterdir()))} seeds in {d}")
