# The ingress source check (issue "Trust", --peer-check) and the egress fragmentation-needed
# error, over both implementations: first the pure decision for every flow flannel's rules
# make legitimate and every spoofing case (accepted or refused, the reason counted, no ICMP
# error to a refused source), then the pumps fd-level - a socketpair for the TUN, loopback UDP
# with "attackers" bound to other 127.0.0.0/8 addresses - and the flag on its way from the
# command line to the context.  Overlay and underlay addresses are in 198.18.0.0/15.
from __future__ import annotations

import select
import socket
import struct
from types import ModuleType
from typing import Any

import pytest
from packets import (
    field,
    forwarded,
    frag_needed,
    icmp,
    icmp_error,
    ip,
    ipv4,
    ipv4_icmp_echo,
    ipv4_udp,
    mutate,
    nonzero,
)
from test_packet import _header_enum

from udpbackend import cli
from udpbackend.dataplane import plane

NOW = 10**12
MTU = 1400
NET = "198.19.0.0/16"  # the flannel Network
# This node: lease 198.19.1.0/24, flannel0 198.19.1.0/32 (the subnet's network address).
HERE_TUN, HERE_SUBNET = ip("198.19.1.0"), (ip("198.19.1.0"), 24)
POD = "198.19.1.5"  # a pod on this node
# Peer B: PublicIP 198.18.0.2, lease 198.19.2.0/24, flannel0 198.19.2.0, cni0 198.19.2.1.
B_PUB, B_TUN, B_CNI, B_POD = ip("198.18.0.2"), "198.19.2.0", "198.19.2.1", "198.19.2.5"
# Peer C: PublicIP 198.18.0.3, lease 198.19.3.0/24.
C_PUB, C_POD = ip("198.18.0.3"), "198.19.3.5"
STRANGER = ip("198.18.0.66")  # on the underlay, reaches port 8285, is no peer
OUTSIDE = "198.18.50.50"  # a host outside the overlay (the "internet" of these tests)
ROUTER = "198.18.50.1"  # a router outside the overlay


def routes(impl: ModuleType) -> Any:
    rt = impl.Routes()
    rt.set(ip("198.19.2.0"), 24, B_PUB, 8285)
    rt.set(ip("198.19.3.0"), 24, C_PUB, 8285)
    return rt


def ctx(impl: ModuleType, check: str = "strict", **kw: Any) -> Any:
    return impl.Context(HERE_TUN, MTU, subnet=HERE_SUBNET, peer_check=check, **kw)


def decide(impl, pkt, outer, check="strict", cx=None, rt=None):
    """(Decision, packet after, nonzero stats) of one datagram from outer."""
    cx = ctx(impl, check) if cx is None else cx
    rt = routes(impl) if rt is None else rt
    buf = bytearray(pkt)
    d = impl.ingress(cx, rt, buf, outer, NOW)
    return d, bytes(buf), nonzero(cx.stats())


def test_drop_reasons_and_checks_are_the_headers(impl):
    assert impl.DROP_REASONS[-3:] == ("unknown_peer", "spoofed_source", "not_local")
    assert _header_enum("FP_DROP_", "REASONS") == impl.DROP_REASONS
    checks = {"off": 0, "peer-only": 1, "strict": 2}
    header = _header_constants()
    assert {k: header[f"PEER_CHECK_{k.upper().replace('-', '_')}"] for k in checks} == checks
    assert impl.PEER_CHECKS == ("off", "peer-only", "strict")


def _header_constants() -> dict[str, int]:
    from test_packet import _header_constants as hc

    return hc()


def test_context_takes_subnet_and_check(impl):
    cx = ctx(impl)
    assert cx.subnet == HERE_SUBNET and cx.peer_check == "strict"
    assert impl.Context(HERE_TUN, MTU).subnet == (HERE_TUN, 32), "default: the TUN address"
    assert impl.Context(HERE_TUN, MTU).peer_check == "strict", "default on"
    for bad in ({"subnet": (ip("198.19.1.1"), 24)}, {"subnet": (HERE_TUN, 33)}):
        with pytest.raises(ValueError):
            impl.Context(HERE_TUN, MTU, **bad)
    with pytest.raises(ValueError):
        impl.Context(HERE_TUN, MTU, peer_check="lax")


# --- every flow under flannel's rules, and every spoofing case -------------------------------

ECHO = ipv4_icmp_echo
# A packet our pod sent to B's pod, as quoted by an ICMP error about it.
OURS = ipv4_udp(POD, B_POD, b"q" * 8)

# (id, outer source, packet, verdict under strict, under peer-only); a verdict is None for
# forwarded, else the drop reason.  Under off (flannel) every one of them is forwarded.
CASES = [
    # legitimate flows
    ("pod to pod", B_PUB, ipv4_udp(B_POD, POD, b"hi"), None, None),
    ("pod to pod, tcp", B_PUB, ipv4(B_POD, POD, 6, bytes(20)), None, None),
    # the peer's host: the route "NET dev flannel0" has no src, the kernel takes flannel0's
    # address - B's subnet network address; also what --ip-masq's "! -s NET -d NET MASQUERADE"
    # and kube-proxy's masquerade of marked traffic rewrite sources to
    ("peer host to pod (its TUN address)", B_PUB, ECHO(B_TUN, POD), None, None),
    ("peer host to our host (TUN to TUN)", B_PUB, ECHO(B_TUN, ip(HERE_TUN)), None, None),
    ("pod to our host's TUN address", B_PUB, ECHO(B_POD, ip(HERE_TUN)), None, None),
    ("from the peer's cni0 address", B_PUB, ECHO(B_CNI, POD), None, None),
    ("to our subnet's broadcast", B_PUB, ipv4_udp(B_POD, "198.19.1.255"), None, None),
    # ICMP errors made by the peer's kernel: from a pod, or from its flannel0 address
    (
        "port unreachable from a peer pod",
        B_PUB,
        ipv4(B_POD, POD, 1, icmp(3, 3, bytes(4) + OURS[:28])),
        None,
        None,
    ),
    (
        "frag needed from the peer's kernel",
        B_PUB,
        ipv4(B_TUN, POD, 1, icmp(3, 4, struct.pack(">HH", 0, 1400) + OURS[:28])),
        None,
        None,
    ),
    ("time exceeded from the peer's daemon", B_PUB, icmp_error(ip(B_TUN), OURS, 11), None, None),
    ("second peer", C_PUB, ipv4_udp(C_POD, POD), None, None),
    # an ICMP error from a router outside the overlay, forwarded un-NATed by the peer: its
    # source is outside the peer's subnet.  Refused by strict: with flannel's --ip-masq the
    # conntrack that de-NATs it lives on the node that masqueraded, so it never crosses the
    # overlay; a peer that routes outside traffic into the overlay un-NATed needs peer-only.
    (
        "icmp error from an outside router via the peer",
        B_PUB,
        ipv4(ROUTER, POD, 1, icmp(11, 0, bytes(4) + ipv4_udp(POD, OUTSIDE)[:28])),
        "spoofed_source",
        None,
    ),
    (
        "outside host via the peer, not masqueraded",
        B_PUB,
        ipv4_udp(OUTSIDE, POD),
        "spoofed_source",
        None,
    ),
    # the attacker: from an address that is no peer, whatever it carries
    ("stranger, consistent inner", STRANGER, ipv4_udp(B_POD, POD), "unknown_peer", "unknown_peer"),
    ("stranger, ttl 1", STRANGER, ipv4_udp(B_POD, POD, ttl=1), "unknown_peer", "unknown_peer"),
    ("stranger, garbage", STRANGER, b"\x45junk", "unknown_peer", "unknown_peer"),
    (
        "stranger, inner from our tun",
        STRANGER,
        ECHO(ip(HERE_TUN), POD),
        "unknown_peer",
        "unknown_peer",
    ),
    ("stranger, outside inner", STRANGER, ipv4_udp(OUTSIDE, POD), "unknown_peer", "unknown_peer"),
    (
        "stranger on a peer's port",
        ip("198.18.0.4"),
        ECHO(C_POD, POD),
        "unknown_peer",
        "unknown_peer",
    ),
    # a peer's address (forged, or the peer itself) with inner sources it does not own
    ("inner source in another peer's subnet", B_PUB, ipv4_udp(C_POD, POD), "spoofed_source", None),
    ("inner source outside the overlay", B_PUB, ECHO(OUTSIDE, POD), "spoofed_source", None),
    ("inner source our TUN address", B_PUB, ECHO(ip(HERE_TUN), POD), "spoofed_source", None),
    ("inner source our own pod", B_PUB, ipv4_udp(POD, POD), "spoofed_source", None),
    ("inner source 0.0.0.0", B_PUB, ipv4_udp("0.0.0.0", POD), "spoofed_source", None),
    ("inner source ttl 1, spoofed", B_PUB, ipv4_udp(OUTSIDE, POD, ttl=1), "spoofed_source", None),
    # ...and destinations that are not this node's: a node is no relay
    ("inner destination another peer's pod", B_PUB, ipv4_udp(B_POD, C_POD), "not_local", None),
    ("inner destination the sender's own", B_PUB, ipv4_udp(B_POD, B_TUN), "not_local", None),
    ("inner destination outside the overlay", B_PUB, ECHO(B_POD, OUTSIDE), "not_local", None),
    ("inner destination multicast", B_PUB, ipv4_udp(B_POD, "224.0.0.1"), "not_local", None),
    ("inner destination broadcast", B_PUB, ipv4_udp(B_POD, "255.255.255.255"), "not_local", None),
    # a peer behind NAT: its datagrams come from another address than its lease's PublicIP
    ("peer behind NAT", ip("198.18.99.2"), ipv4_udp(B_POD, POD), "unknown_peer", "unknown_peer"),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("check", ["strict", "peer-only", "off"])
@pytest.mark.parametrize(("outer", "pkt", "strict", "peer_only"), [c[1:] for c in CASES], ids=IDS)
def test_decision(impl, check, outer, pkt, strict, peer_only):
    d, after, stats = decide(impl, pkt, outer, check)
    want = {"strict": strict, "peer-only": peer_only, "off": None}[check]
    if want is None and pkt == b"\x45junk":
        want = "too_short"  # off: flannel's checks only
    if want is None and field(pkt, "ttl") <= 1:  # a forwarded ttl 1 expires, answered
        assert d.verdict == impl.REPLY and d.reply == icmp_error(HERE_TUN, pkt, 11)
        assert stats == {"ingress.drops.ttl_exceeded": 1, "icmp_time_exceeded": 1}
    elif want is None:
        assert d == (impl.FORWARD, len(pkt), None, None)
        assert after == forwarded(pkt)
        assert stats == {}
    else:
        assert d == (impl.DROP, len(pkt), None, None), "dropped, and never answered"
        assert after == pkt
        assert stats == {f"ingress.drops.{want}": 1}


def test_no_icmp_error_for_a_refused_source(impl):
    """A refused TTL-1 datagram costs no token: the bucket's one answers a peer next."""
    cx = ctx(impl, icmp_burst=1)
    rt = routes(impl)
    for outer, inner_src in ((STRANGER, B_POD), (B_PUB, OUTSIDE), (B_PUB, C_POD)):
        d, _, _ = decide(impl, ipv4_udp(inner_src, POD, ttl=1), outer, cx=cx, rt=rt)
        assert d.verdict == impl.DROP
    d, _, stats = decide(impl, ipv4_udp(B_POD, POD, ttl=1), B_PUB, cx=cx, rt=rt)
    assert d.verdict == impl.REPLY
    assert stats == {
        "ingress.drops.unknown_peer": 1,
        "ingress.drops.spoofed_source": 2,
        "ingress.drops.ttl_exceeded": 1,
        "icmp_time_exceeded": 1,
    }


def test_checks_come_in_order(impl):
    """unknown_peer before the header checks; spoofed_source after them, before not_local and
    the TTL."""
    bad_sum = mutate(ipv4_udp(OUTSIDE, OUTSIDE), checksum=1)
    assert decide(impl, bad_sum, STRANGER)[2] == {"ingress.drops.unknown_peer": 1}
    assert decide(impl, bad_sum, B_PUB)[2] == {"ingress.drops.bad_checksum": 1}
    both = ipv4_udp(OUTSIDE, OUTSIDE, ttl=1)
    assert decide(impl, both, B_PUB)[2] == {"ingress.drops.spoofed_source": 1}
    assert decide(impl, ipv4_udp(B_POD, OUTSIDE, ttl=1), B_PUB)[2] == {"ingress.drops.not_local": 1}


def test_lease_changes_public_ip(impl):
    """B's lease gets a new PublicIP (set_route with it): the old address stops being
    accepted at once, the new one is."""
    cx, rt = ctx(impl), routes(impl)
    pkt = ipv4_udp(B_POD, POD)
    new = ip("198.18.0.12")
    assert decide(impl, pkt, new, cx=cx, rt=rt)[0].verdict == impl.DROP
    rt.set(ip("198.19.2.0"), 24, new, 8285)
    assert decide(impl, pkt, new, cx=cx, rt=rt)[0].verdict == impl.FORWARD
    assert decide(impl, pkt, B_PUB, cx=cx, rt=rt)[0].verdict == impl.DROP
    assert nonzero(cx.stats()) == {"ingress.drops.unknown_peer": 2}


def test_lease_moves_between_peers(impl):
    """C's subnet is taken over by B (a lease moving): for a while B is listed by two routes,
    both subnets are B's sources; C, still holding another lease, may no longer send from the
    moved one; once C's last route goes, C is a stranger."""
    cx, rt = ctx(impl), routes(impl)
    rt.set(ip("198.19.4.0"), 24, C_PUB, 8285)  # C's second lease
    rt.set(ip("198.19.3.0"), 24, B_PUB, 8285)  # C's first lease, now B's
    assert rt.peer(B_PUB) == [(ip("198.19.2.0"), 24), (ip("198.19.3.0"), 24)]
    for src in (B_POD, C_POD):
        assert decide(impl, ipv4_udp(src, POD), B_PUB, cx=cx, rt=rt)[0].verdict == impl.FORWARD
    assert decide(impl, ipv4_udp("198.19.4.5", POD), C_PUB, cx=cx, rt=rt)[0].verdict == 0
    assert decide(impl, ipv4_udp(C_POD, POD), C_PUB, cx=cx, rt=rt)[0].verdict == impl.DROP
    rt.delete(ip("198.19.4.0"), 24)
    assert decide(impl, ipv4_udp(C_POD, POD), C_PUB, cx=cx, rt=rt)[0].verdict == impl.DROP
    rt.delete(ip("198.19.2.0"), 24)
    assert decide(impl, ipv4_udp(C_POD, POD), B_PUB, cx=cx, rt=rt)[0].verdict == impl.FORWARD
    assert decide(impl, ipv4_udp(B_POD, POD), B_PUB, cx=cx, rt=rt)[0].verdict == impl.DROP
    assert nonzero(cx.stats()) == {
        "ingress.drops.spoofed_source": 2,
        "ingress.drops.unknown_peer": 1,
    }


def test_tun_address_outside_the_subnet_is_local(impl):
    """The TUN address is a local destination even when it is not inside the subnet."""
    cx = impl.Context(ip("198.19.9.9"), MTU, subnet=HERE_SUBNET)
    d, _, _ = decide(impl, ECHO(B_POD, ip("198.19.9.9")), B_PUB, cx=cx)
    assert d.verdict == impl.FORWARD
    assert decide(impl, ECHO(B_POD, ip("198.19.9.8")), B_PUB, cx=cx)[0].verdict == impl.DROP


def test_no_peers_at_all(impl):
    """Before the first lease is seen, strict and peer-only accept nothing."""
    for check in ("strict", "peer-only"):
        d, _, stats = decide(impl, ipv4_udp(B_POD, POD), B_PUB, check, rt=impl.Routes())
        assert d.verdict == impl.DROP and stats == {"ingress.drops.unknown_peer": 1}


# --- egress: DF over the MTU gets fragmentation needed (RFC 1191) ----------------------------

BIG_DF = ipv4_udp(POD, B_POD, b"d" * (MTU - 27), flags_frag=0x4000)  # MTU + 1 bytes


def test_df_over_mtu_gets_frag_needed(impl):
    cx, rt = ctx(impl), routes(impl)
    buf = bytearray(BIG_DF)
    d = impl.egress(cx, rt, buf, NOW)
    assert d == (impl.REPLY, MTU + 1, None, frag_needed(HERE_TUN, BIG_DF, MTU))
    assert d.reply[20:22] == b"\x03\x04" and struct.unpack(">H", d.reply[26:28])[0] == MTU
    assert bytes(buf) == BIG_DF
    assert nonzero(cx.stats()) == {"egress.drops.oversize": 1, "icmp_unreachable": 1}


@pytest.mark.parametrize(
    ("pkt", "why"),
    [
        (ipv4_udp(POD, B_POD, b"d" * (MTU - 27)), "no DF: dropped as before"),
        (mutate(BIG_DF, checksum=1), "a header that does not verify"),
        (ipv4(POD, B_POD, 1, icmp(3, 1, b"d" * MTU), flags_frag=0x4000), "an ICMP error"),
        (ipv4_udp("224.0.0.9", B_POD, b"d" * MTU, flags_frag=0x4000), "a multicast source"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_over_mtu_not_answered(impl, pkt, why):
    cx = ctx(impl)
    d = impl.egress(cx, routes(impl), bytearray(pkt), NOW)
    assert d.verdict == impl.DROP and d.reply is None
    assert nonzero(cx.stats()) == {"egress.drops.oversize": 1}


def test_frag_needed_is_rate_limited_and_egress_only(impl):
    cx, rt = ctx(impl, icmp_burst=2), routes(impl)
    verdicts = [impl.egress(cx, rt, bytearray(BIG_DF), NOW).verdict for _ in range(3)]
    assert verdicts == [impl.REPLY, impl.REPLY, impl.DROP]
    assert cx.stats()["icmp_ratelimited"] == 1
    # ingress: a peer sending more than our MTU is dropped, never answered
    big_in = ipv4_udp(B_POD, POD, b"d" * MTU, flags_frag=0x4000)
    d, _, stats = decide(impl, big_in, B_PUB)
    assert d.verdict == impl.DROP and stats == {"ingress.drops.oversize": 1}
    # exactly the MTU goes
    ok = ipv4_udp(POD, B_POD, b"d" * (MTU - 28), flags_frag=0x4000)
    assert impl.egress(ctx(impl), rt, bytearray(ok), NOW).verdict == impl.FORWARD


# --- the pumps, fd-level: loopback UDP from peers and from strangers -------------------------

MODES = ("python", "c-batched", "c-per-packet", "c-vnet")
PEER_LO = "127.0.0.2"  # peer B's "PublicIP" on loopback
STRANGER_LO = "127.0.0.3"


class Rig:
    """A pump between a socketpair TUN and a UDP socket on 127.0.0.1; peer B is a socket on
    127.0.0.2 owning 198.19.2.0/24; strangers send from 127.0.0.3 and, forging B's address,
    from another socket on 127.0.0.2."""

    def __init__(self, impl: ModuleType, mode: str, check: str = "strict", **pump: Any) -> None:
        self.tun_end, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = self._udp("127.0.0.1")
        self.peer = self._udp(PEER_LO)
        self.stranger = self._udp(STRANGER_LO)
        self.forger = self._udp(PEER_LO)  # B's address, another port: the port is not checked
        for s in (self.tun_end, self.tun):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.vnet = mode == "c-vnet"
        self.cx = impl.Context(
            HERE_TUN,
            MTU,
            per_packet=mode in ("python", "c-per-packet"),
            subnet=HERE_SUBNET,
            peer_check=check,
        )
        self.routes = impl.Routes()
        self.routes.set(ip("198.19.2.0"), 24, ip(PEER_LO), self.peer.getsockname()[1])
        kw = {"vnet": True} if self.vnet else {}
        self.pump = impl.Pump(
            self.cx, self.routes, self.tun_end.fileno(), self.sock, batch=8, **kw, **pump
        )

    @staticmethod
    def _udp(addr: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((addr, 0))
        return s

    def send(self, sender: socket.socket, *pkts: bytes) -> None:
        for p in pkts:
            sender.sendto(p, self.sock.getsockname())

    def tun_out(self) -> list[bytes]:
        out = []
        while True:
            try:
                data = self.tun.recv(70000)
            except BlockingIOError:
                return out
            out.append(data[10:] if self.vnet else data)

    @staticmethod
    def got(sock: socket.socket, wait: float = 0.05) -> list[bytes]:
        out = []
        while select.select([sock], [], [], wait)[0]:
            out.append(sock.recv(70000))
        return out

    def close(self) -> None:
        for s in (self.tun_end, self.tun, self.sock, self.peer, self.stranger, self.forger):
            s.close()


@pytest.fixture
def make_rig(request: pytest.FixtureRequest):
    rigs: list[Rig] = []

    def make(mode: str, **kw: Any) -> Rig:
        impl = request.getfixturevalue("py_impl" if mode == "python" else "c_impl")
        rig = Rig(impl, mode, **kw)
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


BARRAGE = [
    ipv4_udp(B_POD, POD, b"SPOOF consistent"),
    ipv4_udp(B_POD, POD, b"SPOOF ttl", ttl=1),
    ECHO(ip(HERE_TUN), POD),
    ipv4_udp(OUTSIDE, POD, b"SPOOF outside"),
    ipv4_udp(C_POD, POD, b"SPOOF other peer"),
    ipv4_udp(POD, POD, b"SPOOF own pod", ttl=1),
    ipv4_udp(B_POD, C_POD, b"SPOOF relay"),
    ipv4_udp(B_POD, OUTSIDE, b"SPOOF relay out", ttl=1),
]
FORGED = BARRAGE[2:]  # from B's own address: only what B could not send itself


@pytest.mark.parametrize("mode", MODES)
def test_pump_refuses_strangers_and_spoofs_and_answers_none(make_rig, mode):
    rig = make_rig(mode)
    rig.send(rig.stranger, *BARRAGE)
    rig.send(rig.forger, *FORGED)
    legit = [ipv4_udp(B_POD, POD, b"from B"), ECHO(B_TUN, ip(HERE_TUN))]
    ttl1 = ipv4_udp(B_POD, POD, b"B, last hop", ttl=1)
    rig.send(rig.peer, *legit, ttl1)
    n = len(BARRAGE) + len(FORGED) + len(legit) + 1
    taken = 0
    for _ in range(50):
        taken += rig.pump.udp_to_tun(100)
        if taken == n:
            break
        select.select([rig.sock], [], [], 0.05)
    assert taken == n
    assert rig.tun_out() == [forwarded(p) for p in legit], "nothing spoofed in the TUN"
    assert rig.got(rig.stranger) == [] and rig.got(rig.forger) == [], "nothing reflected"
    assert rig.got(rig.peer) == [icmp_error(HERE_TUN, ttl1, 11)], "the peer is answered"
    d = {k: v for k, v in rig.cx.stats()["ingress"]["drops"].items() if v}
    assert d == {
        "unknown_peer": len(BARRAGE),
        "spoofed_source": 4,
        "not_local": 2,
        "ttl_exceeded": 1,
    }


@pytest.mark.parametrize("mode", MODES)
def test_pump_peer_only_and_off(make_rig, mode):
    for check, want in (("peer-only", FORGED), ("off", BARRAGE + FORGED)):
        rig = make_rig(mode, check=check)
        rig.send(rig.stranger, *BARRAGE)
        rig.send(rig.forger, *FORGED)
        taken = 0
        for _ in range(50):
            taken += rig.pump.udp_to_tun(100)
            if taken == len(BARRAGE) + len(FORGED):
                break
            select.select([rig.sock], [], [], 0.05)
        fwd = [p for p in want if field(p, "ttl") > 1]
        assert sorted(rig.tun_out()) == sorted(forwarded(p) for p in fwd), check
        drops = {k: v for k, v in rig.cx.stats()["ingress"]["drops"].items() if v}
        if check == "peer-only":
            assert drops == {"unknown_peer": len(BARRAGE), "ttl_exceeded": 2}
            assert rig.got(rig.stranger) == [] and len(rig.got(rig.forger)) == 2
        else:
            assert drops == {"ttl_exceeded": 5}, "off: flannel's behaviour, replies and all"


def test_pump_cut_message_from_a_stranger_is_unknown_peer(c_impl):
    """A datagram over a small slot is cut by the kernel: from a stranger it still counts as
    unknown_peer, as fp_ingress would."""
    rig = Rig(c_impl, "c-batched", slot_size=MTU + 1)
    try:
        big = ipv4_udp(B_POD, POD, b"x" * 3000)
        rig.send(rig.stranger, big)
        rig.send(rig.peer, big)
        select.select([rig.sock], [], [], 1.0)
        taken = rig.pump.udp_to_tun(10)
        if taken < 2:
            select.select([rig.sock], [], [], 0.2)
            taken += rig.pump.udp_to_tun(10)
        assert taken == 2
        d = {k: v for k, v in rig.cx.stats()["ingress"]["drops"].items() if v}
        assert d == {"unknown_peer": 1, "oversize": 1}
        assert rig.tun_out() == []
    finally:
        rig.close()


def test_pump_udp_gro_receive_from_a_stranger(c_impl):
    """A stranger's UDP_SEGMENT burst (one GRO receive of several datagrams): every datagram is
    refused and counted."""
    rig = Rig(c_impl, "c-batched", offload=True)
    try:
        if not rig.pump.offloads["udp_gro"]:
            pytest.skip("the kernel refused UDP_GRO on this socket")
        pkts = [ipv4_udp(B_POD, POD, bytes([i]) * 92) for i in range(5)]
        try:
            rig.stranger.sendmsg(
                [b"".join(pkts)],
                [(socket.SOL_UDP, 103, struct.pack("=H", len(pkts[0])))],
                0,
                rig.sock.getsockname(),
            )
        except OSError as exc:
            pytest.skip(f"cannot send with UDP_SEGMENT: {exc}")
        select.select([rig.sock], [], [], 1.0)
        assert rig.pump.udp_to_tun(64) == 5
        assert rig.tun_out() == []
        s = rig.cx.stats()
        assert s["ingress"]["drops"]["unknown_peer"] == 5 and s["gro_receives"] == 1
    finally:
        rig.close()


@pytest.mark.parametrize("mode", ("python", "c-batched", "c-per-packet"))
def test_pump_egress_frag_needed_into_the_tun(make_rig, mode):
    rig = make_rig(mode)
    rig.tun.send(BIG_DF)
    assert rig.pump.tun_to_udp(10) == 1
    assert rig.tun_out() == [frag_needed(HERE_TUN, BIG_DF, MTU)]
    assert rig.got(rig.peer) == []


def test_routes_set_through_the_plane_feed_the_check(py_impl):
    """make_pump hands the node's subnet and --peer-check to the context; the routes it is
    given later (DataPlane.set_route writes pump.routes) are the peers."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for mode in ("python", "per-packet", "batched"):
            pump = plane.make_pump(
                mode,
                HERE_TUN,
                MTU,
                a.fileno(),
                sock,
                8,
                False,
                subnet=HERE_SUBNET,
                peer_check="peer-only",
            )
            assert (pump.cx.subnet, pump.cx.peer_check) == (HERE_SUBNET, "peer-only")
            pump.routes.set(ip("198.19.2.0"), 24, B_PUB, 8285)
            assert pump.routes.from_peer(B_PUB, ip(B_POD)) is True
    finally:
        for s in (a, b, sock):
            s.close()


# --- the flag: command line -> RunOptions ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], "strict"),
        (["--peer-check", "off"], "off"),
        (["--peer-check", "peer-only"], "peer-only"),
    ],
)
def test_flag_reaches_run_options(monkeypatch, argv, want):
    import udpbackend.node.compose as compose

    seen: list[Any] = []
    monkeypatch.setattr(compose, "run_node", lambda static, opts: seen.append(opts) or 0)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    argv = ["run", "--network", NET, "--subnet", "198.19.1.0/24", *argv]
    assert cli.main(argv) == 0
    assert seen[0].peer_check == want


def test_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--peer-check", "lax"])
    assert "invalid choice" in capsys.readouterr().err
