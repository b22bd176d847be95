# Routes over both implementations: set/replace/delete/lookup/len, argument errors, longest-
# prefix match, and 10,000 random routes checked against a linear-scan reference (wireguard's
# SlowRouter) and C against Python.
from __future__ import annotations

import random

import pytest
from packets import ip

A = (ip("198.18.200.1"), 8285)
B = (ip("198.18.200.2"), 8286)
C = (ip("198.18.200.3"), 1)
D = (ip("198.18.200.4"), 65535)


def test_empty(impl):
    rt = impl.Routes()
    assert len(rt) == 0
    assert rt.lookup(ip("198.18.1.1")) is None
    assert rt.lookup(0) is None


def test_set_replace_delete(impl):
    rt = impl.Routes()
    assert rt.set(ip("198.18.1.0"), 24, *A) is False
    assert len(rt) == 1
    assert rt.lookup(ip("198.18.1.77")) == (24, A)
    assert rt.lookup(ip("198.18.2.77")) is None
    assert rt.set(ip("198.18.1.0"), 24, *B) is True, "same net/len replaces"
    assert len(rt) == 1
    assert rt.lookup(ip("198.18.1.77")) == (24, B)
    assert rt.set(ip("198.18.1.0"), 25, *C) is False, "same net, other length: a new route"
    assert len(rt) == 2
    rt.delete(ip("198.18.1.0"), 24)
    assert len(rt) == 1
    assert rt.lookup(ip("198.18.1.200")) is None
    assert rt.lookup(ip("198.18.1.1")) == (25, C)
    rt.delete(ip("198.18.1.0"), 25)
    assert len(rt) == 0
    assert rt.lookup(ip("198.18.1.1")) is None
    assert rt.set(ip("198.18.1.0"), 24, *A) is False, "a deleted route can come back"
    assert rt.lookup(ip("198.18.1.1")) == (24, A)


@pytest.mark.parametrize(
    ("net", "plen"),
    [
        ("198.18.1.1", 24),
        ("198.18.1.0", 23),
        ("198.19.0.0", 15),
        ("198.18.0.1", 31),
        ("0.0.0.1", 0),
        ("198.18.1.0", 33),
        ("198.18.1.0", 64),
        ("198.18.1.0", -1),
    ],
)
def test_bad_net(impl, net, plen):
    rt = impl.Routes()
    with pytest.raises(ValueError):
        rt.set(ip(net), plen, *A)
    with pytest.raises(ValueError):
        rt.delete(ip(net), plen)
    assert len(rt) == 0


def test_delete_missing(impl):
    rt = impl.Routes()
    with pytest.raises(KeyError):
        rt.delete(ip("198.18.1.0"), 24)
    rt.set(ip("198.18.1.0"), 24, *A)
    with pytest.raises(KeyError):
        rt.delete(ip("198.18.1.0"), 25)
    with pytest.raises(KeyError):
        rt.delete(ip("198.18.2.0"), 24)
    rt.delete(ip("198.18.1.0"), 24)
    with pytest.raises(KeyError):
        rt.delete(ip("198.18.1.0"), 24)
    assert len(rt) == 0


def test_edges_of_the_address_space(impl):
    rt = impl.Routes()
    rt.set(0, 0, *A)
    rt.set(0xFFFFFFFF, 32, *B)
    rt.set(0, 32, *C)
    rt.set(0x80000000, 1, *D)
    assert rt.lookup(0) == (32, C)
    assert rt.lookup(1) == (0, A)
    assert rt.lookup(0x7FFFFFFF) == (0, A)
    assert rt.lookup(0x80000000) == (1, D)
    assert rt.lookup(0xFFFFFFFE) == (1, D)
    assert rt.lookup(0xFFFFFFFF) == (32, B)
    assert len(rt) == 4


def test_longest_prefix_mixed_lengths(impl):
    rt = impl.Routes()
    rt.set(ip("198.18.0.0"), 15, *A)
    rt.set(ip("198.18.0.0"), 16, *B)
    rt.set(ip("198.18.1.0"), 24, *C)
    rt.set(ip("198.18.1.128"), 25, *D)
    rt.set(ip("198.18.1.129"), 32, *A)
    cases = {
        "198.19.5.5": (15, A),
        "198.18.5.5": (16, B),
        "198.18.1.5": (24, C),
        "198.18.1.127": (24, C),
        "198.18.1.128": (25, D),
        "198.18.1.129": (32, A),
        "198.18.1.130": (25, D),
        "198.18.1.255": (25, D),
        "198.18.2.0": (16, B),
        "198.20.0.0": None,
        "198.17.255.255": None,
    }
    for addr, want in cases.items():
        assert rt.lookup(ip(addr)) == want, addr
    rt.delete(ip("198.18.1.128"), 25)
    assert rt.lookup(ip("198.18.1.130")) == (24, C), "falls back to the next shorter prefix"
    assert rt.lookup(ip("198.18.1.129")) == (32, A)
    rt.delete(ip("198.18.0.0"), 16)
    assert rt.lookup(ip("198.18.5.5")) == (15, A)
    assert len(rt) == 3


class SlowRoutes:
    """Linear scan: the obviously correct reference."""

    def __init__(self) -> None:
        self.routes: dict[tuple[int, int], tuple[int, int]] = {}

    def set(self, net: int, plen: int, peer_ip: int, peer_port: int) -> bool:
        replaced = (net, plen) in self.routes
        self.routes[(net, plen)] = (peer_ip, peer_port)
        return replaced

    def delete(self, net: int, plen: int) -> None:
        del self.routes[(net, plen)]

    def lookup(self, addr: int):
        best = None
        for (net, plen), hop in self.routes.items():
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            if addr & mask == net and (best is None or plen > best[0]):
                best = (plen, hop)
        return best


def random_routes(rng: random.Random, n: int):
    """n (net, plen, peer_ip, peer_port) inside 198.18.0.0/15, lengths 15..32 (denser long)."""
    base = ip("198.18.0.0")
    out = []
    for _ in range(n):
        plen = rng.choice([15, 16, 18, 20, 22, 24, 24, 24, 26, 28, 30, 31, 32, 32, 32])
        addr = base | rng.getrandbits(17)
        net = addr & (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        out.append((net, plen, base | rng.getrandbits(17), rng.randrange(65536)))
    return out


def test_random_against_slow_router(impl):
    rng = random.Random(20250522)
    rt, slow = impl.Routes(), SlowRoutes()
    for r in random_routes(rng, 2000):
        assert rt.set(*r) == slow.set(*r)
    assert len(rt) == len(slow.routes)
    # Delete a third, so lookups fall back through emptied lengths.
    for net, plen in rng.sample(sorted(slow.routes), len(slow.routes) // 3):
        rt.delete(net, plen)
        slow.delete(net, plen)
    assert len(rt) == len(slow.routes)
    base = ip("198.18.0.0")
    addrs = [base | rng.getrandbits(17) for _ in range(1500)]
    addrs += [net for net, _ in slow.routes]  # every remaining route's own net
    addrs += [ip("198.17.255.255"), ip("198.20.0.0"), 0, 0xFFFFFFFF]
    for addr in addrs:
        assert rt.lookup(addr) == slow.lookup(addr), hex(addr)


def test_10k_routes_c_and_python_agree(py_impl, c_impl):
    rng = random.Random(10_000)
    rts = [py_impl.Routes(), c_impl.Routes()]
    for r in random_routes(rng, 10_000):
        assert rts[0].set(*r) == rts[1].set(*r)
    assert len(rts[0]) == len(rts[1]) > 5000
    base = ip("198.18.0.0")
    hits = 0
    for _ in range(10_000):
        addr = base | rng.getrandbits(17) if rng.random() < 0.95 else rng.getrandbits(32)
        want = rts[0].lookup(addr)
        assert rts[1].lookup(addr) == want, hex(addr)
        hits += want is not None
    assert hits > 5000, "the comparison must mostly exercise matches"
    # Remove every route again through both: a second delete of the same route raises in both.
    seen = set()
    for net, plen, *_ in random_routes(random.Random(10_000), 10_000):
        for rt in rts:
            if (net, plen) in seen:
                with pytest.raises(KeyError):
                    rt.delete(net, plen)
            else:
                rt.delete(net, plen)
        seen.add((net, plen))
    assert len(rts[0]) == len(rts[1]) == 0
    assert rts[1].lookup(ip("198.18.1.1")) is None


# --- the peer-address table: public IP -> the subnets of the routes naming it ---------------


def test_peer_table_follows_set_and_delete(impl):
    rt = impl.Routes()
    a, b = A[0], B[0]
    assert rt.peer(a) is None and rt.from_peer(a, ip("198.19.1.1")) is None
    assert rt.peer_count() == 0
    rt.set(ip("198.19.1.0"), 24, *A)
    assert rt.peer(a) == [(ip("198.19.1.0"), 24)] and rt.peer_count() == 1
    assert rt.from_peer(a, ip("198.19.1.0")) is True
    assert rt.from_peer(a, ip("198.19.1.255")) is True
    assert rt.from_peer(a, ip("198.19.2.0")) is False
    # a second lease behind the same address (a lease move, or two leases on one host)
    rt.set(ip("198.19.2.0"), 24, a, 9999)
    assert rt.peer(a) == [(ip("198.19.1.0"), 24), (ip("198.19.2.0"), 24)]
    assert rt.peer_count() == 1, "the port plays no part"
    assert rt.from_peer(a, ip("198.19.2.7")) is True
    # the lease's PublicIP changes: the subnet moves to the new address, the old one is gone
    assert rt.set(ip("198.19.1.0"), 24, *B) is True
    assert rt.peer(a) == [(ip("198.19.2.0"), 24)] and rt.peer(b) == [(ip("198.19.1.0"), 24)]
    assert rt.from_peer(a, ip("198.19.1.7")) is False
    assert rt.from_peer(b, ip("198.19.1.7")) is True
    # replacing the port only changes nothing here
    rt.set(ip("198.19.1.0"), 24, b, 1)
    assert rt.peer(b) == [(ip("198.19.1.0"), 24)] and rt.peer_count() == 2
    rt.delete(ip("198.19.2.0"), 24)
    assert rt.peer(a) is None and rt.from_peer(a, ip("198.19.2.7")) is None
    rt.delete(ip("198.19.1.0"), 24)
    assert rt.peer(b) is None and rt.peer_count() == 0


def test_peer_with_many_subnets(impl):
    """More subnets behind one address than a peer slot holds inline."""
    rt = impl.Routes()
    nets = [ip(f"198.19.{i}.0") for i in range(40)]
    for n in nets:
        rt.set(n, 24, *A)
    assert rt.peer(A[0]) == [(n, 24) for n in nets]
    assert all(rt.from_peer(A[0], n + 5) for n in nets)
    for n in nets[::2]:
        rt.delete(n, 24)
    assert rt.peer(A[0]) == [(n, 24) for n in nets[1::2]]
    assert not any(rt.from_peer(A[0], n + 5) for n in nets[::2])
    for n in nets[1::2]:
        rt.delete(n, 24)
    assert rt.peer(A[0]) is None and rt.peer_count() == 0


def test_peer_table_10k_peers_c_and_python_agree(py_impl, c_impl):
    """10,000 peers, each a /28 (some with two, some moving address), set, moved and deleted
    at random through both tables; every peer query answers alike."""
    rng = random.Random(8285)
    rts = [py_impl.Routes(), c_impl.Routes()]
    peers = [ip("198.18.0.0") + i for i in range(1, 12_001)]
    live: dict[int, int] = {}  # net -> peer ip
    nets = [ip("198.18.0.0") + (i << 4) for i in range(12_000)]  # /28s

    def apply(op: str, net: int, peer: int = 0) -> None:
        for rt in rts:
            if op == "set":
                rt.set(net, 28, peer, 8285)
            else:
                rt.delete(net, 28)

    for i, net in enumerate(nets[:10_000]):
        live[net] = peers[i]
        apply("set", net, peers[i])
    assert rts[0].peer_count() == rts[1].peer_count() == 10_000
    for _ in range(6_000):
        r = rng.random()
        if r < 0.3 and live:  # delete
            net = rng.choice(list(live))
            del live[net]
            apply("del", net)
        elif r < 0.6:  # a lease's PublicIP changes (or a new lease)
            net, peer = rng.choice(nets), rng.choice(peers)
            live[net] = peer
            apply("set", net, peer)
        else:  # a second lease behind an existing peer
            net, peer = rng.choice(nets), rng.choice(list(live.values()) or peers)
            live[net] = peer
            apply("set", net, peer)
    want: dict[int, list[tuple[int, int]]] = {}
    for net, peer in live.items():
        want.setdefault(peer, []).append((net, 28))
    assert rts[0].peer_count() == rts[1].peer_count() == len(want)
    for peer in [*peers, 0, 0xFFFFFFFF]:
        expected = sorted(want[peer]) if peer in want else None
        assert rts[0].peer(peer) == rts[1].peer(peer) == expected, hex(peer)
    for _ in range(20_000):
        peer = rng.choice(peers)
        addr = rng.choice(nets) | rng.getrandbits(4)
        got = rts[1].from_peer(peer, addr)
        assert got == rts[0].from_peer(peer, addr), (hex(peer), hex(addr))
        assert got == (None if peer not in want else live.get(addr & ~0xF) == peer)
    for net in list(live):
        apply("del", net)
    assert rts[0].peer_count() == rts[1].peer_count() == 0
