# TUN offloads, sans IO: gso_split (fp_gso_split) and gro_coalesce (fp_gro_coalesce) over both
# implementations, checked against segments and super-packets built independently (tests/packets.py:
# struct + cksum only), then hypothesis properties: random super-packets split into valid
# MTU-sized packets, split -> coalesce -> split round trips, and fuzzed input never crashing,
# raising only the documented exceptions, C == Python byte for byte.
from __future__ import annotations

import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import (
    ACK,
    CWR,
    DF,
    ECE,
    FIN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    L4_DPORT,
    L4_DST,
    L4_SPORT,
    L4_SRC,
    NEEDS_CSUM,
    PSH,
    RST,
    SYN,
    TS_OPTS,
    URG,
    cksum,
    complete,
    expect_tcp,
    expect_udp,
    flow,
    header_ok,
    ipv4,
    l4_ok,
    mutate,
    payload,
    pseudo,
    ref_merge,
    set_l4_csum,
    tcp4,
    tcp_hdr,
    tso,
    udp4,
    uso,
    vnet,
)

SRC, DST, SPORT, DPORT = L4_SRC, L4_DST, L4_SPORT, L4_DPORT

ERRORS = (ValueError, OverflowError, MemoryError)  # -EINVAL, -EMSGSIZE, -ENOSPC


def split_runs(pkts: list[bytes], sizes: list[int]) -> list[list[bytes]]:
    out, at = [], 0
    for n in sizes:
        out.append(pkts[at : at + n])
        at += n
    assert at == len(pkts)
    return out


# --- gso_split: table ------------------------------------------------------------------------

DATA = payload(3000, seed=7)
PLAIN = tcp4(b"hello", flags=ACK | PSH)
BIG_PLAIN = tcp4(DATA[:1461], flags=ACK | PSH)  # 1501 bytes


def _udp_zero_payload() -> bytes:
    """A 10-byte payload whose UDP checksum computes to 0 (sent as 0xffff, RFC 768): the last
    word is chosen to make the sum fold to 0xffff."""
    base = udp4(b"abcdefgh" + b"\0\0", csum="zero")
    s = 0xFFFF - cksum(pseudo(base) + base[20:])  # the folded sum so far (never 0 here)
    return b"abcdefgh" + struct.pack(">H", (0xFFFF - s) % 0xFFFF)


def _tcp_summing_to_zero() -> bytes:
    base = tcp4(b"abcdefgh" + b"\0\0", csum="zero")
    s = 0xFFFF - cksum(pseudo(base) + base[20:])
    return tcp4(b"abcdefgh" + struct.pack(">H", (0xFFFF - s) % 0xFFFF), csum="partial")


UDP_ZERO_DATA = _udp_zero_payload()
UDP_ZERO = udp4(UDP_ZERO_DATA, csum="partial")
TCP_ZERO = _tcp_summing_to_zero()
FRAG = tcp4(b"frag", flags_frag=0x2000)

# (id, input frame, mtu, expected segments)
SPLIT_OK = [
    ("none-as-is", vnet() + PLAIN, 1500, [PLAIN]),
    (
        "none-no-csum-untouched",  # without NEEDS_CSUM nothing is checked or changed
        vnet() + tcp4(b"x", csum="partial"),
        1500,
        [tcp4(b"x", csum="partial")],
    ),
    # bytes past the IPv4 total length are not part of the packet
    ("none-trailer-dropped", vnet() + PLAIN + b"junk", 1500, [PLAIN]),
    ("tcp-trailer-dropped", tso(DATA[:2500], 1000) + b"junk", 1500, expect_tcp(DATA[:2500], 1000)),
    ("none-gso-fields-ignored", vnet(0, GSO_NONE, 999, 1, 3, 4) + PLAIN, 1500, [PLAIN]),
    # a packet that is not cut is not held to the mtu: returned as it is, fp_egress drops it
    # as oversize later (test_vnet_gso_none_over_mtu_is_an_egress_drop)
    ("none-not-checked-against-mtu", vnet() + BIG_PLAIN, 1500, [BIG_PLAIN]),
    ("none-far-over-mtu", vnet() + BIG_PLAIN, 68, [BIG_PLAIN]),
    ("none-fragment", vnet() + FRAG, 1500, [FRAG]),
    (
        "none-needs-csum-tcp",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + tcp4(DATA[:999], csum="partial"),
        1500,
        [tcp4(DATA[:999])],
    ),
    (
        "none-needs-csum-udp",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6) + udp4(DATA[:777], csum="partial"),
        1500,
        [udp4(DATA[:777])],
    ),
    (
        "none-needs-csum-udp-zero-sent-as-ffff",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6) + UDP_ZERO,
        1500,
        [UDP_ZERO[:26] + b"\xff\xff" + UDP_ZERO[28:]],
    ),
    (
        "none-needs-csum-tcp-zero-stays-zero",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + TCP_ZERO,
        1500,
        [TCP_ZERO[:36] + b"\0\0" + TCP_ZERO[38:]],
    ),
    ("tcp-exact-multiple", tso(DATA, 1000), 1500, expect_tcp(DATA, 1000)),
    ("tcp-remainder", tso(DATA[:2501], 1000), 1500, expect_tcp(DATA[:2501], 1000)),
    ("tcp-one-segment", tso(DATA[:500], 1000), 1500, expect_tcp(DATA[:500], 1000)),
    ("tcp-zero-payload", tso(b"", 1000, flags=ACK | FIN), 1500, [tcp4(flags=ACK | FIN)]),
    (
        "tcp-options",
        tso(DATA, 1448 - 12, opts=TS_OPTS),
        1500,
        expect_tcp(DATA, 1436, opts=TS_OPTS),
    ),
    (
        "tcp-fin-psh-cwr-ece",
        tso(DATA, 700, flags=ACK | PSH | FIN | CWR | ECE | URG, urg=9),
        1500,
        expect_tcp(DATA, 700, flags=ACK | PSH | FIN | CWR | ECE | URG, urg=9),
    ),
    ("tcp-ecn-bit", tso(DATA, 1000, gso_type=GSO_TCPV4 | GSO_ECN), 1500, expect_tcp(DATA, 1000)),
    ("tcp-without-needs-csum", tso(DATA, 1000, vflags=0), 1500, expect_tcp(DATA, 1000)),
    (
        "tcp-ip-options",
        tso(DATA, 1000, ipopts=b"\x94\x04\0\0" * 2),
        1500,
        expect_tcp(DATA, 1000, ipopts=b"\x94\x04\0\0" * 2),
    ),
    (
        "tcp-seq-and-id-wrap",
        tso(DATA, 1000, seq=2**32 - 1500, ident=0xFFFF),
        1500,
        expect_tcp(DATA, 1000, seq=2**32 - 1500, ident=0xFFFF),
    ),
    ("tcp-segment-exactly-mtu", tso(DATA, 1460), 1500, expect_tcp(DATA, 1460)),
    (
        "tcp-64k",
        tso(payload(65535 - 52), 1448, opts=TS_OPTS),
        1500,
        expect_tcp(payload(65535 - 52), 1448, opts=TS_OPTS),
    ),
    ("tcp-ack-only", tso(DATA, 1000, flags=ACK), 1500, expect_tcp(DATA, 1000, flags=ACK)),
    ("udp-l4-exact-multiple", uso(DATA, 1000), 1500, expect_udp(DATA, 1000)),
    ("udp-l4-remainder", uso(DATA[:2222], 1000), 1500, expect_udp(DATA[:2222], 1000)),
    ("udp-l4-zero-payload", uso(b"", 1000), 1500, [udp4(b"")]),
    (
        "udp-l4-zero-checksum-sent-as-ffff",  # the first segment's checksum computes to 0
        uso(UDP_ZERO_DATA + DATA[:15], 10),
        1500,
        expect_udp(UDP_ZERO_DATA + DATA[:15], 10),
    ),
    (
        "udp-l4-ip-options",
        uso(DATA, 1400, ipopts=b"\x01" * 4),
        1432,
        expect_udp(DATA, 1400, ipopts=b"\x01" * 4),
    ),
]


@pytest.mark.parametrize(
    ("frame", "mtu", "want"), [c[1:] for c in SPLIT_OK], ids=[c[0] for c in SPLIT_OK]
)
def test_split(impl: ModuleType, frame: bytes, mtu: int, want: list[bytes]) -> None:
    got = impl.gso_split(frame, mtu)
    assert got == want
    if frame[1] != GSO_NONE:
        for seg in got:
            assert len(seg) <= mtu and header_ok(seg) and l4_ok(seg)


@pytest.mark.parametrize("hdr_len", [0, 1, 20, 40, 1000, 0xFFFF], ids=lambda n: f"hdr_len={n}")
def test_split_ignores_hdr_len(impl, hdr_len):
    frame = bytearray(tso(DATA, 1000, opts=TS_OPTS))
    struct.pack_into("<H", frame, 2, hdr_len)
    assert impl.gso_split(bytes(frame), 1500) == expect_tcp(DATA, 1000, opts=TS_OPTS)


def _with_tcp_offset(words: int) -> bytes:
    b = bytearray(tso(DATA, 1000))
    b[10 + 32] = words << 4
    return bytes(b)


# (id, input frame, mtu, max_segs, exception)
SPLIT_ERRORS = [
    ("empty", b"", 1500, 1024, ValueError),
    ("header-only", vnet(), 1500, 1024, ValueError),
    ("ip-header-cut", vnet() + PLAIN[:19], 1500, 1024, ValueError),
    ("ipv6", vnet() + b"\x60" + bytes(59), 1500, 1024, ValueError),
    ("version-0", vnet() + mutate(PLAIN, version=0), 1500, 1024, ValueError),
    ("ihl-4", vnet() + mutate(PLAIN, ihl=4), 1500, 1024, ValueError),
    ("ihl-past-end", vnet() + mutate(PLAIN[:20], ihl=6, total_length=20), 1500, 1024, ValueError),
    ("total-length-past-end", vnet() + mutate(PLAIN, total_length=46), 1500, 1024, ValueError),
    ("tso-truncated", tso(DATA, 1000)[:-1], 1500, 1024, ValueError),
    (
        "csum-start-in-ip-header",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 19, 16) + PLAIN,
        1500,
        1024,
        ValueError,
    ),
    (
        "csum-field-past-end",
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, len(PLAIN) - 21) + PLAIN,
        1500,
        1024,
        ValueError,
    ),
    (
        "tcpv4-on-udp",
        vnet(NEEDS_CSUM, GSO_TCPV4, 28, 100, 20, 6) + udp4(DATA),
        1500,
        1024,
        ValueError,
    ),
    ("udp-l4-on-tcp", tso(DATA, 1000, gso_type=GSO_UDP_L4), 1500, 1024, ValueError),
    ("gso-udp-ufo", tso(DATA, 1000, gso_type=3), 1500, 1024, ValueError),
    ("gso-tcpv6", tso(DATA, 1000, gso_type=4), 1500, 1024, ValueError),
    (
        "tcp-header-cut",
        vnet(1, GSO_TCPV4, 40, 100, 20, 16) + ipv4(SRC, DST, 6, bytes(19)),
        1500,
        1024,
        ValueError,
    ),
    ("tcp-offset-4", _with_tcp_offset(4), 1500, 1024, ValueError),
    ("tcp-offset-0", _with_tcp_offset(0), 1500, 1024, ValueError),
    (
        "tcp-options-cut",
        vnet(1, GSO_TCPV4, 40, 100, 20, 16)
        + ipv4(SRC, DST, 6, tcp_hdr(1, 2, ACK, 9, b"", 1, 2, 0)[:12] + b"\xf0" + bytes(20)),
        1500,
        1024,
        ValueError,
    ),
    ("gso-size-0", tso(DATA, 0), 1500, 1024, ValueError),
    ("fragment-mf", tso(DATA, 1000, flags_frag=0x2000), 1500, 1024, ValueError),
    ("fragment-offset", tso(DATA, 1000, flags_frag=0x0001), 1500, 1024, ValueError),
    ("udp-fragment", uso(DATA, 1000, flags_frag=0x2000 | 3), 1500, 1024, ValueError),
    ("tcp-segment-over-mtu", tso(DATA, 1461), 1500, 1024, OverflowError),
    ("udp-segment-over-mtu", uso(DATA, 1473), 1500, 1024, OverflowError),
    # a segment that would fit passes, whatever gso_size says (see test_split_short_payload)
    ("too-many-segments", tso(DATA, 1000), 1500, 2, MemoryError),
    ("too-many-udp-segments", uso(DATA + b"!", 1000), 1500, 3, MemoryError),
    # no room for even one segment is ENOSPC
    ("max-segs-0", vnet() + PLAIN, 1500, 0, MemoryError),
]


@pytest.mark.parametrize(
    ("frame", "mtu", "max_segs", "exc"),
    [c[1:] for c in SPLIT_ERRORS],
    ids=[c[0] for c in SPLIT_ERRORS],
)
def test_split_errors(impl, frame, mtu, max_segs, exc):
    with pytest.raises(exc):
        impl.gso_split(frame, mtu, max_segs)


@pytest.mark.parametrize("mtu", [68, 1500])
def test_split_gso_none_over_mtu_is_returned_as_is(impl, mtu):
    """fastpath.h: only a cut is held to the mtu; a GSO_NONE packet comes back whole (its
    checksum completed) and -EMSGSIZE is never returned for it."""
    partial = tcp4(DATA[:1461], csum="partial")
    frames = [vnet() + BIG_PLAIN, vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + partial]
    for frame, want in zip(frames, [BIG_PLAIN, tcp4(DATA[:1461])], strict=True):
        assert len(want) > mtu
        assert impl.gso_split(frame, mtu) == [want]
        if impl.__name__.endswith("fastpath"):  # the pump's zero-copy split too
            assert impl.gso_split_hdrs(frame, mtu) == [want]


def test_split_short_payload(impl):
    """gso_size over the mtu is fine when the one segment it yields fits; it is the segment
    that is held to the mtu."""
    assert impl.gso_split(tso(DATA[:10], 1461), 1500) == expect_tcp(DATA[:10], 1461)
    with pytest.raises(OverflowError):
        impl.gso_split(tso(DATA[:1461], 1461), 1500)


def test_split_limits_are_inclusive(impl):
    assert len(impl.gso_split(tso(DATA, 1000), 1500, max_segs=3)) == 3
    assert len(impl.gso_split(tso(DATA, 1460), 1500, max_segs=3)) == 3
    # the checksum field may be the last two bytes; what is written there is the complemented
    # sum from csum_start on, the field's old content (the pseudo-header sum) included
    pkt = tcp4(b"hell")
    frame = vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, len(pkt) - 22) + pkt
    assert impl.gso_split(frame, 1500) == [pkt[:-2] + struct.pack(">H", cksum(pkt[20:]))]


# --- gro_coalesce: table ---------------------------------------------------------------------

MSS = 100


def _flow_with(i: int, **kw) -> list[bytes]:
    """Six 100-byte segments of one flow; the i-th rebuilt with kw (its seq kept)."""
    pkts = flow([MSS] * 6)
    pkts[i] = tcp4(payload(MSS, seed=i), seq=1000 + i * MSS, ident=100 + i, **kw)
    return pkts


def _flow_from(i: int, **kw) -> list[bytes]:
    """Six segments of one flow, the ones from i on built with kw (e.g. an ACK moving on)."""
    return flow([MSS] * i) + flow([MSS] * (6 - i), seq=1000 + i * MSS, ident=100 + i, **kw)


def _seqs(seqs: list[int]) -> list[bytes]:
    return [tcp4(payload(MSS, seed=i), seq=s, ident=i) for i, s in enumerate(seqs)]


def _corrupt(pkt: bytes, at: int) -> bytes:
    b = bytearray(pkt)
    b[at] ^= 0x40
    return bytes(b)


def _ae_bit_from(i: int) -> list[bytes]:
    """Six segments, the ones from i on with the reserved/AE bit (byte 12, bit 0) set."""
    pkts = flow([MSS] * 6)
    for k in range(i, 6):
        b = bytearray(pkts[k])
        b[32] |= 0x01
        pkts[k] = set_l4_csum(b)
    return pkts


def _interleaved() -> list[bytes]:
    a = flow([MSS] * 4)
    b = flow([MSS] * 2, sport=40001, seq=77)
    return [a[0], a[1], b[0], b[1], a[2], a[3]]


FLOW6 = flow([MSS] * 6)
SHORT3 = flow([MSS, MSS, 50])

# (id, packets, expected run sizes)
COALESCE = [
    ("empty", [], []),
    ("single", [FLOW6[0]], [1]),
    ("one-flow", FLOW6, [6]),
    ("two-segments", FLOW6[:2], [2]),
    ("short-last", flow([MSS] * 5 + [40]), [6]),
    ("short-ends-run", flow([MSS, MSS, 40, MSS, MSS, MSS]), [3, 3]),
    ("longer-cannot-follow", flow([MSS, MSS, MSS + 1, MSS]), [2, 2]),
    ("psh-ends-run", _flow_with(2, flags=ACK | PSH), [3, 3]),
    ("psh-on-last", _flow_with(5, flags=ACK | PSH), [6]),
    ("gap", _seqs([1000, 1100, 1200, 1301, 1401, 1501]), [3, 3]),
    ("retransmit", _seqs([1000, 1100, 1200, 1200, 1300, 1400]), [3, 3]),
    ("out-of-order", _seqs([1000, 1200, 1100, 1300]), [1, 1, 1, 1]),
    ("seq-wrap", flow([MSS] * 6, seq=2**32 - 250), [6]),
    ("bad-tcp-checksum", [*FLOW6[:2], _corrupt(FLOW6[2], 60), *FLOW6[3:]], [2, 1, 3]),
    ("bad-checksum-first", [_corrupt(FLOW6[0], 50), *FLOW6[1:]], [1, 5]),
    ("syn", _flow_with(2, flags=ACK | SYN), [2, 1, 3]),
    ("fin", _flow_with(2, flags=ACK | FIN), [2, 1, 3]),
    ("rst", _flow_with(2, flags=ACK | RST), [2, 1, 3]),
    ("urg", _flow_with(2, flags=ACK | URG, urg=5), [2, 1, 3]),
    ("ece", _flow_with(2, flags=ACK | ECE), [2, 1, 3]),
    ("cwr", _flow_with(2, flags=ACK | CWR), [2, 1, 3]),
    ("no-ack", _flow_with(2, flags=PSH), [2, 1, 3]),
    ("other-sport", _flow_with(2, sport=SPORT + 1), [2, 1, 3]),
    ("other-dport", _flow_with(2, dport=DPORT + 1), [2, 1, 3]),
    ("other-src", _flow_with(2, src="198.19.1.6"), [2, 1, 3]),
    ("other-dst", _flow_with(2, dst="198.19.2.8"), [2, 1, 3]),
    ("window-differs", _flow_from(2, win=503), [2, 4]),
    ("ack-differs", _flow_from(2, ack=2001), [2, 4]),
    ("ttl-differs", _flow_from(2, ttl=63), [2, 4]),
    ("tos-differs", _flow_from(2, tos=0x10), [2, 4]),
    ("ecn-ce-differs", _flow_from(2, tos=0x03), [2, 4]),
    ("df-differs", _flow_from(2, flags_frag=0), [2, 4]),
    (
        "options-differ",
        [
            *flow([MSS] * 2, opts=TS_OPTS),
            *flow([MSS] * 4, seq=1200, ident=2, opts=TS_OPTS[:-1] + b"\x02"),
        ],
        [2, 4],
    ),
    ("ae-bit-differs", _ae_bit_from(2), [2, 4]),
    ("options-length-differs", _flow_from(2, opts=b"\x01" * 4), [2, 4]),
    ("with-options", flow([MSS] * 6, opts=TS_OPTS), [6]),
    ("ip-options", _flow_with(2, ipopts=b"\x01" * 4), [2, 1, 3]),
    ("ip-fragment", _flow_with(2, flags_frag=DF | 0x2000), [2, 1, 3]),
    ("ip-reserved-bit", _flow_with(2, flags_frag=DF | 0x8000), [2, 1, 3]),
    ("no-df-flow", flow([MSS] * 6, flags_frag=0), [6]),
    (
        "ip-id-ignored",
        [tcp4(payload(MSS, i), seq=1000 + i * MSS, ident=7 * i) for i in range(6)],
        [6],
    ),
    ("trailing-byte", [*FLOW6[:2], FLOW6[2] + b"\0", *FLOW6[3:]], [2, 1, 3]),
    # two trailing bytes that keep the TCP checksum (over the received length) valid: only the
    # IP total length tells that they are not part of the segment
    ("trailing-word-checksum-valid", [*SHORT3[:2], SHORT3[2] + b"\xff\xfd"], [2, 1]),
    ("pure-ack", [*FLOW6[:2], tcp4(b"", seq=1200), *flow([MSS] * 3, seq=1200)], [2, 1, 3]),
    ("not-tcp", [*FLOW6[:2], udp4(payload(MSS)), *FLOW6[2:]], [2, 1, 4]),
    ("interleaved-flows-keep-order", _interleaved(), [2, 2, 2]),
    ("garbage", [b"", b"\x45", bytes(40), b"\x45" + bytes(60)], [1, 1, 1, 1]),
    ("64-segment-cap", flow([10] * 70), [64, 6]),
    ("65535-byte-cap", flow([1400] * 47), [46, 1]),
    ("65535-exactly", flow([13099] * 6), [5, 1]),
    ("65535-exactly-with-short-last", flow([2729] * 23 + [2728]), [24]),
    ("65536-one-too-many", flow([2729] * 24), [23, 1]),
]


@pytest.mark.parametrize(("pkts", "runs"), [c[1:] for c in COALESCE], ids=[c[0] for c in COALESCE])
def test_coalesce(impl, pkts, runs):
    got = impl.gro_coalesce(pkts)
    assert [n for _, n in got] == runs
    assert [frame for frame, _ in got] == [ref_merge(r) for r in split_runs(pkts, runs)]
    for frame, n in got:
        if n > 1:
            pkt = complete(frame)
            assert len(pkt) <= 65535 and header_ok(pkt) and l4_ok(pkt)


def test_coalesce_header_fields(impl):
    pkts = flow([MSS] * 3 + [17], opts=TS_OPTS, flags=ACK, ident=4242)
    pkts[-1] = tcp4(payload(17, 3), seq=1300, ident=4245, opts=TS_OPTS, flags=ACK | PSH)
    [(frame, n)] = impl.gro_coalesce(pkts)
    assert n == 4
    assert struct.unpack_from("<BBHHHH", frame) == (NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16)
    pkt = frame[10:]
    assert struct.unpack_from(">HH", pkt, 2) == (len(pkt), 4242)  # length, the first's id
    assert pkt[33] == ACK | PSH
    assert pkt[52:] == b"".join(p[52:] for p in pkts)
    # the checksum field holds the folded pseudo-header sum (CHECKSUM_PARTIAL)
    assert struct.unpack_from(">H", pkt, 36)[0] == ~cksum(pseudo(pkt)) & 0xFFFF


# --- hypothesis: random super-packets --------------------------------------------------------

OPTIONS = st.sampled_from([b"", TS_OPTS, b"\x02\x04\x05\xb4", b"\x01" * 40, b"\x01\x01\x04\x02"])
IP_OPTIONS = st.sampled_from([b"", b"\x01" * 4, b"\x94\x04\0\0", b"\x01" * 40])
TCP_FLAGS = st.sets(st.sampled_from([FIN, PSH, URG, ECE, CWR])).map(lambda s: ACK | sum(s))


MSS_VALUES = st.one_of(st.sampled_from([1, 8, 536, 1000, 1448, 1460]), st.integers(1, 9000))


def sizes(mss: int, max_full: int, cap: int, least: int = 0) -> st.SearchStrategy[int]:
    """Payload sizes of up to max_full full segments and a tail (empty, short or full),
    at least `least` and at most `cap` bytes."""
    tails = st.one_of(st.sampled_from([0, 1, mss - 1, mss]), st.integers(0, mss))
    return st.builds(
        lambda n, t: max(least, min(n * mss + t, cap)), st.integers(0, max_full), tails
    )


@st.composite
def tcp_supers(draw):
    """(frame, mtu, kw for expect_tcp, data, mss)"""
    opts, ipopts = draw(OPTIONS), draw(IP_OPTIONS)
    hl = 40 + len(opts) + len(ipopts)
    mss = draw(MSS_VALUES)
    size = draw(sizes(mss, 80, 65535 - hl))
    data = payload(size, draw(st.integers(0, 2**32)))
    kw = {
        "seq": draw(st.integers(0, 2**32 - 1)),
        "flags": draw(TCP_FLAGS),
        "ident": draw(st.integers(0, 0xFFFF)),
        "opts": opts,
        "ipopts": ipopts,
        "ttl": draw(st.integers(1, 255)),
        "tos": draw(st.integers(0, 255)),
        "win": draw(st.integers(0, 0xFFFF)),
        "urg": draw(st.integers(0, 0xFFFF)),
    }
    gso_type = draw(st.sampled_from([GSO_TCPV4, GSO_TCPV4 | GSO_ECN]))
    frame = tso(data, mss, gso_type=gso_type, **kw)
    mtu = hl + mss + draw(st.sampled_from([0, 1, 100]))
    return frame, mtu, kw, data, mss


def check_segments(segs: list[bytes], mtu: int) -> None:
    for seg in segs:
        assert len(seg) <= mtu
        assert struct.unpack_from(">H", seg, 2)[0] == len(seg)
        assert header_ok(seg) and l4_ok(seg)


SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(case=tcp_supers())
def test_split_tcp_property(py_impl, c_impl, case):
    frame, mtu, kw, data, mss = case
    segs = c_impl.gso_split(frame, mtu)
    assert py_impl.gso_split(frame, mtu) == segs
    assert segs == expect_tcp(data, mss, **kw)
    check_segments(segs, mtu)
    hl = (segs[0][0] & 15) * 4 + (segs[0][(segs[0][0] & 15) * 4 + 12] >> 4) * 4
    assert b"".join(s[hl:] for s in segs) == data
    assert len(segs) == max(1, -(-len(data) // mss))


@SLOW
@given(
    gso=MSS_VALUES,
    data=st.data(),
    seed=st.integers(0, 2**32),
    ipopts=IP_OPTIONS,
    ident=st.integers(0, 0xFFFF),
    slack=st.sampled_from([0, 1, 50]),
)
def test_split_udp_property(py_impl, c_impl, gso, data, seed, ipopts, ident, slack):
    data = payload(data.draw(sizes(gso, 80, 65535 - 28 - len(ipopts))), seed)
    frame = uso(data, gso, ipopts=ipopts, ident=ident)
    mtu = 28 + len(ipopts) + gso + slack
    segs = c_impl.gso_split(frame, mtu)
    assert py_impl.gso_split(frame, mtu) == segs
    assert segs == expect_udp(data, gso, ipopts=ipopts, ident=ident)
    check_segments(segs, mtu)
    hl = 28 + len(ipopts)
    assert b"".join(s[hl:] for s in segs) == data


@st.composite
def mergeable_supers(draw):
    """A TSO super-packet the coalescer can rebuild: option-less IPv4, ACK (+ PSH), at most 64
    segments, at least one payload byte."""
    opts = draw(OPTIONS)
    hl = 40 + len(opts)
    mss = draw(st.one_of(st.sampled_from([1, 536, 1448, 1460]), st.integers(1, 1460)))
    size = draw(sizes(mss, 63, 65535 - hl, least=1))
    kw = {
        "seq": draw(st.integers(0, 2**32 - 1)),
        "ack": draw(st.integers(0, 2**32 - 1)),
        "flags": draw(st.sampled_from([ACK, ACK | PSH])),
        "ident": draw(st.integers(0, 0xFFFF)),
        "opts": opts,
        "win": draw(st.integers(0, 0xFFFF)),
        "flags_frag": draw(st.sampled_from([0, DF])),
        "tos": draw(st.integers(0, 255)),
    }
    data = payload(size, draw(st.integers(0, 2**32)))
    return tso(data, mss, **kw), hl + mss, data


@SLOW
@given(case=mergeable_supers())
def test_split_then_coalesce_round_trip(py_impl, c_impl, case):
    frame, mtu, data = case
    segs = c_impl.gso_split(frame, mtu)
    merged = c_impl.gro_coalesce(segs)
    assert py_impl.gro_coalesce(segs) == merged
    if len(segs) == 1:
        assert merged == [(bytes(10) + segs[0], 1)]
        assert segs[0] == complete(frame)
        return
    [(out, n)] = merged
    assert n == len(segs)
    # the same virtio-net header (hdr_len = the real header length), and the same packet once
    # both checksums are completed as the kernel would; here even the raw bytes agree, as the
    # field holds the folded pseudo-header sum on both sides
    assert out[:10] == frame[:10]
    assert complete(out) == complete(frame)
    assert out == frame
    pkt = complete(out)
    assert header_ok(pkt) and l4_ok(pkt) and pkt[(pkt[32] >> 4) * 4 + 20 :] == data
    # ...and the merged super-packet splits back into the very same segments
    assert c_impl.gso_split(out, mtu) == py_impl.gso_split(out, mtu) == segs


# --- hypothesis: fuzzed input, C == Python ---------------------------------------------------


def call(fn, *args):
    """("ok", result) or the documented exception's name; anything else propagates."""
    try:
        return ("ok", fn(*args))
    except ERRORS as e:
        return (type(e).__name__,)


SEEDS = [
    vnet() + PLAIN,
    vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + tcp4(DATA[:300], csum="partial"),
    tso(DATA, 1000, opts=TS_OPTS, flags=ACK | PSH | CWR | FIN),
    tso(DATA[:1500], 400, ipopts=b"\x01" * 8),
    uso(DATA[:2000], 500),
    vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6) + udp4(DATA[:99], csum="partial"),
]


@st.composite
def fuzzed_frames(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    b = bytearray(draw(st.sampled_from(SEEDS)))
    if draw(st.booleans()):  # a random or half-random virtio-net header
        hdr = bytearray(draw(st.binary(min_size=10, max_size=10)))
        if draw(st.booleans()):
            hdr[1] = draw(st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x85, 0x80]))
        b[:10] = hdr
    for _ in range(draw(st.integers(0, 4))):  # byte mutations, biased to the headers
        at = draw(st.integers(0, min(len(b) - 1, draw(st.sampled_from([40, 80, len(b) - 1])))))
        b[at] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from([None, None, 0, 1, 10, 29, 30, 40, 60]))
    if cut is not None:
        b = b[: len(b) - cut] if draw(st.booleans()) else b[:cut]
    if draw(st.integers(0, 5)) == 0:
        b += draw(st.binary(max_size=20))
    return bytes(b)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame=fuzzed_frames(),
    mtu=st.sampled_from([68, 200, 576, 1400, 1500, 9000, 65535]),
    max_segs=st.sampled_from([0, 1, 2, 5, 1024]),
)
def test_split_fuzz_c_equals_python(py_impl, c_impl, frame, mtu, max_segs):
    got = call(c_impl.gso_split, frame, mtu, max_segs)
    assert call(py_impl.gso_split, frame, mtu, max_segs) == got
    if got[0] == "ok":
        assert 1 <= len(got[1]) <= max(max_segs, 1)
    # The pump's zero-copy split: headers apart, payload left in the frame, same bytes.
    assert call(c_impl.gso_split_hdrs, frame, mtu, max_segs) == got


@st.composite
def fuzzed_flows(draw):
    opts = draw(st.sampled_from([b"", TS_OPTS]))
    sizes = draw(st.lists(st.sampled_from([1, 50, MSS, MSS, MSS, MSS]), min_size=1, max_size=12))
    pkts = [
        bytearray(p) for p in flow(sizes, opts=opts, flags=draw(st.sampled_from([ACK, ACK | PSH])))
    ]
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["byte", "flags", "drop", "dup", "swap", "cut", "junk"]))
        i = draw(st.integers(0, len(pkts) - 1))
        if op == "byte" and pkts[i]:
            p = pkts[i]
            p[draw(st.integers(0, min(len(p) - 1, 60)))] = draw(st.integers(0, 255))
        elif op == "flags" and len(pkts[i]) >= 40 and pkts[i][0] == 0x45 and pkts[i][9] == 6:
            pkts[i][33] = draw(st.integers(0, 255))
            pkts[i] = bytearray(set_l4_csum(pkts[i]))
        elif op == "drop" and len(pkts) > 1:
            del pkts[i]
        elif op == "dup":
            pkts.insert(i, bytearray(pkts[i]))
        elif op == "swap" and i + 1 < len(pkts):
            pkts[i], pkts[i + 1] = pkts[i + 1], pkts[i]
        elif op == "cut":
            pkts[i] = pkts[i][: draw(st.integers(0, len(pkts[i])))]
        elif op == "junk":
            pkts.insert(i, bytearray(draw(st.binary(max_size=80))))
    return [bytes(p) for p in pkts]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pkts=fuzzed_flows())
def test_coalesce_fuzz_c_equals_python(py_impl, c_impl, pkts):
    got = c_impl.gro_coalesce(pkts)
    assert py_impl.gro_coalesce(pkts) == got
    # The pump's zero-copy merge: headers apart, payloads where they lie, same writes.
    assert c_impl.gro_coalesce_spans(pkts) == got
    assert sum(n for _, n in got) == len(pkts)
    at = 0
    for frame, n in got:  # every output is what the reference builds from its inputs
        assert frame == ref_merge(pkts[at : at + n])
        at += n
