# End-to-end tests of the TUN offloads (IFF_VNET_HDR + TSO in, merged writes out) and UDP GSO/GRO
# in real daemons: a node with `--offload auto` interoperates with one with `--offload off` (which
# stands for a per-packet node or real flannel), and under TCP load with offloads on the underlay
# still carries exactly one IPv4 packet of at most the MTU per UDP/8285 datagram, with valid
# checksums. Must not: touch anything outside the namespaces the testbed creates.
from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
import threading
from typing import Any

import pytest

from udpbackend.lab.addressing import UDP_PORT
from udpbackend.lab.daemons import Node
from udpbackend.lab.testbed import Testbed

pytestmark = pytest.mark.netns

TUN_MTU = 1472  # underlay 1500 - 20 (outer IPv4) - 8 (UDP)
UNDERLAY_MTU = 1500
ETH_HLEN = 14
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_CSUMNOTREADY = 1 << 3  # the checksum is left for the NIC (CHECKSUM_PARTIAL)
IPERF_SECONDS = 2

# --- SIOCETHTOOL: switch a device's offload features (no ethtool binary needed) ------------------

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSSET_INFO = 0x37
ETHTOOL_GFEATURES = 0x3A
ETHTOOL_SFEATURES = 0x3B
ETH_SS_FEATURES = 4
ETH_GSTRING_LEN = 32


def _ethtool(sock: socket.socket, ifname: str, buf: Any) -> None:
    """One SIOCETHTOOL ioctl: struct ifreq {name, ifr_data -> buf}; the kernel fills buf."""
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)


def _feature_names(sock: socket.socket, ifname: str) -> list[str]:
    info = ctypes.create_string_buffer(
        struct.pack("IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0)
    )
    _ethtool(sock, ifname, info)
    count = struct.unpack_from("I", info.raw, 16)[0]
    strings = ctypes.create_string_buffer(
        struct.pack("III", ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count)
        + bytes(count * ETH_GSTRING_LEN)
    )
    _ethtool(sock, ifname, strings)
    raw = strings.raw[12:]
    return [
        raw[i * ETH_GSTRING_LEN : (i + 1) * ETH_GSTRING_LEN].split(b"\0", 1)[0].decode()
        for i in range(count)
    ]


def active_features(tb: Testbed, node: str, ifname: str) -> dict[str, bool]:
    """ethtool -k: feature name -> active."""
    with tb.socket(node, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        names = _feature_names(sock, ifname)
        blocks = (len(names) + 31) // 32
        buf = ctypes.create_string_buffer(
            struct.pack("II", ETHTOOL_GFEATURES, blocks) + bytes(16 * blocks)
        )
        _ethtool(sock, ifname, buf)
    out = {}
    for i, name in enumerate(names):
        _avail, _req, active, _never = struct.unpack_from("IIII", buf.raw, 8 + 16 * (i // 32))
        out[name] = bool(active >> (i % 32) & 1)
    return out


def set_features(tb: Testbed, node: str, ifname: str, want: dict[str, bool]) -> None:
    """ethtool -K ifname name on|off ... inside the node's namespace."""
    with tb.socket(node, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        names = _feature_names(sock, ifname)
        blocks = (len(names) + 31) // 32
        valid, requested = [0] * blocks, [0] * blocks
        for name, on in want.items():
            i = names.index(name)
            valid[i // 32] |= 1 << (i % 32)
            if on:
                requested[i // 32] |= 1 << (i % 32)
        body = b"".join(struct.pack("II", v, r) for v, r in zip(valid, requested, strict=True))
        buf = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_SFEATURES, blocks) + body)
        _ethtool(sock, ifname, buf)


# --- checksums and frame checks -----------------------------------------------------------------


def _sum16(data: bytes) -> int:
    """The one's-complement sum of data's 16-bit words, folded (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    return 0 if n == 0 else (n % 0xFFFF or 0xFFFF)


def _pseudo(ip: bytes, proto: int, length: int) -> bytes:
    return ip[12:20] + struct.pack(">BBH", 0, proto, length)


def check_overlay_frame(frame: bytes, csum_not_ready: bool) -> str | None:
    """None if an Ethernet frame is a well-formed UDP/8285 overlay datagram as flannel puts it
    on the wire: an outer IPv4/UDP of at most the underlay MTU whose payload is exactly one
    IPv4 packet of at most the TUN MTU, every checksum valid; else what is wrong."""
    outer = frame[ETH_HLEN:]
    if len(outer) > UNDERLAY_MTU:
        return f"frame of {len(outer)} bytes on a {UNDERLAY_MTU}-byte underlay"
    ihl = (outer[0] & 15) * 4
    if outer[0] != 0x45 or _sum16(outer[:ihl]) != 0xFFFF:
        return "outer IPv4 header bad"
    if struct.unpack_from(">H", outer, 2)[0] != len(outer):
        return "outer total length != frame"
    udp = outer[20:]
    if struct.unpack_from(">H", udp, 4)[0] != len(udp):
        return "UDP length != datagram"
    field = struct.unpack_from(">H", udp, 6)[0]
    pseudo_sum = _sum16(_pseudo(outer, 17, len(udp)))
    if csum_not_ready:
        # left for the NIC: the field must hold the pseudo-header sum the NIC completes
        if field != pseudo_sum:
            return f"partial UDP checksum {field:#06x} != pseudo-header sum {pseudo_sum:#06x}"
    elif field != 0 and _sum16(_pseudo(outer, 17, len(udp)) + udp) != 0xFFFF:
        return "outer UDP checksum invalid"
    inner = udp[8:]
    if len(inner) < 20 or inner[0] >> 4 != 4:
        return "UDP payload is not an IPv4 packet"
    if struct.unpack_from(">H", inner, 2)[0] != len(inner):
        return f"UDP payload of {len(inner)} bytes is not exactly one IPv4 packet"
    if len(inner) > TUN_MTU:
        return f"inner packet of {len(inner)} bytes over the TUN MTU {TUN_MTU}"
    iihl = (inner[0] & 15) * 4
    if _sum16(inner[:iihl]) != 0xFFFF:
        return "inner IPv4 header checksum invalid"
    if inner[9] == 6 and _sum16(_pseudo(inner, 6, len(inner) - iihl) + inner[iihl:]) != 0xFFFF:
        return "inner TCP checksum invalid"
    return None


class OverlayCapture:
    """AF_PACKET on one veth, in a thread: every UDP/8285 frame is checked as it arrives (the
    frames themselves are not kept); counts per direction, the first problems seen."""

    def __init__(self, tb: Testbed, node: str, ifname: str) -> None:
        self.sock = tb.socket(node, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.05)
        self.counts = {"in": 0, "out": 0, "in_tcp_data": 0, "max_len": 0}
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(1 << 16, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < ETH_HLEN + 28 or struct.unpack_from(">H", data, 12)[0] != ETH_P_IP:
                continue
            outer = data[ETH_HLEN:]
            if outer[9] != 17 or UDP_PORT not in struct.unpack_from(">HH", outer, 20):
                continue
            status = 0
            for level, kind, value in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status = struct.unpack_from("I", value)[0]
            direction = "out" if addr[2] == PACKET_OUTGOING else "in"
            self.counts[direction] += 1
            self.counts["max_len"] = max(self.counts["max_len"], len(outer))
            problem = check_overlay_frame(data, bool(status & TP_STATUS_CSUMNOTREADY))
            if problem is not None and len(self.problems) < 20:
                self.problems.append(f"{direction} {len(outer)} bytes: {problem}")
            inner = outer[28:]
            if direction == "in" and len(inner) > 52 and inner[9] == 6:  # beyond TCP + TS
                self.counts["in_tcp_data"] += 1
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- helpers ---------------------------------------------------------------------------------


def counters(node: Node) -> dict[str, Any]:
    return node.stats()["stats"]


def counter(stats: dict[str, Any], path: str) -> int:
    """stats["egress"]["tx_bytes"] for path "egress.tx_bytes"."""
    value: Any = stats
    for key in path.split("."):
        value = value[key]
    return int(value)


def grown(node: Node, before: dict[str, Any], path: str, by: int = 1) -> dict[str, Any]:
    """The node's counters once `path` has grown by at least `by` since `before` (the stats
    file is rewritten every second), or the last ones seen after 3 s."""

    def ok(doc: dict[str, Any]) -> bool:
        return counter(doc["stats"], path) - counter(before, path) >= by

    return node.wait_stats(ok, timeout=3.0)["stats"]


def drops(stats: dict[str, Any]) -> dict[str, int]:
    return {f"{d}.{k}": v for d in ("egress", "ingress") for k, v in stats[d]["drops"].items() if v}


def start(tb: Testbed, node: str, offload: str) -> Node:
    return tb.start_node(node, "batched", extra_args=["--offload", offload])


def pinged(tb: Testbed, src: str, count: int = 10) -> None:
    res = tb.ping(src, tb.tun_addr(tb.other(src)), count=count, interval=0.01)
    assert res.received == count, res.output


# --- tests -----------------------------------------------------------------------------------


def test_offload_auto_interoperates_with_offload_off(testbed: Testbed) -> None:
    """A node with TUN offloads and UDP GSO/GRO against one without: the peer without
    offloads stands for a per-packet node or real flannel, which take one IPv4 packet per
    datagram and send MTU-sized ones."""
    tb = testbed
    a, b = start(tb, "a", "auto"), start(tb, "b", "off")
    offloads_a, offloads_b = a.stats()["offloads"], b.stats()["offloads"]
    if not offloads_a.get("tun_vnet"):
        pytest.skip(f"the kernel refused TUN offloads here: {offloads_a}")
    assert not any(offloads_b.values()), offloads_b
    pinged(tb, "a")
    pinged(tb, "b")

    for client, server in ((a, b), (b, a)):
        before_c, before_s = counters(client), counters(server)
        res = tb.iperf3(client.node, tb.tun_addr(server.node), seconds=IPERF_SECONDS)
        assert res.bytes > 1_000_000, f"{client.node} -> {server.node}: {res.raw.get('end')}"
        # what crossed the overlay: at least the TCP payload, counted on both daemons
        after_s = grown(server, before_s, "ingress.tx_bytes", res.bytes)
        after_c = grown(client, before_c, "egress.tx_bytes", res.bytes)
        assert after_s["ingress"]["tx_bytes"] - before_s["ingress"]["tx_bytes"] >= res.bytes
        assert after_c["egress"]["tx_bytes"] - before_c["egress"]["tx_bytes"] >= res.bytes
        if client is a:  # the offload node cut TSO super-packets for the plain peer
            assert after_c["tso_reads"] > before_c["tso_reads"], after_c
        else:  # ...and merged the plain peer's MTU-sized segments into its TUN
            assert after_s["tun_gro_writes"] > before_s["tun_gro_writes"], after_s

    final_a, final_b = counters(a), counters(b)
    assert final_b["tso_reads"] == final_b["tun_gro_writes"] == 0, "b has offloads off"
    assert drops(final_a) == {} and drops(final_b) == {}, (drops(final_a), drops(final_b))
    for n in (a, b):
        assert n.alive, n.log_tail()


def test_wire_format_under_tcp_load_with_offloads(testbed: Testbed) -> None:
    """Both nodes with offloads, TCP at full speed both ways over the overlay (data one way,
    ACKs the other): on the underlay every UDP/8285 datagram carries exactly one IPv4 packet
    of at most the MTU, with valid checksums; and the offload paths were really taken."""
    tb = testbed
    # veth hands GSO skbs to the other namespace unsegmented; a real NIC segments (or its
    # driver does) before the wire. Without UDP segmentation offload on the veths, the stack
    # segments UDP_SEGMENT sends before the device, so the capture shows wire datagrams. GRO
    # off on the receiving side: the tap on B must not see datagrams merged after the wire.
    want = {"tx-udp-segmentation": False, "rx-gro": False, "rx-gro-list": False}
    for node in ("a", "b"):
        try:
            set_features(tb, node, tb.veth(node), want)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL):
                pytest.skip(f"cannot switch veth offloads here: {e}")
            raise
        active = active_features(tb, node, tb.veth(node))
        assert not any(active[name] for name in want), {k: active[k] for k in want}

    a, b = start(tb, "a", "auto"), start(tb, "b", "auto")
    if not a.stats()["offloads"].get("tun_vnet") or not b.stats()["offloads"].get("tun_vnet"):
        pytest.skip(f"the kernel refused TUN offloads here: {a.stats()['offloads']}")
    before_a, before_b = counters(a), counters(b)
    cap = OverlayCapture(tb, "b", tb.veth("b"))
    try:
        res = tb.iperf3("a", tb.tun_addr("b"), seconds=IPERF_SECONDS)
    finally:
        cap.stop()
    assert res.bytes > 1_000_000, res.raw.get("end")

    assert cap.problems == [], f"{cap.counts}: {cap.problems}"
    assert cap.counts["in"] >= 1000 and cap.counts["in_tcp_data"] >= 1000, cap.counts
    assert cap.counts["out"] >= 10, f"B's ACKs went out over the overlay too: {cap.counts}"
    assert cap.counts["max_len"] <= UNDERLAY_MTU

    after_a = grown(a, before_a, "tso_reads")
    after_b = grown(b, before_b, "tun_gro_writes")
    assert after_a["tso_reads"] > before_a["tso_reads"], "A read no TSO super-packet"
    assert after_b["tun_gro_writes"] > before_b["tun_gro_writes"], "B merged no segments"
    assert drops(after_a) == {} and drops(after_b) == {}, (drops(after_a), drops(after_b))
    for n in (a, b):
        assert n.alive, n.log_tail()
