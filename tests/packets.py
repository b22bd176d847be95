# Test packet builders: IPv4/UDP/ICMP from struct alone (no scapy), with correct checksums,
# plus mutate() to change header fields after the fact (wireguard's udp4PacketMutateIPFields).
# Test addresses come from 198.18.0.0/15 (RFC 2544 benchmarking space) only.  Nothing here
# imports udpbackend: the checksum below is the naive reference the implementations are held to.
"""IPv4 test packet builders."""

from __future__ import annotations

import ipaddress
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
