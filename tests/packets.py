# Test packet builders: IPv4/UDP/ICMP, TCP and virtio-net frames from struct alone (no scapy), with
# correct checksums, plus mutate() to change header fields after the fact (wireguard's
# udp4PacketMutateIPFields).  Shared by the test modules, none of which imports another.
# Test addresses come from 198.18.0.0/15 (RFC 2544 benchmarking space) only.  Nothing here
# imports udpbackend: the checksum below is the naive reference the implementations are held to.
"""IPv4 test packet builders."""

from __future__ import annotations

import ipaddress
import random
import struct

NET = ipaddress.IPv4Network("198.18.0.0/15")

# Header field name -> (struct format, byte offset).
_FIELDS = {
    "tos": ("B", 1),
    "total_length": (">H", 2),
    "ident": (">H", 4),
    "flags_frag": (">H", 6),
    "ttl": ("B", 8),
    "proto": ("B", 9),
    "checksum": (">H", 10),
    "src": (">I", 12),
    "dst": (">I", 16),
}


def ip(addr: str | int) -> int:
    """'198.19.1.5' -> host-order int (ints pass through)."""
    return int(ipaddress.IPv4Address(addr))


def ip_str(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def cksum(data: bytes | bytearray) -> int:
    """Naive RFC 1071 reference: sum the big-endian 16-bit words, fold, complement."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def header_ok(pkt: bytes | bytearray) -> bool:
    """True if pkt's IPv4 header checksum verifies."""
    ihl = (pkt[0] & 15) * 4
    return cksum(bytes(pkt[:ihl])) == 0


def ipv4(
    src: str | int,
    dst: str | int,
    proto: int,
    payload: bytes = b"",
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0,
    tos: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a correct header checksum; options are padded to 4 bytes."""
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    ihl = 20 + len(options)
    assert ihl <= 60, "at most 40 bytes of options"
    hdr = bytearray(
        struct.pack(
            ">BBHHHBBHII",
            0x40 | ihl // 4,
            tos,
            ihl + len(payload),
            ident,
            flags_frag,
            ttl,
            proto,
            0,
            ip(src),
            ip(dst),
        )
        + options
    )
    struct.pack_into(">H", hdr, 10, cksum(hdr))
    return bytes(hdr) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP header + payload with checksum 0 (allowed over IPv4)."""
    return struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4_udp(
    src: str | int,
    dst: str | int,
    payload: bytes = b"hello",
    sport: int = 40000,
    dport: int = 7,
    **kw: int | bytes,
) -> bytes:
    return ipv4(src, dst, 17, udp(sport, dport, payload), **kw)  # type: ignore[arg-type]


def icmp(type_: int, code: int, body: bytes = b"") -> bytes:
    """An ICMP message: type, code, checksum over the whole message, then body (4+ bytes)."""
    msg = bytearray(struct.pack(">BBH", type_, code, 0) + body)
    struct.pack_into(">H", msg, 2, cksum(msg))
    return bytes(msg)


def ipv4_icmp_echo(
    src: str | int,
    dst: str | int,
    ident: int = 1,
    seq: int = 1,
    data: bytes = b"ping",
    **kw: int | bytes,
) -> bytes:
    return ipv4(src, dst, 1, icmp(8, 0, struct.pack(">HH", ident, seq) + data), **kw)  # type: ignore[arg-type]


def field(pkt: bytes | bytearray, name: str) -> int:
    if name == "version":
        return pkt[0] >> 4
    if name == "ihl":
        return pkt[0] & 15
    fmt, off = _FIELDS[name]
    return struct.unpack_from(fmt, pkt, off)[0]


def mutate(pkt: bytes, fix_checksum: bool = True, **fields: int) -> bytes:
    """pkt with header fields replaced (version, ihl in 32-bit words, tos, total_length, ident,
    flags_frag, ttl, proto, checksum, src, dst).  Unless fix_checksum is False or a checksum is
    given, the header checksum is recomputed over the (new) IHL when the header is all there."""
    b = bytearray(pkt)
    for name, value in fields.items():
        if name == "version":
            b[0] = (value & 15) << 4 | (b[0] & 15)
        elif name == "ihl":
            b[0] = (b[0] & 0xF0) | (value & 15)
        else:
            fmt, off = _FIELDS[name]
            struct.pack_into(fmt, b, off, value)
    ihl = (b[0] & 15) * 4
    if fix_checksum and "checksum" not in fields and 20 <= ihl <= len(b):
        struct.pack_into(">H", b, 10, 0)
        struct.pack_into(">H", b, 10, cksum(b[:ihl]))
    return bytes(b)


def icmp_error(local_ip: int, offender: bytes, type_: int, length: int | None = None) -> bytes:
    """The ICMP error (type_, code 0) a hop at local_ip sends about offender[:length], built
    independently of udpbackend: quote = the offender's header + up to 8 payload bytes."""
    if length is None:
        length = len(offender)
    ihl = (offender[0] & 15) * 4
    quote = offender[: min(length, ihl + 8)]
    msg = icmp(type_, 0, b"\0\0\0\0" + quote)
    return ipv4(local_ip, field(offender, "src"), 1, msg, ttl=8)


def frag_needed(local_ip: int, offender: bytes, mtu: int) -> bytes:
    """ICMP fragmentation needed (3/4) with the next-hop MTU (RFC 1191) that a hop at local_ip
    whose link takes mtu bytes sends about offender, built as icmp_error is."""
    ihl = (offender[0] & 15) * 4
    quote = offender[: min(field(offender, "total_length"), ihl + 8)]
    msg = icmp(3, 4, struct.pack(">HH", 0, mtu) + quote)
    return ipv4(local_ip, field(offender, "src"), 1, msg, ttl=8)


def nonzero(stats: dict, prefix: str = "") -> dict:
    """The nonzero counters of a stats dict, flattened: {"egress.drops.no_route": 1, ...}."""
    out: dict = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(nonzero(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out.update({f"{prefix}{k}[{i}]": x for i, x in enumerate(v) if x})
        elif v:
            out[f"{prefix}{k}"] = v
    return out


def forwarded(pkt: bytes, length: int | None = None) -> bytes:
    """pkt as a hop must pass it on: TTL - 1, header checksum recomputed from scratch.

    RFC 1624 eqn. 3 yields exactly this value (both lie in 0..0xfffe and agree mod 0xffff)."""
    length = len(pkt) if length is None else length
    ihl = (pkt[0] & 15) * 4
    b = bytearray(pkt[:length])
    b[8] -= 1
    struct.pack_into(">H", b, 10, 0)
    struct.pack_into(">H", b, 10, cksum(b[:ihl]))
    return bytes(b) + pkt[length:]


# Defaults of the TCP/UDP builders below (198.18.0.0/15, like every test address).
L4_SRC, L4_DST = "198.19.1.5", "198.19.2.7"
L4_SPORT, L4_DPORT = 40000, 5201
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP_L4, GSO_ECN = 0, 1, 5, 0x80
DF = 0x4000
TS_OPTS = b"\x01\x01\x08\x0a" + struct.pack(">II", 123456, 654321)  # NOP NOP timestamps

# --- TCP, UDP and virtio-net frames (the offload tests: test_offload, test_fastpath_io) ------
# Built from struct and cksum alone, independently of both implementations.


def vnet(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_off: int = 0,
) -> bytes:
    """A virtio-net header (little-endian, 10 bytes)."""
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_off)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def pseudo(pkt: bytes | bytearray) -> bytes:
    ihl = (pkt[0] & 15) * 4
    return bytes(pkt[12:20]) + struct.pack(">BBH", 0, pkt[9], len(pkt) - ihl)


def set_l4_csum(pkt: bytes | bytearray, mode: str = "full") -> bytes:
    """pkt (IPv4 + TCP/UDP) with its L4 checksum: "full", "partial" (CHECKSUM_PARTIAL: the
    folded pseudo-header sum, as the kernel hands it over with NEEDS_CSUM) or "zero"."""
    b = bytearray(pkt)
    ihl = (b[0] & 15) * 4
    off = ihl + (16 if b[9] == 6 else 6)
    b[off : off + 2] = b"\0\0"
    if mode == "full":
        c = cksum(pseudo(b) + b[ihl:])
        if b[9] == 17 and c == 0:
            c = 0xFFFF
    elif mode == "partial":
        c = ~cksum(pseudo(b)) & 0xFFFF
    else:
        c = 0
    struct.pack_into(">H", b, off, c)
    return bytes(b)


def l4_ok(pkt: bytes) -> bool:
    """The TCP/UDP checksum of pkt verifies (UDP: and is not 0, i.e. not "none")."""
    ihl = (pkt[0] & 15) * 4
    if pkt[9] == 17 and pkt[ihl + 6 : ihl + 8] == b"\0\0":
        return False
    return cksum(pseudo(pkt) + pkt[ihl:]) == 0


def tcp_hdr(
    seq: int, ack: int, flags: int, win: int, opts: bytes, sport: int, dport: int, urg: int
) -> bytes:
    assert len(opts) % 4 == 0 and len(opts) <= 40
    off = (20 + len(opts)) // 4
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0, urg) + opts


def tcp4(
    data: bytes = b"",
    seq: int = 1000,
    ack: int = 2000,
    flags: int = ACK,
    win: int = 502,
    opts: bytes = b"",
    sport: int = L4_SPORT,
    dport: int = L4_DPORT,
    urg: int = 0,
    csum: str = "full",
    src: str = L4_SRC,
    dst: str = L4_DST,
    ident: int = 0x1234,
    flags_frag: int = DF,
    ttl: int = 64,
    tos: int = 0,
    ipopts: bytes = b"",
) -> bytes:
    """An IPv4 TCP segment with a correct IP header checksum and the L4 checksum `csum`."""
    l4 = tcp_hdr(seq, ack, flags, win, opts, sport, dport, urg) + data
    pkt = ipv4(
        src, dst, 6, l4, ttl=ttl, ident=ident, flags_frag=flags_frag, tos=tos, options=ipopts
    )
    return set_l4_csum(pkt, csum)


def udp4(
    data: bytes = b"",
    csum: str = "full",
    ident: int = 0x1234,
    flags_frag: int = 0,
    ipopts: bytes = b"",
    sport: int = 8472,
    dport: int = 53,
) -> bytes:
    l4 = struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data
    pkt = ipv4(L4_SRC, L4_DST, 17, l4, ident=ident, flags_frag=flags_frag, options=ipopts)
    return set_l4_csum(pkt, csum)


def tso(data: bytes, mss: int, gso_type: int = GSO_TCPV4, vflags: int = NEEDS_CSUM, **kw) -> bytes:
    """A TSO super-packet as a TSO4 TUN hands it over: virtio-net header + IPv4/TCP with the
    partial checksum."""
    pkt = tcp4(data, csum="partial", **kw)
    ihl = (pkt[0] & 15) * 4
    hl = ihl + (pkt[ihl + 12] >> 4) * 4
    return vnet(vflags, gso_type, hl, mss, ihl, 16) + pkt


def uso(data: bytes, gso: int, **kw) -> bytes:
    pkt = udp4(data, csum="partial", **kw)
    ihl = (pkt[0] & 15) * 4
    return vnet(NEEDS_CSUM, GSO_UDP_L4, ihl + 8, gso, ihl, 6) + pkt


def expect_tcp(data: bytes, mss: int, seq: int = 1000, flags: int = ACK, ident: int = 0x1234, **kw):
    """The segments a correct TSO split yields, built from scratch: FIN/PSH only on the last,
    CWR only on the first, id + i, seq + i * mss, full checksums."""
    chunks = [data[i : i + mss] for i in range(0, len(data), mss)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        f = flags
        if i != len(chunks) - 1:
            f &= ~(FIN | PSH)
        if i:
            f &= ~CWR
        s, ident_i = (seq + i * mss) % 2**32, (ident + i) & 0xFFFF
        out.append(tcp4(chunk, seq=s, flags=f, ident=ident_i, **kw))
    return out


def expect_udp(data: bytes, gso: int, ident: int = 0x1234, **kw):
    chunks = [data[i : i + gso] for i in range(0, len(data), gso)] or [b""]
    return [udp4(c, ident=(ident + i) & 0xFFFF, **kw) for i, c in enumerate(chunks)]


def flow(sizes: list[int], seq: int = 1000, ident: int = 100, **kw) -> list[bytes]:
    """Consecutive segments of one TCP flow, payload sizes as given, full checksums."""
    out = []
    for i, n in enumerate(sizes):
        out.append(tcp4(payload(n, seed=i), seq=seq, ident=ident + i, **kw))
        seq = (seq + n) % 2**32
    return out


def ref_merge(run: list[bytes]) -> bytes:
    """What one TUN write carrying `run` must be, built independently: a single packet behind a
    zero header; a run as one super-packet (first's headers, PSH of the last, IP length and
    checksum redone, the partial TCP checksum) behind a TCPV4/NEEDS_CSUM header."""
    if len(run) == 1:
        return bytes(10) + run[0]
    first = run[0]
    hl = 20 + (first[32] >> 4) * 4
    b = bytearray(first[:hl] + b"".join(p[hl:] for p in run))
    b[33] |= run[-1][33] & PSH
    b = bytearray(mutate(bytes(b), total_length=len(b)))
    return vnet(NEEDS_CSUM, GSO_TCPV4, hl, len(first) - hl, 20, 16) + set_l4_csum(b, "partial")


def complete(frame: bytes) -> bytes:
    """The packet of a virtio-net frame with its checksum completed the way the kernel does for
    NEEDS_CSUM: the 16-bit sum from csum_start on (field holding the pseudo-header sum)."""
    flags, _, _, _, start, off = struct.unpack_from("<BBHHHH", frame)
    pkt = bytearray(frame[10:])
    if flags & NEEDS_CSUM:
        struct.pack_into(">H", pkt, start + off, cksum(pkt[start:]))
    return bytes(pkt)
