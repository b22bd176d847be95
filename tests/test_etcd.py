# EtcdRegistry (udpbackend/etcd.py) against a REAL etcd started per test (tests/etcd_server.py,
# fixtures at the end of tests/conftest.py): flannel's key layout and bytes, the create-if-absent
# transaction, leases, watch/compaction/outage/resume, endpoint failover, TLS and auth.
# Addresses: 127.0.0.1 and 198.18.0.0/15 only.  Every coroutine runs under uvloop with a deadline.
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from etcd_server import EtcdServer, free_port, make_pki

from udpbackend.control.etcd import EtcdRegistry, go_path_join
from udpbackend.control.registry import (
    CompactedError,
    RegistryUnavailable,
    WatchBatch,
    WatchEvent,
    WatchKind,
)
from udpbackend.errors import ConfigError

T = TypeVar("T")
PREFIX = "/coreos.com/network"
UDP_VALUE = b'{"PublicIP":"198.18.0.5","PublicIPv6":null}'  # what a flanneld UDP node writes
CONFIG = b'{"Network":"198.18.0.0/15","SubnetLen":24,"Backend":{"Type":"udp"}}'


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run on a fresh uvloop loop; a hang fails the test instead of the whole run."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


def registry(server: EtcdServer, **kw: Any) -> EtcdRegistry:
    kw.setdefault("timeout", 2.0)
    return EtcdRegistry([server.endpoint], **kw)


def value(ip: str) -> bytes:
    return json.dumps({"PublicIP": ip, "PublicIPv6": None}, separators=(",", ":")).encode()


async def pull(w: AsyncIterator[WatchBatch], n: int, timeout: float = 5.0) -> list[WatchEvent]:
    """Batches from the watch until at least n events arrived."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        while len(events) < n:
            events.extend((await anext(w)).events)
    return events


def kinds(events: list[WatchEvent]) -> list[tuple[str, str]]:
    return [(e.kind.value, e.kv.key) for e in events]


# ---------------------------------------------------------------------------------------------
# Settings (no etcd needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elems", "want"),
    [
        (("/coreos.com/network", "config"), "/coreos.com/network/config"),
        (("/coreos.com/network/", "subnets"), "/coreos.com/network/subnets"),
        (("//coreos.com//network//", "subnets/198.19.1.0-24"),
         "/coreos.com/network/subnets/198.19.1.0-24"),
        (("/a/./b/../c", "config"), "/a/c/config"),
        (("/", "config"), "/config"),
        (("relative/p", "config"), "relative/p/config"),
        (("", "config"), "config"),
        (("/..", "x"), "/x"),
    ],
)  # fmt: skip
def test_go_path_join(elems: tuple[str, ...], want: str) -> None:
    assert go_path_join(*elems) == want


@pytest.mark.parametrize("endpoints", [[], [" "], ["unix:///run/etcd.sock"], ["http://:2379"]])
def test_bad_endpoints_are_config_errors(endpoints: list[str]) -> None:
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        EtcdRegistry(endpoints)


def test_unreadable_cafile_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--etcd-cafile"):
        EtcdRegistry(["https://127.0.0.1:2379"], cafile=str(tmp_path / "missing.pem"))


# ---------------------------------------------------------------------------------------------
# Keys, values, transactions, leases
# ---------------------------------------------------------------------------------------------


def test_config_get_and_prefix_join(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        async with registry(etcd_server) as reg:
            assert await reg.get_config() is None
            etcd_server.etcdctl("put", f"{PREFIX}/config", CONFIG.decode())
            assert await reg.get_config() == CONFIG
        # a trailing slash / doubled slashes in --etcd-prefix are harmless (Go path.Join)
        async with registry(etcd_server, prefix="//coreos.com//network/") as reg:
            assert reg.prefix == PREFIX
            assert await reg.get_config() == CONFIG
        async with registry(etcd_server, prefix="/other") as reg:
            assert await reg.get_config() is None
            await reg.update_subnet("subnets/198.19.9.0-24", UDP_VALUE, None)
        assert "/other/subnets/198.19.9.0-24" in etcd_server.etcdctl("get", "--prefix", "/other")

    run(main())


def test_create_subnet_race_exactly_one_wins(etcd_server: EtcdServer) -> None:
    key = "subnets/198.19.1.0-24"

    async def main() -> None:
        async with registry(etcd_server) as a, registry(etcd_server) as b:
            results = await asyncio.gather(
                a.create_subnet(key, value("198.18.0.1"), 60),
                b.create_subnet(key, value("198.18.0.2"), 60),
            )
            assert sorted(results) == [False, True]
            winner = value("198.18.0.1") if results[0] else value("198.18.0.2")
            kvs, _ = await a.list_subnets()
            assert [(kv.key, kv.value) for kv in kvs] == [(key, winner)]
            # the loser's lease was revoked: only the winner's lease exists
            leases = etcd_server.etcdctl("lease", "list").split()
            assert leases == ["found", "1", "leases", f"{kvs[0].lease_id:016x}"]
            # a later create is refused and does not overwrite
            assert await b.create_subnet(key, value("198.18.0.3"), 60) is False
            assert etcd_server.etcdctl("get", "--print-value-only", f"{PREFIX}/{key}") == (
                winner.decode() + "\n"
            )

    run(main())


def test_lease_ttl_attached_and_renewed(etcd_server: EtcdServer) -> None:
    key = "subnets/198.19.2.0-24"

    async def main() -> None:
        async with registry(etcd_server) as reg:
            assert await reg.create_subnet(key, UDP_VALUE, 30) is True
            [kv], _ = await reg.list_subnets()
            assert kv.key == key and kv.lease_id != 0
            out = etcd_server.etcdctl("lease", "timetolive", f"{kv.lease_id:x}", "--keys")
            assert "granted with TTL(30s)" in out and f"{PREFIX}/{key}" in out, out
            assert 25 <= await reg.lease_ttl(kv.lease_id) <= 30
            assert await reg.lease_ttl(0) == -1

            # renewal (flannel style): a NEW lease each time, the key moves to it
            new_id = await reg.update_subnet(key, UDP_VALUE, 45)
            assert new_id not in (0, kv.lease_id)
            [kv2], _ = await reg.list_subnets()
            assert kv2.lease_id == new_id and kv2.value == UDP_VALUE
            out = etcd_server.etcdctl("lease", "timetolive", f"{new_id:x}", "--keys")
            assert "granted with TTL(45s)" in out and f"{PREFIX}/{key}" in out, out

            # revoking the lease deletes the key; an unknown lease reads as -1
            etcd_server.etcdctl("lease", "revoke", f"{new_id:x}")
            assert await reg.lease_ttl(new_id) == -1
            assert await reg.list_subnets() == ([], (await reg.list_subnets())[1])

    run(main())


def test_update_without_ttl_leaves_no_lease(etcd_server: EtcdServer) -> None:
    key = "subnets/198.19.3.0-24"

    async def main() -> None:
        async with registry(etcd_server) as reg:
            assert await reg.create_subnet(key, UDP_VALUE, 30) is True
            assert await reg.update_subnet(key, UDP_VALUE, None) == 0
            [kv], _ = await reg.list_subnets()
            assert kv.lease_id == 0 and kv.value == UDP_VALUE
            got = json.loads(etcd_server.etcdctl("get", f"{PREFIX}/{key}", "-w", "json"))
            assert got["kvs"][0].get("lease", 0) == 0
            assert await reg.lease_ttl(kv.lease_id) == -1
            await reg.delete_subnet(key)
            assert (await reg.list_subnets())[0] == []
            await reg.delete_subnet(key)  # deleting a missing key is fine

    run(main())


def test_interop_bytes_with_etcdctl(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        etcd_server.etcdctl(
            "put", f"{PREFIX}/subnets/198.19.5.0-24", '{"PublicIP":"198.18.0.5","PublicIPv6":null}'
        )
        async with registry(etcd_server) as reg:
            kvs, rev = await reg.list_subnets()
            assert [(kv.key, kv.value, kv.lease_id) for kv in kvs] == [
                ("subnets/198.19.5.0-24", UDP_VALUE, 0)
            ]
            assert kvs[0].mod_revision <= rev
            # ... and the other way round: our bytes, as etcdctl sees them
            assert await reg.create_subnet("subnets/198.19.6.0-24", value("198.18.0.6"), 60)
            out = etcd_server.etcdctl(
                "get", "--print-value-only", f"{PREFIX}/subnets/198.19.6.0-24"
            )
            assert out == '{"PublicIP":"198.18.0.6","PublicIPv6":null}\n'

    run(main())


# ---------------------------------------------------------------------------------------------
# Watch
# ---------------------------------------------------------------------------------------------


def test_list_then_watch_sees_put_delete_and_expiry(etcd_server: EtcdServer) -> None:
    a, b, c = "subnets/198.19.10.0-24", "subnets/198.19.11.0-24", "subnets/198.19.12.0-24"

    async def main() -> None:
        async with registry(etcd_server) as reg:
            assert await reg.create_subnet(a, value("198.18.0.10"), 60)
            assert await reg.create_subnet(b, value("198.18.0.11"), 60)
            kvs, rev = await reg.list_subnets()
            assert sorted(kv.key for kv in kvs) == [a, b]

            w = reg.watch_subnets(rev + 1)
            await reg.update_subnet(a, value("198.18.0.20"), None)
            await reg.delete_subnet(b)
            etcd_server.etcdctl("put", f"{PREFIX}/config", CONFIG.decode())  # not a subnet
            t0 = time.monotonic()
            assert await reg.create_subnet(c, value("198.18.0.12"), 2)
            events = await pull(w, 3)
            assert kinds(events) == [("PUT", a), ("DELETE", b), ("PUT", c)]
            assert events[0].kv.value == value("198.18.0.20") and events[0].kv.lease_id == 0
            assert events[1].kind is WatchKind.DELETE
            assert events[1].kv.value == b"" and events[1].kv.lease_id == 0
            assert events[2].kv.lease_id != 0
            revs = [e.kv.mod_revision for e in events]
            assert revs == sorted(revs) and revs[0] > rev

            # lease expiry arrives as a plain DELETE (etcd v3 has no expire event)
            expired = await pull(w, 1, timeout=8.0)
            assert kinds(expired) == [("DELETE", c)]
            assert 1.5 <= time.monotonic() - t0 <= 8.0
            await w.aclose()

    run(main())


def test_batch_revision_is_a_safe_resume_point(etcd_server: EtcdServer) -> None:
    keys = [f"subnets/198.19.{i}.0-24" for i in range(20, 25)]

    async def main() -> None:
        async with registry(etcd_server) as reg:
            _, rev = await reg.list_subnets()
            for k in keys:
                await reg.update_subnet(k, UDP_VALUE, None)
            # replay from history, stop after the first batch, resume from its revision + 1
            w = reg.watch_subnets(rev + 1)
            first = await anext(w)
            await w.aclose()
            assert first.events and first.revision >= first.events[-1].kv.mod_revision
            seen = [e.kv.key for e in first.events]
            w = reg.watch_subnets(first.revision + 1)
            if len(seen) < len(keys):
                seen += [e.kv.key for e in await pull(w, len(keys) - len(seen))]
            assert seen == keys
            await w.aclose()

    run(main())


def test_watch_from_compacted_revision_raises(etcd_server: EtcdServer) -> None:
    key = "subnets/198.19.30.0-24"

    async def main() -> None:
        async with registry(etcd_server) as reg:
            _, old = await reg.list_subnets()
            for i in range(3):
                await reg.update_subnet(key, value(f"198.18.1.{i}"), None)
            _, now = await reg.list_subnets()
            etcd_server.etcdctl("compact", str(now))
            with pytest.raises(CompactedError, match="compacted"):
                await pull(reg.watch_subnets(old + 1), 1)
            # the documented recovery: re-list, watch from the listing's revision + 1
            kvs, rev = await reg.list_subnets()
            assert [kv.value for kv in kvs] == [value("198.18.1.2")]
            w = reg.watch_subnets(rev + 1)
            await reg.update_subnet(key, value("198.18.1.9"), None)
            assert kinds(await pull(w, 1)) == [("PUT", key)]
            await w.aclose()

    run(main())


def test_outage_raises_unavailable_then_resume_loses_nothing(etcd_server: EtcdServer) -> None:
    a, b, c = "subnets/198.19.40.0-24", "subnets/198.19.41.0-24", "subnets/198.19.42.0-24"

    async def main() -> None:
        async with registry(etcd_server) as reg:
            _, rev = await reg.list_subnets()
            w = reg.watch_subnets(rev + 1)
            await reg.update_subnet(a, UDP_VALUE, None)
            batch = await anext(w)
            assert kinds(batch.events) == [("PUT", a)]
            resume = batch.revision + 1

            async def drain() -> None:
                async for _ in w:
                    pass

            waiter = asyncio.create_task(drain())
            await asyncio.sleep(0.1)
            etcd_server.kill()
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                await waiter
            assert time.monotonic() - t0 < 3.0, "the watch noticed the dead server too late"
            for call in (
                reg.get_config(),
                reg.list_subnets(),
                reg.lease_ttl(0x1234),
                reg.create_subnet(b, UDP_VALUE, 30),
                reg.update_subnet(b, UDP_VALUE, 30),
                reg.delete_subnet(b),
                pull(reg.watch_subnets(resume), 1),
            ):
                t0 = time.monotonic()
                with pytest.raises(RegistryUnavailable, match=etcd_server.endpoint):
                    await call
                assert time.monotonic() - t0 < 3.0

            etcd_server.restart()
            etcd_server.etcdctl("put", f"{PREFIX}/{b}", UDP_VALUE.decode())  # while we are away
            deadline = time.monotonic() + 10.0
            while True:  # the channel reconnects by itself (backoff capped at 5 s)
                try:
                    await reg.list_subnets()
                    break
                except RegistryUnavailable:
                    assert time.monotonic() < deadline, "no reconnect after the restart"
                    await asyncio.sleep(0.1)
            w = reg.watch_subnets(resume)
            await reg.update_subnet(c, UDP_VALUE, None)
            assert kinds(await pull(w, 2)) == [("PUT", b), ("PUT", c)]
            await w.aclose()

    run(main())


def test_first_call_after_an_outage_dials_at_once(etcd_server: EtcdServer) -> None:
    """A channel that failed to connect sits in gRPC's reconnect backoff and fails every call
    until its timer fires: the registry drops it, so the first call once the server answers
    succeeds (no second round of backoff on top of the caller's)."""

    async def main() -> None:
        async with registry(etcd_server) as reg:
            await reg.get_config()
            etcd_server.kill()
            for _ in range(8):  # several failed dials: gRPC's backoff at its cap
                with pytest.raises(RegistryUnavailable):
                    await reg.get_config()
                await asyncio.sleep(0.15)
            etcd_server.restart()
            t0 = time.monotonic()
            assert await reg.get_config() is None  # the very first call, no retry
            assert time.monotonic() - t0 < 1.0

    run(main())


def test_silent_server_times_out_instead_of_hanging(etcd_server: EtcdServer) -> None:
    """A stopped (SIGSTOP) server keeps its sockets open, so nothing is refused: every call
    must give up after the registry's timeout.  (An open watch notices by keepalive, ~15 s.)"""

    async def main() -> None:
        async with registry(etcd_server, timeout=1.0) as reg:
            assert await reg.get_config() is None
            etcd_server.pause()
            try:
                for call in (
                    reg.get_config(),
                    reg.create_subnet("subnets/198.19.45.0-24", UDP_VALUE, 30),
                    pull(reg.watch_subnets(1), 1),
                ):
                    t0 = time.monotonic()
                    with pytest.raises(RegistryUnavailable, match="no answer within 1s"):
                        await call
                    assert time.monotonic() - t0 < 2.5
            finally:
                etcd_server.resume()
            assert await reg.get_config() is None

    run(main())


def test_close_ends_watches_and_calls(etcd_server: EtcdServer) -> None:
    async def main() -> None:
        reg = registry(etcd_server)
        _, rev = await reg.list_subnets()
        w = reg.watch_subnets(rev + 1)

        async def drain() -> None:
            async for _ in w:
                pass

        waiter = asyncio.create_task(drain())
        await asyncio.sleep(0.2)
        etcd_server.pause()  # so that the next call is still in flight when we close
        try:
            pending = asyncio.create_task(reg.get_config())
            await asyncio.sleep(0.2)
            await reg.close()
            for task in (waiter, pending):
                with pytest.raises(RegistryUnavailable, match="closed"):
                    await task
        finally:
            etcd_server.resume()
        with pytest.raises(RegistryUnavailable, match="closed"):
            await reg.get_config()

    run(main())


# ---------------------------------------------------------------------------------------------
# Endpoints: failover, TLS, auth
# ---------------------------------------------------------------------------------------------


def test_first_endpoint_dead_fails_over(etcd_factory: Any) -> None:
    live, other = etcd_factory(), etcd_factory()
    dead = f"http://127.0.0.1:{free_port()}"
    live.etcdctl("put", f"{PREFIX}/config", CONFIG.decode())

    async def main() -> None:
        async with EtcdRegistry([dead, live.endpoint], timeout=2.0) as reg:
            t0 = time.monotonic()
            assert await reg.get_config() == CONFIG
            assert await reg.create_subnet("subnets/198.19.50.0-24", UDP_VALUE, 30)
            kvs, rev = await reg.list_subnets()
            assert len(kvs) == 1
            w = reg.watch_subnets(rev + 1)
            await reg.delete_subnet("subnets/198.19.50.0-24")
            assert kinds(await pull(w, 1)) == [("DELETE", "subnets/198.19.50.0-24")]
            await w.aclose()
            assert time.monotonic() - t0 < 5.0

        # at run time: the endpoint in use dies, the next one answers (here: another server)
        async with EtcdRegistry([live.endpoint, other.endpoint], timeout=2.0) as reg:
            assert await reg.get_config() == CONFIG
            live.kill()
            assert await reg.get_config() is None  # `other` has no config
            assert await reg.get_config() is None  # and it sticks to it

        async with EtcdRegistry([dead, live.endpoint], timeout=2.0) as reg:
            t0 = time.monotonic()
            with pytest.raises(RegistryUnavailable) as err:
                await reg.get_config()
            assert dead in str(err.value) and live.endpoint in str(err.value)
            assert time.monotonic() - t0 < 3.0

    run(main())


def test_tls_client_certificates(etcd_factory: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = etcd_factory(pki=pki, client_cert_auth=True)
    assert server.endpoint.startswith("https://127.0.0.1:")
    server.etcdctl("put", f"{PREFIX}/config", CONFIG.decode())
    good = {"cafile": str(pki.ca), "certfile": str(pki.client_cert), "keyfile": str(pki.client_key)}

    async def main() -> None:
        async with registry(server, **good) as reg:
            assert await reg.get_config() == CONFIG
            assert await reg.create_subnet("subnets/198.19.60.0-24", UDP_VALUE, 30)
            kvs, rev = await reg.list_subnets()
            assert [kv.value for kv in kvs] == [UDP_VALUE]
            w = reg.watch_subnets(rev + 1)
            server.etcdctl("put", f"{PREFIX}/subnets/198.19.61.0-24", UDP_VALUE.decode())
            assert kinds(await pull(w, 1)) == [("PUT", "subnets/198.19.61.0-24")]
            await w.aclose()

        plain_http = f"http://127.0.0.1:{server.client_port}"
        failing: list[tuple[list[str], dict[str, str]]] = [
            ([server.endpoint], {"cafile": str(pki.ca)}),  # no client certificate
            ([server.endpoint], {**good, "cafile": str(pki.other_ca)}),  # untrusted server
            ([plain_http], {}),  # plaintext to a TLS port
            ([plain_http], good),  # http:// means plaintext even with certificates (clientv3)
        ]
        for endpoints, kw in failing:
            async with EtcdRegistry(endpoints, timeout=2.0, **kw) as reg:
                t0 = time.monotonic()
                with pytest.raises(RegistryUnavailable):
                    await reg.get_config()
                with pytest.raises(RegistryUnavailable):
                    await pull(reg.watch_subnets(1), 1)
                assert time.monotonic() - t0 < 6.0, (endpoints, kw)

    run(main())


def test_username_password_and_token_refresh(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="udpbackend.control.etcd")
    etcd_server.etcdctl("user", "add", "root:s3cret", "--interactive=false")
    etcd_server.etcdctl("auth", "enable")
    etcd_server.user = "root:s3cret"  # for etcdctl (and the readiness check after restart)
    etcd_server.etcdctl("put", f"{PREFIX}/config", CONFIG.decode())

    async def main() -> None:
        async with registry(etcd_server, username="root", password="s3cret") as reg:
            assert await reg.get_config() == CONFIG
            _, rev = await reg.list_subnets()
            w = reg.watch_subnets(rev + 1)
            await reg.update_subnet("subnets/198.19.70.0-24", UDP_VALUE, 30)
            assert kinds(await pull(w, 1)) == [("PUT", "subnets/198.19.70.0-24")]
            await w.aclose()
            # simple tokens live in the server's memory: after a restart ours is invalid,
            # and the registry logs in again by itself
            etcd_server.restart()
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    assert await reg.get_config() == CONFIG
                    break
                except RegistryUnavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            assert "auth token rejected, logging in again" in caplog.text

        for kw in ({"username": "root", "password": "wrong"}, {}):
            async with registry(etcd_server, **kw) as reg:
                with pytest.raises(ConfigError, match=r"authentication failed|user name is empty"):
                    await reg.get_config()

    run(main())
