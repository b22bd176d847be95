"""The kube subnet manager: Node <-> lease logic (control/annotations.py, pure, with
hypothesis) and KubeManager (control/kube.py) through lightkube against the API-server
stand-in over real HTTP on 127.0.0.1: annotations byte-identical to flannel's, podCIDR rules,
list + watch with resume, 410 re-list, outages, RBAC, retries, NetworkUnavailable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Coroutine
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from kube_apiserver import KubeApiServer

from udpbackend.control.annotations import (
    annotations_for,
    network_available_patch,
    node_to_lease,
    own_annotations_patch,
    pod_cidr,
)
from udpbackend.control.kube import KubeManager, kube_config, kube_manager_from_env
from udpbackend.control.lease import LeaseEvent, LeaseEventKind
from udpbackend.control.network import NetworkConfig, parse_network_config
from udpbackend.control.registry import RegistryUnavailable
from udpbackend.errors import ConfigError, StartupError

T = TypeVar("T")
P = "flannel.alpha.coreos.com/"
ANN = annotations_for()
NET = NetworkConfig(IPv4Network("198.18.0.0/15"), 24, IPv4Address(0), IPv4Address(0))
ME = IPv4Address("198.19.250.1")
# What a flannel v0.28 UDP node writes onto its Node (udp_amd64.go: no BackendType/Data).
FLANNEL_UDP = {
    P + "backend-data": "null",
    P + "backend-type": "",
    P + "kube-subnet-manager": "true",
    P + "public-ip": "198.19.250.7",
}


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
def api() -> Any:
    with KubeApiServer() as server:
        yield server
        assert server.errors == []


def manager(api: KubeApiServer, tmp_path: Path, **kw: Any) -> KubeManager:
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "198.18.0.0/15", "Backend": {"Type": "udp"}}')
    kw.setdefault("node_name", "me")
    kw.setdefault("sleep", no_sleep)
    return KubeManager(kube_config("", str(api.write_kubeconfig())), net_conf_path=str(conf), **kw)


# --- pure: annotations and Nodes ----------------------------------------------------------


def test_annotation_names_follow_flannels_prefix_rules() -> None:
    assert ANN.kube_managed == P + "kube-subnet-manager"
    assert ANN.public_ip_overwrite == P + "public-ip-overwrite"
    assert annotations_for("example.com/net").public_ip == "example.com/net-public-ip"
    assert annotations_for("example.com/").backend_type == "example.com/backend-type"
    for bad, why in (("a/b/c", "at most single slash"), ("Not_Fqdn", "fqdn/")):
        with pytest.raises(ConfigError, match=why):
            annotations_for(bad)


def test_own_patch_is_flannels_annotations_and_only_when_something_differs() -> None:
    node: dict[str, Any] = {"metadata": {"name": "me"}, "spec": {"podCIDR": "198.18.5.0/24"}}
    patch, ip = own_annotations_patch(node, ANN, IPv4Address("198.19.250.7"))
    assert patch == {"metadata": {"annotations": FLANNEL_UDP}} and ip == IPv4Address("198.19.250.7")
    node["metadata"]["annotations"] = dict(FLANNEL_UDP)
    assert own_annotations_patch(node, ANN, IPv4Address("198.19.250.7")) == (None, ip)
    moved, _ = own_annotations_patch(node, ANN, IPv4Address("198.19.250.8"))
    assert moved == {"metadata": {"annotations": {P + "public-ip": "198.19.250.8"}}}
    node["metadata"]["annotations"][P + "public-ip-overwrite"] = "198.19.9.9"
    over, ip = own_annotations_patch(node, ANN, IPv4Address("198.19.250.7"))
    assert ip == IPv4Address("198.19.9.9")
    assert over == {"metadata": {"annotations": {P + "public-ip": "198.19.9.9"}}}


def test_flannel_written_node_is_a_lease_and_unmanaged_ones_are_skipped() -> None:
    node = {
        "metadata": {"name": "f1", "annotations": FLANNEL_UDP},
        "spec": {"podCIDR": "198.18.7.0/24", "podCIDRs": ["fd00::/64", "198.18.7.0/24"]},
    }
    lease, why = node_to_lease(node, ANN)
    assert why == "" and lease is not None
    assert lease.subnet == IPv4Network("198.18.7.0/24")
    assert lease.attrs.public_ip == IPv4Address("198.19.250.7") and lease.expiration is None
    plain = {"metadata": {"name": "k"}, "spec": {"podCIDR": "198.18.8.0/24"}}
    assert node_to_lease(plain, ANN) == (
        None,
        "node k: not managed by a flannel kube subnet manager",
    )
    no_cidr = {"metadata": {"name": "n", "annotations": FLANNEL_UDP}, "spec": {}}
    assert node_to_lease(no_cidr, ANN) == (None, "node n: no IPv4 podCIDR")
    with pytest.raises(ConfigError, match="dualstack"):
        pod_cidr({"metadata": {"name": "x"}, "spec": {"podCIDRs": ["198.18.0.0/24"] * 3}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=8,
)
cidr_texts = st.sampled_from(
    ["198.18.3.0/24", "198.18.3.7/24", "fd00::/64", "300.1.2.3/24", "", "x", "198.18.0.0/15"]
)
node_objects = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": st.text(max_size=5) | json_values,
                "annotations": st.dictionaries(
                    st.sampled_from([*FLANNEL_UDP, P + "public-ip-overwrite"]),
                    st.sampled_from(["true", "", "null", "198.19.0.1", "::1", "x"]) | json_values,
                )
                | json_values,
            },
        ),
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "podCIDR": cidr_texts | json_values,
                "podCIDRs": st.lists(cidr_texts | json_values, max_size=4) | json_values,
            },
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(node_objects)
def test_any_node_object_is_a_lease_or_skipped_with_a_reason(node: dict[str, Any]) -> None:
    lease, why = node_to_lease(node, ANN)
    if lease is None:
        assert why
    else:
        assert why == "" and lease.subnet.version == 4 and lease.key.startswith("nodes/")


def test_kube_net_conf_needs_only_network_and_names_the_bad_key() -> None:
    cfg = parse_network_config(
        '{"Network": "198.18.0.0/15", "Backend": {"Type": "udp"}}', kube=True
    )
    assert cfg.network == IPv4Network("198.18.0.0/15")
    small = '{"Network": "198.18.0.0/29", "Backend": {"Type": "udp"}}'
    assert parse_network_config(small, kube=True).network.prefixlen == 29  # etcd mode refuses it
    with pytest.raises(ConfigError, match="too small"):
        parse_network_config(small)
    with pytest.raises(ConfigError, match="Network parameter"):
        parse_network_config('{"Backend": {"Type": "udp"}}', kube=True)
    with pytest.raises(ConfigError, match="SubnetLen"):
        parse_network_config('{"Network": "198.18.0.0/15", "SubnetLen": "24"}', kube=True)


def test_network_available_condition_is_flannels() -> None:
    patch = network_available_patch(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC))
    (cond,) = patch["status"]["conditions"]
    assert cond["type"] == "NetworkUnavailable" and cond["status"] == "False"
    assert cond["reason"] == "FlannelIsUp" and cond["message"] == "Flannel is running on this node"
    assert cond["lastTransitionTime"] == "2026-12-01T12:00:00Z"


# --- KubeManager over real HTTP -------------------------------------------------------------


def test_acquire_writes_flannels_annotations_once_and_returns_the_podcidr(
    api: KubeApiServer, tmp_path: Path
) -> None:
    api.create_node("me", pod_cidr="198.18.5.0/24")
    m = manager(api, tmp_path)

    async def main() -> None:
        try:
            cfg = await m.get_network_config()
            lease = await m.acquire_lease(cfg, ME, None)
            assert lease.subnet == IPv4Network("198.18.5.0/24")
            again = await m.acquire_lease(cfg, ME, None)
            assert again == lease
        finally:
            await m.close()

    run(main())
    patches = api.requests("PATCH", "/api/v1/nodes/me/status")
    assert len(patches) == 1  # the second acquire found nothing to change
    assert patches[0].content_type == "application/strategic-merge-patch+json"
    ann = api.get_node("me")["metadata"]["annotations"]
    assert {k: v for k, v in ann.items() if k.startswith(P)} == {
        **FLANNEL_UDP,
        P + "public-ip": str(ME),
    }


def test_podcidr_not_assigned_then_outside_network(api: KubeApiServer, tmp_path: Path) -> None:
    api.create_node("me")
    m = manager(api, tmp_path)

    async def main() -> None:
        try:
            with pytest.raises(ConfigError, match='node "me" pod cidr not assigned'):
                await m.acquire_lease(NET, ME, None)
            api.patch_node("me", {"spec": {"podCIDR": "10.244.0.0/24"}})
            with pytest.raises(StartupError, match="doesn't contain"):
                await m.acquire_lease(NET, ME, None)
        finally:
            await m.close()

    run(main())


def test_node_name_from_the_pod_or_a_clear_error(api: KubeApiServer, tmp_path: Path) -> None:
    api.create_node("worker-3", pod_cidr="198.18.3.0/24")
    api.create_pod("flannel-x", "kube-flannel", node_name="worker-3")
    m = manager(api, tmp_path, node_name="", pod_name="flannel-x", pod_namespace="kube-flannel")

    async def main() -> None:
        try:
            lease = await m.acquire_lease(NET, ME, None)
            assert lease.key == "nodes/worker-3"
        finally:
            await m.close()

    run(main())
    with pytest.raises(StartupError, match="POD_NAME and POD_NAMESPACE must be set"):
        kube_manager_from_env(
            "", str(api.write_kubeconfig()), "", "flannel.alpha.coreos.com", True, {}
        )


def test_rbac_refusal_names_verb_and_resource(api: KubeApiServer, tmp_path: Path) -> None:
    api.create_node("me", pod_cidr="198.18.5.0/24")
    api.deny("patch", "nodes/status")
    m = manager(api, tmp_path)

    async def main() -> None:
        try:
            with pytest.raises(ConfigError) as e:
                await m.acquire_lease(NET, ME, None)
        finally:
            await m.close()
        assert "HTTP 403" in str(e.value) and "patch" in str(e.value)
        assert "nodes/status" in str(e.value) and "\n" not in str(e.value)

    run(main())


def test_patch_conflicts_and_server_errors_are_retried(api: KubeApiServer, tmp_path: Path) -> None:
    api.create_node("me", pod_cidr="198.18.5.0/24")
    api.fail_next(409, method="PATCH")
    api.fail_next(503, method="PATCH")
    api.fail_next(429, method="PATCH", retry_after=0)
    m = manager(api, tmp_path)

    async def main() -> None:
        try:
            await m.acquire_lease(NET, ME, None)
        finally:
            await m.close()

    run(main())
    assert [r.status for r in api.requests("PATCH")] == [409, 503, 429, 200]


def test_api_unreachable_is_registry_unavailable(tmp_path: Path) -> None:
    with KubeApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "198.18.0.0/15", "Backend": {"Type": "udp"}}')
    m = KubeManager(kube_config("", str(kubeconfig)), net_conf_path=str(conf), node_name="me")

    async def main() -> None:
        try:
            with pytest.raises(RegistryUnavailable, match="kube API unavailable"):
                await m.stored_public_ip()
        finally:
            await m.close()

    run(main())


def test_complete_lease_sets_network_available_unless_disabled(
    api: KubeApiServer, tmp_path: Path
) -> None:
    api.create_node("me", pod_cidr="198.18.5.0/24")
    on, off = manager(api, tmp_path), manager(api, tmp_path, set_node_network_unavailable=False)

    async def main() -> None:
        try:
            lease = await on.acquire_lease(NET, ME, None)
            await off.complete_lease(lease)
            assert not api.requests("PATCH", "*", watch=None)[1:]  # only the annotations
            await on.complete_lease(lease)
        finally:
            await on.close()
            await off.close()

    run(main())
    conds = {c["type"]: c for c in api.get_node("me")["status"]["conditions"]}
    assert conds["NetworkUnavailable"]["status"] == "False"
    assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"
    assert conds["Ready"]["status"] == "True"  # the strategic merge kept the kubelet's


def _peer(api: KubeApiServer, name: str, cidr: str, ip: str) -> None:
    api.create_node(name, pod_cidr=cidr, annotations={**FLANNEL_UDP, P + "public-ip": ip})


def test_watch_snapshot_changes_resume_410_and_outage(api: KubeApiServer, tmp_path: Path) -> None:
    api.create_node("me", pod_cidr="198.18.5.0/24", annotations=FLANNEL_UDP)
    _peer(api, "a", "198.18.6.0/24", "198.19.0.6")
    api.create_node("plain", pod_cidr="198.18.9.0/24")  # no flannel on it: not a peer
    m = manager(api, tmp_path)
    states: list[bool] = []
    m.on_state = states.append

    def summary(batch: list[LeaseEvent]) -> list[tuple[str, str, str]]:
        return [
            (
                "+" if e.kind is LeaseEventKind.ADDED else "-",
                str(e.lease.subnet),
                str(e.lease.attrs.public_ip),
            )
            for e in batch
        ]

    async def main() -> None:
        gen = m.watch_leases(IPv4Network("198.18.5.0/24")).__aiter__()

        async def nxt() -> list[tuple[str, str, str]]:
            return summary(await asyncio.wait_for(gen.__anext__(), 10))

        try:
            assert await nxt() == [("+", "198.18.6.0/24", "198.19.0.6")]
            pending = asyncio.create_task(nxt())  # the generator watches only when asked
            await asyncio.to_thread(api.wait_for_watches, 1)
            _peer(api, "b", "198.18.7.0/24", "198.19.0.7")
            assert await pending == [("+", "198.18.7.0/24", "198.19.0.7")]
            # a heartbeat changes nothing a route depends on: no event; a public-ip change does
            api.patch_node("a", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            api.patch_node("a", {"metadata": {"annotations": {P + "public-ip": "198.19.1.6"}}})
            assert await nxt() == [("+", "198.18.6.0/24", "198.19.1.6")]
            # the server ends the stream: resumed from the last version, nothing replayed
            api.close_watches()
            api.delete_node("b")
            assert await nxt() == [("-", "198.18.7.0/24", "198.19.0.7")]
            # compaction while disconnected: 410, re-list, only the difference
            api.stop()
            _peer(api, "c", "198.18.8.0/24", "198.19.0.8")
            api.delete_node("a")
            api.compact()
            api.start()
            got = await nxt()
            assert sorted(got) == [
                ("+", "198.18.8.0/24", "198.19.0.8"),
                ("-", "198.18.6.0/24", "198.19.1.6"),
            ]
        finally:
            await gen.aclose()
            await m.close()

    run(main())
    assert states == [False, True]
    assert api.requests("GET", "/api/v1/nodes", watch=False)  # LISTed twice: start and after 410
    assert len([r for r in api.requests("GET", "/api/v1/nodes", watch=False)]) == 2
