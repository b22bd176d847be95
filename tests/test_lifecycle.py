"""The node lifecycle (udpbackend.node.lifecycle) with fakes at both seams: a scripted subnet
manager and a data plane that records routes, so start-up order, readiness, the watch,
renewal, revocation, errors and shutdown are checked without root, TUN or etcd.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from udpbackend.control.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventKind
from udpbackend.control.local import ConfigMissing
from udpbackend.control.network import NetworkConfig
from udpbackend.control.registry import RegistryUnavailable
from udpbackend.control.static import StaticManager, build_config, parse_peer
from udpbackend.errors import ConfigError, StartupError
from udpbackend.host.iface import ExternalInterface
from udpbackend.node.lifecycle import Node, Parts
from udpbackend.options import RunOptions

NET = ipaddress.IPv4Network("198.18.0.0/16")
MINE = ipaddress.IPv4Network("198.18.1.0/24")
PEER = ipaddress.IPv4Network("198.18.2.0/24")
PEER_IP = ipaddress.IPv4Address("198.19.0.2")
EXT = ExternalInterface("eth0", 2, ipaddress.IPv4Address("198.19.0.1"), 1500)


def lease(subnet: ipaddress.IPv4Network, ip: ipaddress.IPv4Address, exp: float | None) -> Lease:
    return Lease(subnet, LeaseAttrs(ip), exp, f"subnets/{subnet.network_address}-24")


class FakePlane:
    def __init__(self, *args: Any) -> None:
        self.args = args
        self.mtu = 1472
        self.routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}
        self.events: list[str] = []
        self.on_error: Callable[[OSError], None] | None = None

    async def setup_async(self) -> None:
        self.events.append("setup")

    def set_route(self, subnet: ipaddress.IPv4Network, ip: ipaddress.IPv4Address) -> None:
        self.routes[subnet] = ip

    def delete_route(self, subnet: ipaddress.IPv4Network) -> bool:
        return self.routes.pop(subnet, None) is not None

    def start(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[OSError], None]) -> None:
        self.events.append("start")
        self.on_error = on_error

    @property
    def tun_name(self) -> str:
        return "flannel0"

    def describe(self) -> str:
        return "fake"

    def stats_doc(self) -> dict[str, Any]:
        return {"routes": len(self.routes)}

    def write_stats(self) -> None:
        self.events.append("stats")

    def teardown(self) -> None:
        self.events.append("teardown")


class FakeFirewall:
    """Records what the lifecycle asked: built for which network and subnet, how often
    ensured; `gone` rules are reported missing once (then ensure puts them back)."""

    name = "fakewall"

    def __init__(self) -> None:
        self.built: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]] = []
        self.ensured = 0
        self.gone = 0

    def make(self, cfg: NetworkConfig, subnet: ipaddress.IPv4Network) -> FakeFirewall:
        self.built.append((cfg.network, subnet))
        return self

    def ensure(self) -> None:
        self.ensured += 1
        self.gone = 0

    def missing(self) -> int:
        return self.gone


class ConfigManager(StaticManager):
    """A static manager whose get_network_config raises what the test says."""

    def __init__(self, error: Exception, times: int) -> None:
        super().__init__(build_config("198.18.0.0/16", "198.18.1.0/24", []))
        self.error, self.times, self.calls = error, times, 0

    async def get_network_config(self) -> NetworkConfig:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return await super().get_network_config()


class ScriptedManager:
    """A SubnetManager whose answers the test scripts: config failures before success,
    watch batches pushed through a queue, renewals recorded."""

    kind = "etcd"

    def __init__(self, config_failures: int = 0, renew_in: float | None = None) -> None:
        self.on_state: Callable[[bool], None] | None = None
        self.config_failures = config_failures
        self.config_calls = 0
        self.batches: asyncio.Queue[list[LeaseEvent]] = asyncio.Queue()
        self.on_own: Callable[[LeaseEvent], None] | None = None
        self.renew_in = renew_in
        self.renewed = 0
        self.completed: list[Lease] = []
        self.closed = False

    async def get_network_config(self) -> NetworkConfig:
        self.config_calls += 1
        if self.config_calls <= self.config_failures:
            raise ConfigMissing()
        return NetworkConfig(NET, 24, NET[256], NET[-256])

    async def stored_public_ip(self) -> ipaddress.IPv4Address | None:
        return None

    async def acquire_lease(
        self, cfg: NetworkConfig, public_ip: ipaddress.IPv4Address, prev: Any
    ) -> Lease:
        self.prev = prev
        return lease(MINE, public_ip, 1e12)

    async def watch_leases(
        self, own: ipaddress.IPv4Network | None, *, on_own: Any = None
    ) -> AsyncIterator[list[LeaseEvent]]:
        self.on_own = on_own
        while True:
            yield await self.batches.get()

    def renew_at(self, le: Lease) -> float | None:
        import time

        return None if self.renew_in is None else time.time() + self.renew_in

    async def renew_lease(self, le: Lease) -> Lease:
        self.renewed += 1
        if self.renewed == 1:
            raise RegistryUnavailable("etcd down")
        return le

    async def complete_lease(self, le: Lease) -> None:
        self.completed.append(le)

    async def close(self) -> None:
        self.closed = True


def make_node(
    manager: Any, opts: RunOptions | None = None
) -> tuple[Node, list[FakePlane], FakeFirewall]:
    planes: list[FakePlane] = []
    rules = FakeFirewall()

    def make_plane(*args: Any) -> FakePlane:
        planes.append(FakePlane(*args))
        return planes[-1]

    parts = Parts(
        manager=manager,
        make_plane=make_plane,
        find_interface=lambda wanted: EXT,
        tun_mtu=lambda ext: ext.mtu - 28,
        make_firewall=rules.make,
    )
    return Node(opts or RunOptions(forward_rules=False), parts), planes, rules


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_static_node_routes_its_peers_and_is_ready_then_shuts_down(tmp_path: Path) -> None:
    cfg = build_config("198.18.0.0/16", "198.18.1.0/24", [parse_peer("198.18.2.0/24=198.19.0.2")])
    env = tmp_path / "subnet.env"
    node, planes, _ = make_node(
        StaticManager(cfg), RunOptions(forward_rules=False, subnet_file=str(env))
    )

    async def main() -> int:
        run = asyncio.create_task(node.run())
        await until(lambda: node.ready)
        assert node._readyz()[0] == 200
        assert planes[0].routes == {PEER: PEER_IP}
        assert planes[0].args[:5] == (NET, MINE, 8285, EXT, 1472)
        node.stop.set()
        return await run

    assert asyncio.run(main()) == 0
    assert planes[0].events[:2] == ["setup", "start"] and planes[0].events[-1] == "teardown"
    text = env.read_text()
    assert "FLANNEL_SUBNET=198.18.1.1/24" in text and "FLANNEL_MTU=1472" in text


def test_forwarding_and_ready_wait_for_the_initial_snapshot_then_watch_applies() -> None:
    mgr = ScriptedManager()
    node, planes, _ = make_node(mgr)

    async def main() -> None:
        run = asyncio.create_task(node.run())
        await until(lambda: bool(planes) and "setup" in planes[0].events)
        await asyncio.sleep(0.05)
        assert not node.ready and node._readyz()[0] == 503
        assert "start" not in planes[0].events  # forwarding waits for the known peers
        mgr.batches.put_nowait([LeaseEvent(LeaseEventKind.ADDED, lease(PEER, PEER_IP, 1.0))])
        await until(lambda: node.ready)
        assert planes[0].routes == {PEER: PEER_IP}
        assert mgr.completed and mgr.completed[0].subnet == MINE
        mgr.batches.put_nowait([LeaseEvent(LeaseEventKind.REMOVED, lease(PEER, PEER_IP, 1.0))])
        await until(lambda: not planes[0].routes)
        node.stop.set()
        assert await run == 0
        assert mgr.closed

    asyncio.run(main())


def test_config_errors_are_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    mgr = ScriptedManager(config_failures=2)
    node, _, _ = make_node(mgr)
    caplog.set_level(logging.WARNING, logger="udpbackend")

    async def main() -> None:
        import udpbackend.node.lifecycle as lc

        lc_retry, lc.CONFIG_RETRY = lc.CONFIG_RETRY, 0.01
        try:
            run = asyncio.create_task(node.run())
            mgr.batches.put_nowait([])
            await until(lambda: node.ready)
            node.stop.set()
            await run
        finally:
            lc.CONFIG_RETRY = lc_retry

    asyncio.run(main())
    assert mgr.config_calls == 3
    warnings = [r.getMessage() for r in caplog.records if "network config" in r.getMessage()]
    assert len(warnings) == 1 and "flannel config not found" in warnings[0]


def test_stopped_while_waiting_for_config_exits_cleanly() -> None:
    mgr = ScriptedManager(config_failures=10**9)
    node, planes, _ = make_node(mgr)

    async def main() -> int:
        run = asyncio.create_task(node.run())
        await until(lambda: mgr.config_calls >= 1)
        node.stop.set()
        return await run

    assert asyncio.run(main()) == 0
    assert planes == [] and mgr.closed


def test_dataplane_error_exits_1() -> None:
    mgr = ScriptedManager()
    node, planes, _ = make_node(mgr)

    async def main() -> int:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        assert planes[0].on_error is not None
        planes[0].on_error(OSError(5, "Input/output error"))
        return await run

    assert asyncio.run(main()) == 1
    assert planes[0].events[-1] == "teardown"


def test_revoked_own_lease_stops_the_node() -> None:
    mgr = ScriptedManager()
    node, planes, _ = make_node(mgr)

    async def main() -> int:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        assert mgr.on_own is not None
        mgr.on_own(LeaseEvent(LeaseEventKind.ADDED, lease(MINE, EXT.address, 2.0)))
        await asyncio.sleep(0.05)
        assert not run.done()  # a renewal seen on the watch is not a revocation
        mgr.on_own(LeaseEvent(LeaseEventKind.REMOVED, lease(MINE, EXT.address, None)))
        return await run

    assert asyncio.run(main()) == 0
    assert planes[0].events[-1] == "teardown"


def test_renewal_retries_after_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    import udpbackend.node.lifecycle as lc

    monkeypatch.setattr(lc, "RENEW_RETRY", 0.01)
    mgr = ScriptedManager(renew_in=0.0)
    node, _, _ = make_node(mgr)

    async def main() -> None:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: mgr.renewed >= 3)
        node.stop.set()
        await run

    asyncio.run(main())


def test_rules_ensured_resynced_kept_on_exit_and_datastore_state_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = ScriptedManager()
    opts = RunOptions(ip_masq=True, forward_rules=True, iptables_resync=0)
    node, _, wall = make_node(mgr, opts)
    caplog.set_level(logging.INFO, logger="udpbackend")

    async def main() -> None:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        assert wall.built == [(NET, MINE)] and wall.ensured == 1
        wall.gone = 2  # someone deleted two rules: the resync puts them back
        await until(lambda: wall.ensured == 2)
        assert mgr.on_state is not None
        mgr.on_state(False)
        mgr.on_state(False)
        mgr.on_state(True)
        node.stop.set()
        await run

    asyncio.run(main())
    # The firewall seam has no way to remove rules: flanneld leaves them on exit, so pod
    # egress stays masqueraded while the node restarts (host/iptables.py rewrites them).
    assert not hasattr(wall, "remove")
    texts = [r.getMessage() for r in caplog.records]
    assert "fakewall: 2 rules missing, restoring" in texts
    assert texts.count("etcd lost: forwarding on known routes") == 1
    assert texts.count("etcd back: watch resumed") == 1


def test_no_rules_without_ip_masq_and_forward_rules() -> None:
    mgr = ScriptedManager()
    node, _, wall = make_node(mgr, RunOptions(ip_masq=False, forward_rules=False))

    async def main() -> None:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        node.stop.set()
        await run

    asyncio.run(main())
    assert wall.built == [] and node.firewall is None


def test_unwritable_subnet_env_keeps_the_node_unready(tmp_path: Path) -> None:
    mgr = ScriptedManager()
    (tmp_path / "a-file").write_text("")  # so its "directory" cannot be made
    opts = RunOptions(forward_rules=False, subnet_file=str(tmp_path / "a-file" / "subnet.env"))
    node, _, _ = make_node(mgr, opts)

    async def main() -> None:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await asyncio.sleep(0.2)
        assert not node.ready and node._readyz()[0] == 503
        assert node._healthz()[0] == 200
        node.stop.set()
        await run

    asyncio.run(main())


def test_interface_too_small_is_a_startup_error() -> None:
    mgr = ScriptedManager()
    node, _, _ = make_node(mgr)

    def tiny(ext: ExternalInterface) -> int:
        raise StartupError("interface eth0 MTU 90 is too small")

    node.parts.tun_mtu = tiny
    with pytest.raises(StartupError, match="too small"):
        asyncio.run(node.run())
    assert mgr.closed


def test_a_previous_runs_subnet_is_a_hint_and_rules_are_built_for_the_new_one(
    tmp_path: Path,
) -> None:
    env = tmp_path / "subnet.env"
    env.write_text(
        "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.9.1/24\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
    )
    mgr = ScriptedManager()
    opts = RunOptions(ip_masq=True, forward_rules=True, subnet_file=str(env))
    node, _, wall = make_node(mgr, opts)

    async def main() -> None:
        run = asyncio.create_task(node.run())
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        node.stop.set()
        await run

    asyncio.run(main())
    assert mgr.prev == ipaddress.IPv4Network("198.18.9.0/24")  # the hint the lease takes
    assert wall.built == [(NET, MINE)] and wall.ensured == 1  # the manager gave 198.18.1.0/24
    assert "FLANNEL_SUBNET=198.18.1.1/24" in env.read_text()


def test_iptables_firewall_holds_flannels_rule_sets() -> None:
    from udpbackend.host.iptables import IptablesFirewall, forward_rules, masq_rules

    class NoTool:
        pass

    both = IptablesFirewall(NET, MINE, ip_masq=True, forward=True, tool=NoTool())  # type: ignore[arg-type]
    assert both.rules == masq_rules(NET, MINE) + forward_rules(NET)
    fwd = IptablesFirewall(NET, MINE, ip_masq=False, forward=True, tool=NoTool())  # type: ignore[arg-type]
    assert fwd.rules == forward_rules(NET)


def test_systemd_is_told_ready_after_subnet_env_and_stopping_at_exit(tmp_path: Path) -> None:
    env = tmp_path / "subnet.env"
    mgr = ScriptedManager()
    node, planes, _ = make_node(mgr, RunOptions(forward_rules=False, subnet_file=str(env)))
    told: list[tuple[str, bool, bool]] = []
    node.parts.notify = lambda state: told.append(
        (state.split("\n")[0], env.exists(), "teardown" in planes[0].events)
    )

    async def main() -> None:
        run = asyncio.create_task(node.run())
        await asyncio.sleep(0.05)
        assert told == []  # not before the peers are known and subnet.env is there
        mgr.batches.put_nowait([])
        await until(lambda: node.ready)
        node.stop.set()
        await run

    asyncio.run(main())
    assert told == [("READY=1", True, False), ("STOPPING=1", True, False)]


def test_a_missing_config_is_waited_for_an_unusable_one_ends_the_node() -> None:
    import udpbackend.node.lifecycle as lc
    from udpbackend.control.local import ConfigMissing

    saved, lc.CONFIG_RETRY = lc.CONFIG_RETRY, 0.01
    try:
        waits = ConfigManager(ConfigMissing(), times=3)
        node, _, _ = make_node(waits)

        async def main() -> int:
            run = asyncio.create_task(node.run())
            await until(lambda: node.ready)
            node.stop.set()
            return await run

        assert asyncio.run(main()) == 0 and waits.calls == 4
        bad = ConfigManager(ConfigError('Backend.Type: backend type "vxlan" is not supported'), 1)
        node, planes, _ = make_node(bad)
        with pytest.raises(
            StartupError, match=r'network config: Backend\.Type: backend type "vxlan"'
        ):
            asyncio.run(node.run())
        assert bad.calls == 1 and planes == []
    finally:
        lc.CONFIG_RETRY = saved


def test_subnet_env_has_flannels_ipv6_lines_when_enabled() -> None:
    from udpbackend.host.subnetenv import format_subnet_env

    text = format_subnet_env(
        NET,
        MINE,
        1472,
        True,
        ipaddress.IPv6Network("fd00:198:18::/48"),
        ipaddress.IPv6Network("fd00:198:18:5::/64"),
    )
    assert text == (
        "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.1.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:198:18::/48\nFLANNEL_IPV6_SUBNET=fd00:198:18:5::1/64\n"
        "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
    )
    assert "IPV6" not in format_subnet_env(NET, MINE, 1472, False)
