# The sans-IO core (egress/ingress/checksum/Context), table-driven over both implementations,
# then hypothesis properties holding C and Python to identical decisions, bytes and counters.
# Ingress here comes from a known peer under --peer-check peer-only (the inner addresses are
# any); the source check itself, strict above all, is tests/test_trust.py's.
from __future__ import annotations

import random
import re
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import (
    cksum,
    field,
    forwarded,
    header_ok,
    icmp,
    icmp_error,
    ip,
    ipv4,
    ipv4_icmp_echo,
    ipv4_udp,
    mutate,
    nonzero,
)


def _header_enum(prefix: str, count_name: str) -> tuple[str, ...]:
    """Names of csrc/fastpath.h's `#define <prefix>NAME <index>` block, in index order: the
    twin's name tuples are pinned to the contract itself, not to a copy of it."""
    text = (Path(__file__).resolve().parent.parent / "csrc" / "fastpath.h").read_text()
    found = {
        int(v): k.lower()
        for k, v in re.findall(rf"#define {prefix}(\w+) (\d+)", text)
        if k != count_name
    }
    count = int(re.search(rf"#define {prefix}{count_name} (\d+)", text).group(1))
    assert sorted(found) == list(range(count)), found
    return tuple(found[i] for i in range(count))


def _header_constants() -> dict[str, int]:
    """Every `#define FP_NAME <integer>` of csrc/fastpath.h, as {"NAME": value}."""
    text = (Path(__file__).resolve().parent.parent / "csrc" / "fastpath.h").read_text()
    return {k: int(v, 0) for k, v in re.findall(r"#define FP_(\w+) (0x[0-9a-fA-F]+|\d+)", text)}


DROP_REASONS = _header_enum("FP_DROP_", "REASONS")
SYSCALL_KINDS = _header_enum("FP_SYS_", "KINDS")

LOCAL = ip("198.18.0.1")  # the TUN address: source of ICMP errors
SRC = "198.18.5.5"
DST = "198.19.1.5"  # routed by ROUTE below
UNROUTED = "198.18.9.9"
PEER = (ip("198.18.200.1"), 8285)
ROUTE = (ip("198.19.0.0"), 16)
MTU = 1400
NOW = 10**12  # ns; far beyond the bucket's icmp_last_ns of 0
SEC = 10**9

P = ipv4_udp(SRC, DST, b"x" * 20)  # 48 bytes, routed
DIRS = ("egress", "ingress")


# --- helpers ---------------------------------------------------------------------------------


def ctx(impl: ModuleType, mtu: int = MTU, **kw) -> object:
    kw.setdefault("peer_check", "peer-only")
    return impl.Context(LOCAL, mtu, **kw)


def routes(impl: ModuleType) -> object:
    rt = impl.Routes()
    rt.set(*ROUTE, *PEER)
    return rt


def run(impl, direction, pkt, cx=None, rt=None, now=NOW, src=PEER[0]):
    """(Decision, resulting pkt bytes, stats) of one packet through a fresh or given context;
    ingress: a datagram from src (default: the peer of ROUTE)."""
    cx = ctx(impl) if cx is None else cx
    rt = routes(impl) if rt is None else rt
    buf = bytearray(pkt)
    if direction == "egress":
        d = impl.egress(cx, rt, buf, now)
    else:
        d = impl.ingress(cx, rt, buf, src, now)
    return d, bytes(buf), cx.stats()


def zero_stats() -> dict:
    def direction() -> dict:
        return {
            "rx_packets": 0,
            "rx_bytes": 0,
            "tx_packets": 0,
            "tx_bytes": 0,
            "drops": dict.fromkeys(DROP_REASONS, 0),
            "batches": 0,
            "batch_hist": [0] * 8,
        }

    return {
        "egress": direction(),
        "ingress": direction(),
        "icmp_unreachable": 0,
        "icmp_time_exceeded": 0,
        "icmp_ratelimited": 0,
        "gso_sends": 0,
        "gro_receives": 0,
        "tso_reads": 0,
        "tun_gro_writes": 0,
        "syscalls": dict.fromkeys(SYSCALL_KINDS, 0),
    }


# --- constants, Context, stats shape ---------------------------------------------------------


def test_constants(impl):
    assert (impl.FORWARD, impl.REPLY, impl.DROP) == (0, 1, 2)
    assert impl.DROP_REASONS == DROP_REASONS
    assert impl.SYSCALL_KINDS == SYSCALL_KINDS
    assert (impl.HIST_BUCKETS, impl.MAX_BATCH, impl.MAX_SLOT) == (8, 64, 65536)
    assert (impl.REPLY_MAX, impl.ICMP_TTL, impl.DEFAULT_PORT) == (96, 8, 8285)


# The twin's mirrors of fastpath.h's constants (each name is the header's without FP_).
MIRRORED = (
    "DEFAULT_PORT",
    "MAX_BATCH",
    "MAX_SLOT",
    "REPLY_MAX",
    "ICMP_TTL",
    "GSO_MAX_SEGS",
    "IP_MAX_LEN",
    "HIST_BUCKETS",
    "STEER_MAX_SOCKS",
    "VNET_HDR_LEN",
    "VNET_F_NEEDS_CSUM",
    "VNET_GSO_NONE",
    "VNET_GSO_TCPV4",
    "VNET_GSO_UDP_L4",
    "VNET_GSO_ECN",
)


def test_constants_are_the_headers(impl, py_impl):
    """Every integer either implementation exposes under a fastpath.h name has the header's
    value, and the twin mirrors the ones it uses."""
    header = _header_constants()
    assert set(MIRRORED) <= set(header)
    for name in MIRRORED:
        assert getattr(py_impl, name) == header[name], name
    for name, value in header.items():
        if isinstance(getattr(impl, name, None), int):
            assert getattr(impl, name) == value, name
    # the header sizes, as the header derives them
    assert header["UDP_MAX_PAYLOAD"] == header["IP_MAX_LEN"] - 20 - 8
    assert header["SEG_HDR_MAX"] == 60 + 60
    assert header["SPAN_HDR_MAX"] == header["VNET_HDR_LEN"] + header["SEG_HDR_MAX"]
    assert header["AUX_MIN"] >= header["IP_MAX_LEN"] + header["MAX_QUEUE"] * header["SEG_HDR_MAX"]
    assert header["AUX_MIN"] >= header["MAX_QUEUE"] * header["SPAN_HDR_MAX"]


@pytest.mark.parametrize("mtu", [0, 67, 65536, 100000])
def test_context_rejects_mtu(impl, mtu):
    with pytest.raises(ValueError):
        impl.Context(LOCAL, mtu)


@pytest.mark.parametrize("mtu", [68, 1500, 65535])
def test_context_accepts_mtu(impl, mtu):
    assert impl.Context(LOCAL, mtu).stats() == zero_stats()


def test_stats_is_a_snapshot(impl):
    cx = ctx(impl)
    before = cx.stats()
    run(impl, "egress", b"", cx)
    assert before == zero_stats()
    assert nonzero(cx.stats()) == {"egress.drops.too_short": 1}


# --- drops ----------------------------------------------------------------------------------

OPT = ipv4_udp(SRC, DST, b"y" * 12, options=b"\x01" * 4)  # IHL 24, 44 bytes
BIG = ipv4_udp(SRC, DST, b"z" * 73)  # 101 bytes

# (id, packet, context kwargs, reason, expected Decision.length)
DROP_CASES = [
    ("empty", b"", {}, "too_short", 0),
    ("19 bytes", P[:19], {}, "too_short", 19),
    ("19 bytes of ipv6", b"\x60" * 19, {}, "too_short", 19),
    ("ipv6", b"\x60" + bytes(39), {}, "not_ipv4", 40),
    ("version 0", mutate(P, version=0), {}, "not_ipv4", 48),
    ("version 5", mutate(P, version=5), {}, "not_ipv4", 48),
    ("version 15", mutate(P, version=15), {}, "not_ipv4", 48),
    ("ihl 0", mutate(P, ihl=0), {}, "bad_header", 48),
    ("ihl 4", mutate(P, ihl=4), {}, "bad_header", 48),
    ("ihl beyond data", mutate(P[:40], ihl=11), {}, "bad_header", 40),
    ("ihl 15 in 48 bytes", mutate(P, ihl=15), {}, "bad_header", 48),
    ("ihl 5 in 20 bytes ok, tot 0", mutate(P, total_length=0), {}, "bad_header", 48),
    ("tot 19", mutate(P, total_length=19), {}, "bad_header", 48),
    ("tot < ihl with options", mutate(OPT, total_length=23), {}, "bad_header", 44),
    ("bad header beats truncated", mutate(P, ihl=4, total_length=999), {}, "bad_header", 48),
    ("tot one too many", mutate(P, total_length=49), {}, "truncated", 48),
    ("cut short", P[:40], {}, "truncated", 40),
    ("tot 65535", mutate(P, total_length=65535), {}, "truncated", 48),
    ("truncated beats checksum", mutate(P[:30], checksum=0), {}, "truncated", 30),
    ("over mtu", BIG, {"mtu": 100}, "oversize", 101),
    ("over mtu, trailing bytes", BIG + b"junk", {"mtu": 100}, "oversize", 101),
    ("over mtu 68", ipv4_udp(SRC, DST, b"a" * 41), {"mtu": 68}, "oversize", 69),
    ("oversize beats checksum", mutate(BIG, checksum=0), {"mtu": 100}, "oversize", 101),
    ("checksum off by one", mutate(P, checksum=field(P, "checksum") ^ 1), {}, "bad_checksum", 48),
    ("checksum zero", mutate(P, checksum=0), {}, "bad_checksum", 48),
    ("ttl changed", mutate(P, ttl=63, fix_checksum=False), {}, "bad_checksum", 48),
    ("option byte", OPT[:21] + b"\x02" + OPT[22:], {}, "bad_checksum", 44),
    ("checksum beats ttl", mutate(P, ttl=0, fix_checksum=False), {}, "bad_checksum", 48),
    (
        "trimmed, bad checksum",
        mutate(P, checksum=1) + b"trailer",
        {},
        "bad_checksum",
        48,
    ),
]


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize(
    ("pkt", "kw", "reason", "length"),
    [c[1:] for c in DROP_CASES],
    ids=[c[0] for c in DROP_CASES],
)
def test_drop(impl, direction, pkt, kw, reason, length):
    d, after, stats = run(impl, direction, pkt, ctx(impl, **kw))
    assert d == (impl.DROP, length, None, None)
    assert after == pkt, "a dropped packet is left as it was"
    assert nonzero(stats) == {f"{direction}.drops.{reason}": 1}


def test_no_route(impl):
    pkt = ipv4_udp(SRC, UNROUTED, b"q" * 30)
    d, after, stats = run(impl, "egress", pkt)
    assert d == (impl.REPLY, len(pkt), None, icmp_error(LOCAL, pkt, 3))
    assert after == pkt
    assert nonzero(stats) == {"egress.drops.no_route": 1, "icmp_unreachable": 1}


def test_no_route_checksum_checked_first(impl):
    pkt = mutate(ipv4_udp(SRC, UNROUTED), checksum=7)
    d, _, stats = run(impl, "egress", pkt)
    assert d.verdict == impl.DROP
    assert nonzero(stats) == {"egress.drops.bad_checksum": 1}


def test_empty_route_table(impl):
    d, _, stats = run(impl, "egress", P, rt=impl.Routes())
    assert d == (impl.REPLY, 48, None, icmp_error(LOCAL, P, 3))
    assert nonzero(stats) == {"egress.drops.no_route": 1, "icmp_unreachable": 1}


def test_ingress_needs_no_route(impl):
    pkt = ipv4_udp(SRC, UNROUTED)
    d, after, stats = run(impl, "ingress", pkt)
    assert d == (impl.FORWARD, len(pkt), None, None)
    assert after == forwarded(pkt)
    assert nonzero(stats) == {}


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_exceeded(impl, direction, ttl):
    pkt = mutate(P, ttl=ttl)
    d, after, stats = run(impl, direction, pkt)
    assert d == (impl.REPLY, 48, None, icmp_error(LOCAL, pkt, 11))
    assert after == pkt
    assert nonzero(stats) == {f"{direction}.drops.ttl_exceeded": 1, "icmp_time_exceeded": 1}


def test_ttl_checked_before_route(impl):
    pkt = ipv4_udp(SRC, UNROUTED, ttl=1)
    d, _, stats = run(impl, "egress", pkt)
    assert d.reply == icmp_error(LOCAL, pkt, 11)
    assert nonzero(stats) == {"egress.drops.ttl_exceeded": 1, "icmp_time_exceeded": 1}


# --- forwarding -----------------------------------------------------------------------------

FORWARD_CASES = [
    ("udp", P),
    ("ttl 2", mutate(P, ttl=2)),
    ("ttl 255", mutate(P, ttl=255)),
    ("header only", ipv4(SRC, DST, 6)),
    ("options", OPT),
    ("40 bytes of options", ipv4_udp(SRC, DST, options=b"\x01" * 40)),
    ("icmp echo", ipv4_icmp_echo(SRC, DST)),
    ("icmp error", ipv4(SRC, DST, 1, icmp(3, 1, bytes(4) + P[:28]))),
    ("fragment", ipv4_udp(SRC, DST, flags_frag=0x2000 | 185)),
    ("odd length", ipv4_udp(SRC, DST, b"abc")),
    ("tos, ident", ipv4_udp(SRC, DST, tos=0xB8, ident=0xBEEF)),
    ("src 0", ipv4_udp("0.0.0.0", DST)),
]


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("pkt", [c[1] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_forward(impl, direction, pkt):
    d, after, stats = run(impl, direction, pkt)
    hop = PEER if direction == "egress" else None
    assert d == (impl.FORWARD, len(pkt), hop, None)
    assert after == forwarded(pkt)
    assert header_ok(after)
    assert after[8] == pkt[8] - 1
    assert nonzero(stats) == {}, "forwarding counts nothing in the core (tx is the pumps')"


@pytest.mark.parametrize("direction", DIRS)
def test_trailing_bytes_trimmed(impl, direction):
    pkt = P + b"trailing junk"
    d, after, _ = run(impl, direction, pkt)
    assert d.verdict == impl.FORWARD
    assert d.length == 48
    assert after == forwarded(P) + b"trailing junk", "bytes past the total length are untouched"


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("mtu", [68, 101, 1500])
def test_exactly_mtu_is_forwarded(impl, direction, mtu):
    pkt = ipv4_udp(SRC, DST, b"m" * (mtu - 28))
    assert len(pkt) == mtu
    d, _, _ = run(impl, direction, pkt + b"extra", ctx(impl, mtu=mtu))
    assert (d.verdict, d.length) == (impl.FORWARD, mtu)


def _checksum_extremes() -> list[bytes]:
    """Valid headers whose checksum field is 0x0000, and the same with 0xffff (also valid)."""
    for ident in range(65536):
        pkt = ipv4_udp(SRC, DST, ident=ident)
        if field(pkt, "checksum") == 0:
            return [pkt, mutate(pkt, checksum=0xFFFF)]
    raise AssertionError("no ident gives checksum 0")


@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("pkt", _checksum_extremes(), ids=["0x0000", "0xffff"])
def test_checksum_field_extremes(impl, direction, pkt):
    d, after, _ = run(impl, direction, pkt)
    assert d.verdict == impl.FORWARD
    assert after == forwarded(pkt)


@pytest.mark.parametrize("direction", DIRS)
def test_ttl_decrement_many_headers(impl, direction):
    rng = random.Random(1624)
    cx, rt = ctx(impl), routes(impl)
    for _ in range(3000):
        pkt = ipv4_udp(
            ip(SRC) + rng.randrange(1000),
            ip(DST) + rng.randrange(1000),
            rng.randbytes(rng.randrange(30)),
            ttl=rng.randrange(2, 256),
            ident=rng.randrange(65536),
            tos=rng.randrange(256),
            flags_frag=rng.choice([0, 0x4000, 0x2000 | rng.randrange(8192)]),
        )
        d, after, _ = run(impl, direction, pkt, cx, rt)
        assert d.verdict == impl.FORWARD
        assert after == forwarded(pkt), pkt.hex()


# --- ICMP errors ----------------------------------------------------------------------------

REPLY_CASES = [
    ("udp", ipv4_udp(SRC, UNROUTED, b"p" * 40)),
    ("quote shorter than 8", ipv4_udp(SRC, UNROUTED, b"")),
    ("odd quote", ipv4(SRC, UNROUTED, 17, b"abc")),
    ("header only", ipv4(SRC, UNROUTED, 6)),
    ("60-byte header", ipv4_udp(SRC, UNROUTED, b"w" * 30, options=b"\x01" * 40)),
    ("icmp echo", ipv4_icmp_echo(SRC, UNROUTED)),
    ("icmp echo reply", ipv4(SRC, UNROUTED, 1, icmp(0, 0, bytes(8)))),
    ("icmp timestamp", ipv4(SRC, UNROUTED, 1, icmp(13, 0, bytes(16)))),
    ("icmp, one byte, type 8", ipv4(SRC, UNROUTED, 1, b"\x08")),
    ("first fragment", ipv4_udp(SRC, UNROUTED, flags_frag=0x2000)),
    ("dont fragment", ipv4_udp(SRC, UNROUTED, flags_frag=0x4000)),
    ("src 223.255.255.255", ipv4_udp("223.255.255.255", UNROUTED)),
    ("src 0.0.0.1", ipv4_udp("0.0.0.1", UNROUTED)),
    ("dst 223.255.255.255", ipv4_udp(SRC, "223.255.255.255")),
]


@pytest.mark.parametrize(
    ("trigger", "direction"), [("ttl", "egress"), ("ttl", "ingress"), ("route", "egress")]
)
@pytest.mark.parametrize("pkt", [c[1] for c in REPLY_CASES], ids=[c[0] for c in REPLY_CASES])
def test_icmp_reply_bytes(impl, trigger, direction, pkt):
    if trigger == "ttl":
        pkt = mutate(pkt, ttl=1)
    d, after, stats = run(impl, direction, pkt)
    expected = icmp_error(LOCAL, pkt, 11 if trigger == "ttl" else 3)
    assert d == (impl.REPLY, len(pkt), None, expected)
    assert len(d.reply) <= impl.REPLY_MAX
    assert header_ok(d.reply)
    assert cksum(d.reply[20:]) == 0
    assert after == pkt
    counter = "icmp_time_exceeded" if trigger == "ttl" else "icmp_unreachable"
    assert stats[counter] == 1


def test_icmp_reply_largest(impl):
    pkt = ipv4_udp(SRC, UNROUTED, b"w" * 30, options=b"\x01" * 40)
    d, _, _ = run(impl, "egress", pkt)
    assert len(d.reply) == impl.REPLY_MAX == 96


def test_icmp_quote_stops_at_total_length(impl):
    pkt = ipv4(SRC, UNROUTED, 17, b"abc")  # 23 bytes, then junk the quote must not include
    d, _, _ = run(impl, "egress", pkt + b"JUNKJUNKJUNK")
    assert d.reply == icmp_error(LOCAL, pkt, 3)
    assert len(d.reply) == 20 + 8 + 23


def test_icmp_reply_fields(impl):
    d, _, _ = run(impl, "egress", ipv4_udp(SRC, UNROUTED, tos=0x10, ident=77, ttl=9))
    r = d.reply
    assert r[0] == 0x45 and r[1] == 0 and field(r, "total_length") == len(r) == 56
    assert field(r, "ident") == 0 and field(r, "flags_frag") == 0
    assert field(r, "ttl") == 8 and field(r, "proto") == 1
    assert field(r, "src") == LOCAL and field(r, "dst") == ip(SRC)
    assert r[20:28] == bytes([3, 0]) + r[22:24] + bytes(4)


NOT_ALLOWED = [
    *(
        (f"icmp type {t}", ipv4(SRC, UNROUTED, 1, icmp(t, 0, bytes(4) + P[:28])))
        for t in (3, 4, 5, 11, 12)
    ),
    ("icmp type 3 code 4", ipv4(SRC, UNROUTED, 1, icmp(3, 4, bytes(4) + P[:28]))),
    ("icmp, no header", ipv4(SRC, UNROUTED, 1)),
    ("icmp, one byte, type 3", ipv4(SRC, UNROUTED, 1, b"\x03")),
    ("icmp, header only in trailer", ipv4(SRC, UNROUTED, 1) + b"\x08\x00\x00\x00"),
    ("fragment offset 1", ipv4_udp(SRC, UNROUTED, flags_frag=1)),
    ("fragment offset max", ipv4_udp(SRC, UNROUTED, flags_frag=0x1FFF)),
    ("middle fragment", ipv4_udp(SRC, UNROUTED, flags_frag=0x2000 | 100)),
    ("src 0.0.0.0", ipv4_udp("0.0.0.0", UNROUTED)),
    ("src 224.0.0.0", ipv4_udp("224.0.0.0", UNROUTED)),
    ("src 224.0.0.1", ipv4_udp("224.0.0.1", UNROUTED)),
    ("src 239.255.255.255", ipv4_udp("239.255.255.255", UNROUTED)),
    ("src 240.0.0.1", ipv4_udp("240.0.0.1", UNROUTED)),
    ("src 255.255.255.255", ipv4_udp("255.255.255.255", UNROUTED)),
    ("dst 224.0.0.0", ipv4_udp(SRC, "224.0.0.0")),
    ("dst 239.1.2.3", ipv4_udp(SRC, "239.1.2.3")),
    ("dst 255.255.255.255", ipv4_udp(SRC, "255.255.255.255")),
]


@pytest.mark.parametrize(
    ("trigger", "direction"), [("ttl", "egress"), ("ttl", "ingress"), ("route", "egress")]
)
@pytest.mark.parametrize("pkt", [c[1] for c in NOT_ALLOWED], ids=[c[0] for c in NOT_ALLOWED])
def test_icmp_not_allowed(impl, trigger, direction, pkt):
    if trigger == "ttl":
        pkt = mutate(pkt, ttl=1)
    cx = ctx(impl, icmp_burst=1)
    d, after, stats = run(impl, direction, pkt, cx)
    assert d == (impl.DROP, field(pkt, "total_length"), None, None)
    assert after == pkt
    reason = "ttl_exceeded" if trigger == "ttl" else "no_route"
    assert nonzero(stats) == {f"{direction}.drops.{reason}": 1}, "not even icmp_ratelimited"
    # ...and no token was spent: the one token in the bucket still answers the next offender.
    ok = mutate(ipv4_udp(SRC, UNROUTED), ttl=1 if trigger == "ttl" else 64)
    assert run(impl, direction, ok, cx)[0].verdict == impl.REPLY


# --- the token bucket -----------------------------------------------------------------------

OFFENDER = ipv4_udp(SRC, DST, ttl=1)


def icmp_verdicts(impl, cx, times) -> str:
    """'R' for a reply, 'D' for a drop, per TTL-exceeded offender at each time (ns)."""
    out = ""
    for t in times:
        d, _, _ = run(impl, "ingress", OFFENDER, cx, now=t)
        assert d.verdict in (impl.REPLY, impl.DROP)
        out += "R" if d.verdict == impl.REPLY else "D"
    return out


def test_bucket_burst(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=3)
    assert icmp_verdicts(impl, cx, [NOW] * 5) == "RRRDD"
    s = cx.stats()
    assert (s["icmp_time_exceeded"], s["icmp_ratelimited"]) == (3, 2)
    assert s["ingress"]["drops"]["ttl_exceeded"] == 5


@pytest.mark.parametrize("now", [0, 5, SEC - 1])
def test_bucket_starts_full(impl, now):
    cx = ctx(impl, icmp_rate=1, icmp_burst=2)
    assert icmp_verdicts(impl, cx, [now] * 3) == "RRD"


def test_bucket_refill(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=2)  # one token per ms
    t = NOW
    times = [t, t, t, t + 999_999, t + 1_000_000, t + 1_000_000, t + 1_999_999, t + 2_000_000]
    assert icmp_verdicts(impl, cx, times) == "RRDDRDDR"


def test_bucket_keeps_fractions(impl):
    # rate 3: a token every 333,333,333.3 ns; icmp_last_ns advances by whole tokens only.
    cx = ctx(impl, icmp_rate=3, icmp_burst=1)
    t = NOW
    times = [t, t + 333_333_333, t + 333_333_334, t + 666_666_666, t + 666_666_667]
    assert icmp_verdicts(impl, cx, times) == "RDRDR"


def test_bucket_capped_at_burst(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=2)
    t = NOW
    assert icmp_verdicts(impl, cx, [t, t, t + SEC // 2, t + SEC // 2, t + SEC // 2]) == "RRRRD"


def test_bucket_full_after_a_second(impl):
    cx = ctx(impl, icmp_rate=1, icmp_burst=4)
    t = NOW
    assert icmp_verdicts(impl, cx, [t] * 5) == "RRRRD"
    assert icmp_verdicts(impl, cx, [t + SEC - 1]) == "D"
    assert icmp_verdicts(impl, cx, [t + SEC] * 5) == "RRRRD"


def test_bucket_clock_backwards(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=1)
    assert icmp_verdicts(impl, cx, [NOW, NOW - SEC, NOW - 1, NOW + 999_999, NOW + 1_000_000]) == (
        "RDDDR"
    )


def test_bucket_rate_zero(impl):
    cx = ctx(impl, icmp_rate=0, icmp_burst=100)
    assert icmp_verdicts(impl, cx, [NOW, NOW + 5 * SEC]) == "DD"
    assert nonzero(cx.stats()) == {"ingress.drops.ttl_exceeded": 2, "icmp_ratelimited": 2}


def test_bucket_burst_zero(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=0)
    assert icmp_verdicts(impl, cx, [NOW, NOW + 5 * SEC]) == "DD"
    assert cx.stats()["icmp_ratelimited"] == 2


def test_bucket_shared_by_both_directions_and_types(impl):
    cx = ctx(impl, icmp_rate=1000, icmp_burst=2)
    rt = routes(impl)
    assert run(impl, "egress", ipv4_udp(SRC, UNROUTED), cx, rt)[0].verdict == impl.REPLY
    assert run(impl, "ingress", OFFENDER, cx)[0].verdict == impl.REPLY
    assert run(impl, "egress", OFFENDER, cx, rt)[0].verdict == impl.DROP
    assert run(impl, "egress", ipv4_udp(SRC, UNROUTED), cx, rt)[0].verdict == impl.DROP
    assert nonzero(cx.stats()) == {
        "egress.drops.no_route": 2,
        "egress.drops.ttl_exceeded": 1,
        "ingress.drops.ttl_exceeded": 1,
        "icmp_unreachable": 1,
        "icmp_time_exceeded": 1,
        "icmp_ratelimited": 2,
    }


def bucket_model(rate: int, burst: int, times: list[int]) -> str:
    """The token bucket of fastpath.h, restated independently of both implementations."""
    tokens, last, out = burst, 0, ""
    for now in times:
        if rate == 0:
            out += "D"
            continue
        elapsed = max(now - last, 0)
        if elapsed >= SEC:
            tokens, last = burst, now
        elif (add := elapsed * rate // SEC) > 0:
            tokens = min(burst, tokens + add)
            last += add * SEC // rate
        out += "R" if tokens > 0 else "D"
        tokens -= tokens > 0
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.sampled_from([0, 1, 3, 7, 1000, 999_999, 10**9, 2**32 - 1]),
    burst=st.integers(0, 5),
    steps=st.lists(st.integers(-(10**6), 2 * SEC), max_size=40),
)
def test_bucket_matches_model(impl, rate, burst, steps):
    times, t = [], NOW
    for s in steps:
        t = max(t + s, 0)
        times.append(t)
    cx = ctx(impl, icmp_rate=rate, icmp_burst=burst)
    assert icmp_verdicts(impl, cx, times) == bucket_model(rate, burst, times)


# --- checksum -------------------------------------------------------------------------------


def test_checksum_exhaustive_lengths(impl):
    rng = random.Random(1071)
    for n in range(2001):
        data = rng.randbytes(n)
        assert impl.checksum(data) == cksum(data), n
    for n in (0, 1, 2, 3, 1999, 2000):
        for fill in (b"\0", b"\xff", b"\x80", b"\x01"):
            assert impl.checksum(fill * n) == cksum(fill * n), (n, fill)


def test_checksum_known_values(impl):
    assert impl.checksum(b"") == 0xFFFF
    assert impl.checksum(b"\0\0") == 0xFFFF
    assert impl.checksum(b"\xff\xff") == 0
    assert impl.checksum(b"\x01") == 0xFEFF  # odd length: padded on the right
    # RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
    assert impl.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert impl.checksum(P[:20]) == 0


def test_checksum_buffer_types(impl):
    data = P[:20] + b"\x12"
    want = cksum(data)
    assert impl.checksum(bytearray(data)) == want
    assert impl.checksum(memoryview(data)) == want
    assert impl.checksum(memoryview(b"xx" + data)[2:]) == want


# --- properties: C and Python agree ---------------------------------------------------------

ADDRS = st.one_of(
    st.integers(ip("198.18.0.0"), ip("198.19.255.255")),
    st.sampled_from([ip(DST), ip(UNROUTED), 0, ip("224.0.0.1"), 0xFFFFFFFF, ip("223.1.1.1")]),
)
ICMP_TYPES = st.sampled_from([0, 3, 4, 5, 8, 11, 12, 13, 255])


@st.composite
def valid_packets(draw) -> bytes:
    proto = draw(st.sampled_from([1, 6, 17, 47]))
    if proto == 1 and draw(st.booleans()):
        payload = icmp(draw(ICMP_TYPES), draw(st.integers(0, 15)), draw(st.binary(max_size=40)))
    else:
        payload = draw(st.binary(max_size=80))
    return ipv4(
        draw(ADDRS),
        draw(ADDRS),
        proto,
        payload,
        ttl=draw(st.one_of(st.integers(0, 3), st.integers(0, 255))),
        ident=draw(st.integers(0, 65535)),
        flags_frag=draw(st.sampled_from([0, 0x4000, 0x2000, 1, 0x1FFF, 0x2000 | 77])),
        tos=draw(st.integers(0, 255)),
        options=draw(st.binary(max_size=40)),
    )


@st.composite
def mutated_packets(draw) -> bytes:
    pkt = draw(valid_packets())
    names = draw(
        st.sets(st.sampled_from(["version", "ihl", "total_length", "ttl", "checksum", "proto"]))
    )
    fields = {}
    for name in names:
        if name == "version":
            fields[name] = draw(st.sampled_from([4, 4, 6, 0, 15]))
        elif name == "ihl":
            fields[name] = draw(st.integers(0, 15))
        elif name == "total_length":
            n = len(pkt)
            fields[name] = draw(st.sampled_from([0, 19, 20, n - 1, n + 1, 65535, n // 2]))
        elif name == "checksum":
            fields[name] = draw(st.integers(0, 65535))
        else:
            fields[name] = draw(st.integers(0, 255))
    return mutate(pkt, fix_checksum=draw(st.booleans()), **fields)


@st.composite
def any_packets(draw) -> bytes:
    pkt = draw(
        st.one_of(st.binary(max_size=120), valid_packets(), mutated_packets(), mutated_packets())
    )
    tail = draw(st.sampled_from(["none", "none", "cut", "extend"]))
    if tail == "cut":
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    elif tail == "extend":
        pkt += draw(st.binary(min_size=1, max_size=30))
    return pkt


def make_routes(impl):
    rt = impl.Routes()
    rt.set(ip("198.19.0.0"), 16, *PEER)
    rt.set(ip("198.18.128.0"), 17, ip("198.18.200.2"), 9999)
    rt.set(ip("198.19.1.5"), 32, ip("198.18.200.3"), 1)
    rt.set(ip("198.18.4.0"), 22, ip("198.18.200.4"), 65535)
    return rt


# Datagram sources: the four peers of make_routes, and strangers.
PEER_IPS = [ip("198.18.200.1"), ip("198.18.200.2"), ip("198.18.200.3"), ip("198.18.200.4")]
SOURCES = st.sampled_from([*PEER_IPS, ip("198.18.200.5"), 0, ip(SRC)])
STEPS = st.lists(
    st.tuples(st.sampled_from(DIRS), any_packets(), st.integers(0, SEC // 100), SOURCES),
    min_size=1,
    max_size=12,
)
CONTEXTS = st.fixed_dictionaries(
    {
        "mtu": st.sampled_from([68, 100, 576, 1500, 65535]),
        "icmp_rate": st.sampled_from([0, 3, 1000]),
        "icmp_burst": st.integers(0, 3),
        "peer_check": st.sampled_from(["strict", "strict", "peer-only", "off"]),
        "subnet": st.sampled_from(
            [None, (ip("198.19.1.0"), 24), (ip("198.18.0.0"), 15), (ip("198.19.0.0"), 16), (0, 0)]
        ),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=CONTEXTS, steps=STEPS)
def test_c_and_python_agree(py_impl, c_impl, kw, steps):
    impls = (py_impl, c_impl)
    cxs = [ctx(m, **kw) for m in impls]
    rts = [make_routes(m) for m in impls]
    now = NOW
    for direction, pkt, dt, src in steps:
        now += dt
        py, c = (
            run(m, direction, pkt, cx, rt, now, src)
            for m, cx, rt in zip(impls, cxs, rts, strict=True)
        )
        assert c[0] == py[0], (direction, pkt.hex())
        assert type(c[0].verdict) is int and type(c[0].length) is int
        assert c[1] == py[1], (direction, pkt.hex())
        assert c[2] == py[2], (direction, pkt.hex())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=CONTEXTS, direction=st.sampled_from(DIRS), pkt=any_packets(), src=SOURCES)
def test_decision_invariants(impl, kw, direction, pkt, src):
    cx = ctx(impl, **kw)
    rt = make_routes(impl)
    d, after, stats = run(impl, direction, pkt, cx, rt, src=src)
    flat = nonzero(stats)
    check = kw["peer_check"] if direction == "ingress" else "off"
    if check != "off" and rt.peer(src) is None:
        assert d == (impl.DROP, len(pkt), None, None), "a stranger's datagram is not looked at"
        assert flat == {"ingress.drops.unknown_peer": 1}
        return
    if d.verdict == impl.FORWARD:
        assert flat == {}
        if check == "strict":
            assert rt.from_peer(src, field(pkt, "src")), "inner source in the sender's subnet"
            net, plen = cx.subnet
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            dst = field(pkt, "dst")
            assert dst & mask == net or dst == LOCAL, "inner destination this node's"
        assert d.reply is None and (d.hop is None) == (direction == "ingress")
        assert header_ok(after), "a forwarded packet has a valid header checksum"
        assert after[8] == pkt[8] - 1, "...and a TTL one less"
        assert after[:8] + after[9:10] + after[12:] == pkt[:8] + pkt[9:10] + pkt[12:]
        assert 20 <= d.length <= min(len(pkt), kw["mtu"])
        assert d.length == field(pkt, "total_length")
    else:
        assert after == pkt, "a packet not forwarded is not modified"
        assert d.hop is None
        drops = [k for k in flat if ".drops." in k]
        assert len(drops) == 1 and flat[drops[0]] == 1
        assert drops[0].startswith(direction)
        if d.verdict == impl.REPLY:
            if direction == "ingress":
                assert "ingress.drops.ttl_exceeded" in flat, "only TTL is answered on ingress"
            assert d.reply is not None and 28 < len(d.reply) <= impl.REPLY_MAX
            assert header_ok(d.reply) and cksum(d.reply[20:]) == 0
            assert d.reply[12:16] == LOCAL.to_bytes(4, "big") and d.reply[16:20] == pkt[12:16]
            assert d.reply[28:] == pkt[: len(d.reply) - 28]
        else:
            assert d.verdict == impl.DROP and d.reply is None
