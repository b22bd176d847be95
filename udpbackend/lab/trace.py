"""`udpbackend trace`: watch a running node's data plane, packet by packet and second by second.

Lives here: capturing on the underlay (UDP port 8285) and on the TUN device with AF_PACKET
sockets (optionally inside a network namespace), decoding each packet layer by layer with scapy
(outer IPv4/UDP, then the inner IPv4 packet flannel carries), matching a packet seen before and
after the daemon to show the TTL it decremented, the per-second counters from the node's
--stats-file, and --pcap. Must not: change anything on the node (read-only, no promiscuous
mode), import scapy at module import time (it is slow: only inside the functions that decode),
or import the data plane.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_HOST, PACKET_OUTGOING = 0, 4
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
DEFAULT_PORT = 8285
DEFAULT_TUN = "flannel0"


class TraceError(Exception):
    """A user-facing problem (no such netns, no daemon, no permission): one line, exit 2."""


# --- finding the node ---------------------------------------------------------------------------


@dataclass
class DaemonInfo:
    pid: int
    stats_file: str | None
    tun: str | None
    iface: str | None
    port: int | None


def _flag(argv: list[str], name: str) -> str | None:
    """Value of --name / -name (with `=` or as the next word) in a command line, last wins."""
    value = None
    for i, a in enumerate(argv):
        for spelling in (f"--{name}", f"-{name}"):
            if a == spelling and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(spelling + "="):
                value = a.split("=", 1)[1]
    return value


def netns_inode(name: str | None) -> tuple[int, int]:
    path = f"/var/run/netns/{name}" if name else "/proc/self/ns/net"
    try:
        st = os.stat(path)
    except OSError as e:
        raise TraceError(f"no network namespace {name!r} ({e.strerror})") from None
    return st.st_dev, st.st_ino


def find_daemons(netns: str | None) -> list[DaemonInfo]:
    """`udpbackend run` processes whose network namespace is `netns` (None: ours)."""
    want = netns_inode(netns)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != want or "run" not in argv:
            continue
        if not any(a == "udpbackend" or a.endswith("/udpbackend") for a in argv):
            continue
        stats = _flag(argv, "stats-file")
        if stats and not os.path.isabs(stats):
            with contextlib.suppress(OSError):
                stats = os.path.join(os.readlink(f"/proc/{entry}/cwd"), stats)
        port = _flag(argv, "port")
        found.append(
            DaemonInfo(
                pid=int(entry),
                stats_file=stats,
                tun=_flag(argv, "tun-name"),
                iface=_flag(argv, "iface"),
                port=int(port) if port and port.isdigit() else None,
            )
        )
    return found


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """This thread inside netns `name` for the block (sockets made there stay there)."""
    if not name:
        yield
        return
    from pyroute2 import netns

    netns.pushns()
    try:
        netns.setns(name, flags=0)
        yield
    finally:
        netns.popns()


# --- capturing ----------------------------------------------------------------------------------


@dataclass
class Captured:
    n: int
    ts: float  # kernel receive timestamp, epoch seconds
    ifname: str
    outgoing: bool
    side: str  # "wire" or "tun"
    data: bytes


def open_capture(netns: str | None) -> socket.socket:
    """An AF_PACKET socket seeing every IPv4 packet of every interface in the namespace,
    without the link-layer header (SOCK_DGRAM), with kernel timestamps."""
    try:
        with in_netns(netns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    except PermissionError:
        raise TraceError("capturing needs root (CAP_NET_RAW)") from None
    except OSError as e:
        raise TraceError(f"cannot open a capture socket: {e.strerror or e}") from None
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setblocking(False)
    return s


def classify(data: bytes, ifname: str, tun: str, iface: str | None, port: int) -> str | None:
    """The side a captured packet belongs to: "tun", "wire" (an IPv4/UDP datagram from or to
    `port`), or None (not ours)."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    if ifname == tun:
        return "tun"
    if iface and ifname != iface:
        return None
    ihl = (data[0] & 0x0F) * 4
    if data[9] != 17 or len(data) < ihl + 8:
        return None
    sport, dport = struct.unpack_from("!HH", data, ihl)
    return "wire" if port in (sport, dport) else None


def _recv(s: socket.socket) -> tuple[bytes, str, int, float] | None:
    try:
        data, anc, _flags, addr = s.recvmsg(65535, socket.CMSG_SPACE(16))
    except BlockingIOError:
        return None
    ts = time.time()
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
            sec, nsec = struct.unpack("qq", raw[:16])
            ts = sec + nsec / 1e9
    ifname, proto, pkttype = addr[0], addr[1], addr[2]
    if proto != ETH_P_IP:
        return None
    return data, ifname, pkttype, ts


# --- decoding -----------------------------------------------------------------------------------


def bind_flannel(port: int) -> None:
    """Teach scapy that a UDP datagram from or to `port` carries one raw IPv4 packet."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import bind_layers

    bind_layers(UDP, IP, dport=port)
    bind_layers(UDP, IP, sport=port)


def decode(data: bytes) -> Any:
    from scapy.layers.inet import IP

    return IP(data)


def inner_ip(pkt: Any, port: int) -> Any | None:
    """The IPv4 packet inside a flannel datagram (None if pkt is not one)."""
    from scapy.layers.inet import IP, UDP

    if UDP in pkt and port in (pkt[UDP].sport, pkt[UDP].dport) and IP in pkt[UDP].payload:
        return pkt[UDP].payload
    return None


def match_key(ip: Any) -> tuple[Any, ...]:
    """What identifies one IPv4 packet on both sides of the daemon (not TTL, not checksum)."""
    return (ip.src, ip.dst, ip.proto, ip.id, ip.frag, bytes(ip.payload)[:16])


def layer_lines(pkt: Any, port: int) -> list[str]:
    """One line per layer, outermost first; the inner IPv4 of a flannel datagram is marked."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.packet import NoPayload, Padding, Raw

    lines = []
    layer = pkt
    ip_depth = 0
    while layer is not None and not isinstance(layer, NoPayload):
        if isinstance(layer, IP):
            ip_depth += 1
            proto = {1: "ICMP", 6: "TCP", 17: "UDP"}.get(layer.proto, str(layer.proto))
            tag = "outer" if ip_depth == 1 and inner_ip(pkt, port) is not None else ""
            tag = "inner (flannel payload)" if ip_depth == 2 else tag
            lines.append(
                f"IPv4  {layer.src} > {layer.dst}  ttl {layer.ttl}  id {layer.id:#06x}  "
                f"len {layer.len}  proto {proto}" + (f"   [{tag}]" if tag else "")
            )
        elif isinstance(layer, UDP):
            flannel = port in (layer.sport, layer.dport)
            note = "  flannel UDP backend: payload = one IPv4 packet" if flannel else ""
            lines.append(f"UDP   {layer.sport} > {layer.dport}  len {layer.len}{note}")
        elif isinstance(layer, TCP):
            lines.append(
                f"TCP   {layer.sport} > {layer.dport}  flags {layer.sprintf('%TCP.flags%')}  "
                f"seq {layer.seq}  ack {layer.ack}  win {layer.window}"
            )
        elif isinstance(layer, ICMP):
            what = layer.sprintf("%ICMP.type%")
            extra = f"  id {layer.id}  seq {layer.seq}" if layer.type in (0, 8) else ""
            lines.append(f"ICMP  {what} (type {layer.type} code {layer.code}){extra}")
        elif isinstance(layer, Raw | Padding):
            lines.append(f"{layer.name:<5} {len(layer.load)} bytes")
        else:
            lines.append(f"{layer.name}  {layer.summary()}")
        layer = layer.payload
    return lines


# --- counters -----------------------------------------------------------------------------------


def read_stats(path: str) -> tuple[float, dict[str, Any]] | None:
    """(mtime, document) of a stats file, None while it is missing or half-written."""
    try:
        mtime = os.stat(path).st_mtime
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return (mtime, doc) if isinstance(doc, dict) else None


def _hist_label(k: int, buckets: int) -> str:
    lo, hi = 1 << k, (1 << (k + 1)) - 1
    if k == buckets - 1:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _bits(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:,.1f} {unit}"
    return f"{bps:,.0f} bit/s"


def counter_line(prev: dict[str, Any], cur: dict[str, Any], seconds: float) -> str:
    """One line of per-second rates between two stats documents."""
    a, b = prev.get("stats", {}), cur.get("stats", {})
    secs = seconds if seconds > 0 else 1.0
    parts = []
    batches = packets = 0
    hist: list[int] = []
    drops: dict[str, int] = {}
    for d in ("egress", "ingress"):
        da, db = a.get(d, {}), b.get(d, {})
        pk = db.get("rx_packets", 0) - da.get("rx_packets", 0)
        by = db.get("rx_bytes", 0) - da.get("rx_bytes", 0)
        parts.append(f"{d} {pk / secs:,.0f} pkt/s {_bits(by * 8 / secs)}")
        packets += pk
        batches += db.get("batches", 0) - da.get("batches", 0)
        ha, hb = da.get("batch_hist", []), db.get("batch_hist", [])
        if not hist:
            hist = [0] * len(hb)
        for i, v in enumerate(hb):
            hist[i] += v - (ha[i] if i < len(ha) else 0)
        for k, v in db.get("drops", {}).items():
            dv = v - da.get("drops", {}).get(k, 0)
            if dv:
                drops[k] = drops.get(k, 0) + dv
    sys_a = sum(a.get("syscalls", {}).values())
    sys_b = sum(b.get("syscalls", {}).values())
    line = " | ".join(parts)
    if batches:
        shown = [f"{_hist_label(i, len(hist))}: {v}" for i, v in enumerate(hist) if v]
        line += (
            f" | batches {batches / secs:,.0f}/s, mean {packets / batches:.1f} pkt "
            f"(sizes {', '.join(shown)})"
        )
    if packets:
        line += f" | syscalls/pkt {(sys_b - sys_a) / packets:.2f}"
    line += " | drops " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "0")
    icmp = sum(b.get(k, 0) - a.get(k, 0) for k in ("icmp_unreachable", "icmp_time_exceeded"))
    if icmp:
        line += f" | icmp sent {icmp}"
    return line


# --- the trace ----------------------------------------------------------------------------------


@dataclass
class Tracer:
    port: int
    tun: str
    iface: str | None
    count: int
    out: TextIO
    verbose: bool = False
    shown: dict[str, int] = field(default_factory=lambda: {"wire": 0, "tun": 0})
    kept: list[Captured] = field(default_factory=list)
    # inner packets seen before the daemon handled them: key -> (side, ifname, ttl)
    before: dict[tuple[Any, ...], tuple[str, str, int]] = field(default_factory=dict)
    t0: float | None = None
    n: int = 0

    def done(self) -> bool:
        return all(v >= self.count for v in self.shown.values())

    def feed(self, data: bytes, ifname: str, pkttype: int, ts: float) -> None:
        side = classify(data, ifname, self.tun, self.iface, self.port)
        if side is None or pkttype not in (PACKET_HOST, PACKET_OUTGOING):
            return
        if self.shown[side] >= self.count:
            return
        self.shown[side] += 1
        self.n += 1
        outgoing = pkttype == PACKET_OUTGOING
        cap = Captured(self.n, ts, ifname, outgoing, side, data)
        self.kept.append(cap)
        self.show(cap)

    def show(self, cap: Captured) -> None:
        pkt = decode(cap.data)
        if self.t0 is None:
            self.t0 = cap.ts
        # egress: kernel -> TUN (out) -> daemon -> wire (out); ingress: wire (in) -> daemon -> TUN
        if cap.side == "tun":
            role = "egress, before the daemon" if cap.outgoing else "ingress, after the daemon"
            inner = pkt
        else:
            role = "egress, after the daemon" if cap.outgoing else "ingress, before the daemon"
            inner = inner_ip(pkt, self.port)
        head = (
            f"#{cap.n} +{cap.ts - self.t0:.6f}s  {cap.side} {cap.ifname} "
            f"{'out' if cap.outgoing else 'in '}  {len(cap.data)} bytes  ({role})"
        )
        print(head, file=self.out)
        for line in layer_lines(pkt, self.port):
            print("    " + line, file=self.out)
        if inner is not None:
            key = match_key(inner)
            if "before" in role:
                self.before[key] = (cap.side, cap.ifname, inner.ttl)
            elif key in self.before:
                side, ifname, ttl = self.before.pop(key)
                where = "the wire" if cap.side == "wire" else cap.ifname
                print(
                    f"    TTL   {ttl} on {ifname} ({side}, before) -> {inner.ttl} on {where} "
                    f"(after): the daemon decremented it by {ttl - inner.ttl}",
                    file=self.out,
                )
        if self.verbose:
            print(pkt.show(dump=True), file=self.out)
        self.out.flush()

    def write_pcap(self, path: str) -> None:
        """Every packet shown, as raw IPv4 (LINKTYPE_IPV4), with its capture time; a .pcapng
        name also gets a comment per packet saying where it was seen."""
        from scapy.utils import PcapNgWriter, PcapWriter

        writer: Any = PcapNgWriter(path) if path.endswith(".pcapng") else PcapWriter(path)
        try:
            for cap in self.kept:
                pkt = decode(cap.data)
                pkt.time = cap.ts
                pkt.comments = [
                    f"{cap.side} {cap.ifname} {'out' if cap.outgoing else 'in'}".encode()
                ]
                writer.write(pkt)
        finally:
            writer.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", help="trace the node in this network namespace (`ip netns` name)")
    p.add_argument("--count", type=int, default=4, help="packets to show per side (default 4)")
    p.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="how long to watch (default 5); with --no-counters it ends once --count are shown",
    )
    p.add_argument("--stats-file", help="the node's --stats-file (default: from its command line)")
    p.add_argument("--tun", help="TUN device (default: the node's --tun-name, else flannel0)")
    p.add_argument("--iface", help="underlay interface (default: any interface but the TUN)")
    p.add_argument("--port", type=int, help="UDP port (default: the node's --port, else 8285)")
    p.add_argument("--pcap", help="write the packets shown to FILE (.pcap; .pcapng adds notes)")
    p.add_argument("--no-counters", action="store_true", help="packets only")
    p.add_argument("-V", "--verbose-layers", action="store_true", help="scapy's full dump too")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`udpbackend trace`; user-facing problems raise TraceError (one line, exit 2)."""
    out = out or sys.stdout
    if args.count < 0 or args.seconds < 0:
        raise TraceError("--count and --seconds must be >= 0")
    if os.geteuid() != 0:
        raise TraceError("trace must run as root: capturing packets needs CAP_NET_RAW")
    daemons = find_daemons(args.netns)
    d = daemons[0] if len(daemons) == 1 else None
    port = args.port or (d.port if d else None) or DEFAULT_PORT
    tun = args.tun or (d.tun if d else None) or DEFAULT_TUN
    iface = args.iface or (d.iface if d else None)
    stats_file = None if args.no_counters else (args.stats_file or (d.stats_file if d else None))
    where = f"netns {args.netns}" if args.netns else "this namespace"
    if not daemons:
        print(f"note: no `udpbackend run` process found in {where}", file=sys.stderr)
    elif len(daemons) > 1 and not (args.stats_file or args.no_counters):
        pids = ", ".join(str(x.pid) for x in daemons)
        print(f"note: several daemons in {where} ({pids}): pass --stats-file", file=sys.stderr)
    if stats_file and not os.path.exists(stats_file):
        raise TraceError(f"stats file {stats_file} does not exist (is the node running?)")
    if d and stats_file is None and not args.no_counters:
        print(f"note: daemon {d.pid} has no --stats-file: no counters", file=sys.stderr)
    try:
        import scapy  # noqa: F401
    except ImportError:
        raise TraceError("trace needs scapy: pip install 'udpbackend[bench]'") from None
    bind_flannel(port)
    sock = open_capture(args.netns)
    tracer = Tracer(port, tun, iface, args.count, out, args.verbose_layers)
    print(
        f"tracing {where}: wire = UDP port {port} on {iface or 'any interface'}, "
        f"TUN = {tun}; counters from {stats_file or '(none)'}",
        file=out,
    )
    start = time.monotonic()
    next_tick = start + 1.0
    prev = read_stats(stats_file) if stats_file else None
    try:
        with sock:
            while True:
                now = time.monotonic()
                if now - start >= args.seconds or (not stats_file and tracer.done()):
                    break
                ready, _, _ = select.select([sock], [], [], max(0.0, min(0.2, next_tick - now)))
                if ready:
                    for _ in range(256):
                        got = _recv(sock)
                        if got is None:
                            break
                        tracer.feed(*got)
                if stats_file and time.monotonic() >= next_tick:
                    next_tick += 1.0
                    cur = read_stats(stats_file)
                    if cur and prev and cur[0] > prev[0]:
                        print(
                            f"[counters +{time.monotonic() - start:.0f}s] "
                            + counter_line(prev[1], cur[1], cur[0] - prev[0]),
                            file=out,
                        )
                        out.flush()
                        prev = cur
                    elif cur and not prev:
                        prev = cur
    except KeyboardInterrupt:
        pass
    if args.pcap:
        tracer.write_pcap(args.pcap)
        print(f"wrote {len(tracer.kept)} packets to {Path(args.pcap)}", file=out)
    if not tracer.kept:
        print("no packet seen: is traffic crossing the overlay?", file=out)
    return 0
