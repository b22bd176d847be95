"""The kube-apiserver stand-in (tests/kube_apiserver.py) driven through lightkube's AsyncClient
over real HTTP on 127.0.0.1 (one test: 198.18.0.0/15 inside a netns it creates, root only).
Every coroutine runs under uvloop with a deadline.  Must not: import the product.

What lightkube 1.0.1 (on httpx2) does, as these tests pin it down — for the product code:
- HTTP error with a JSON Status body from get/list/patch/replace/create/delete: raises
  `lightkube.ApiError` (a `httpx2.HTTPStatusError`); `e.status.code` / `.reason` / `.message` /
  `.details.retryAfterSeconds`, `e.response.headers["Retry-After"]`.  401 Unauthorized, 403
  Forbidden, 404 NotFound, 409 Conflict, 410 Expired (LIST continue too old), 415, 429, 5xx.
- A watch that the server refuses with an HTTP status (401, 403, 429, 5xx) raises a plain
  `httpx2.HTTPStatusError`, NOT ApiError (watch() calls resp.raise_for_status() directly).
- 410 on a watch arrives as HTTP 200 + an `ERROR` event whose object is a Status (code 410,
  reason Expired): lightkube raises `ApiError` (status.code 410) from the iterator.  With
  `on_error=on_error_retry` it instead re-watches WITHOUT resourceVersion, i.e. it gets a
  synthetic ADDED for every current object (a relist in disguise; no DELETED for vanished ones).
- When the server ends a watch stream cleanly (timeoutSeconds, close_watches()), lightkube
  reconnects by itself at once, with resourceVersion = the last event (or BOOKMARK) it yielded,
  forever; the caller sees no break.  An abrupt cut mid-stream raises `httpx2.RemoteProtocolError`
  (handled by on_error: with on_error_retry it reconnects from the last version).
- Connection refused raises `httpx2.ConnectError` (a `httpx2.TransportError`), also from a watch
  iterator's reconnect whatever on_error says: the connect is outside lightkube's error handler.
- lightkube's public watch() cannot ask for bookmarks (no allowWatchBookmarks parameter).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import uvloop
from kube_apiserver import DEFAULT_USER, KubeApiServer, strategic_merge
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node, NodeStatus, Pod
from lightkube.types import OnErrorResult, PatchType, on_error_retry

T = TypeVar("T")
Event = tuple[str, Any]
PREFIX = "flannel.alpha.coreos.com"
NET_UP = {
    "type": "NetworkUnavailable",
    "status": "False",
    "reason": "FlannelIsUp",
    "message": "Flannel is running on this node",
    "lastTransitionTime": "2025-01-01T00:00:00Z",
    "lastHeartbeatTime": "2025-01-01T00:00:00Z",
}


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run on a fresh uvloop loop; a hang fails the test instead of the whole run."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.2) as server:
        yield server
        assert server.errors == []


def client(api: KubeApiServer, **kw: Any) -> AsyncClient:
    """How the product points lightkube at the stand-in: a kubeconfig built from its URL/token."""
    config = KubeConfig.from_dict(api.kubeconfig_dict(**kw))
    return AsyncClient(config, trust_env=False, timeout=httpx2.Timeout(5.0))


class Watcher:
    """Drains a lightkube watch in a task; events (or the exception that ended it) queue up."""

    def __init__(self, stream: AsyncIterable[Event]) -> None:
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._drain(stream))

    async def _drain(self, stream: AsyncIterable[Event]) -> None:
        try:
            async for item in stream:
                await self.queue.put(item)
        except Exception as e:
            await self.queue.put(e)
        else:
            await self.queue.put(StopAsyncIteration())

    async def next(self, timeout: float = 5.0) -> tuple[str, str, str]:
        """(type, name, resourceVersion) of the next event."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise AssertionError(f"watch ended with {item!r}")
        etype, obj = item
        return etype, obj.metadata.name, obj.metadata.resourceVersion

    async def error(self, timeout: float = 5.0) -> BaseException:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        assert isinstance(item, BaseException), f"expected the watch to fail, got {item!r}"
        return item

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def watches_open(api: KubeApiServer, count: int = 1) -> None:
    await asyncio.to_thread(api.wait_for_watches, count)


async def names(c: AsyncClient, **kw: Any) -> list[str]:
    return [n.metadata.name async for n in c.list(Node, **kw) if n.metadata and n.metadata.name]


# ---------------------------------------------------------------------------------------------
# list / get


def test_list_and_get_nodes_and_pod(api: KubeApiServer) -> None:
    api.create_node("n1", pod_cidr="10.244.1.0/24", internal_ip="198.18.0.1")
    api.create_node("n2", pod_cidrs=["10.244.2.0/24", "fd00:2::/64"])
    api.create_pod("kube-flannel-ds-abc", "kube-flannel", node_name="n2")

    async def main() -> None:
        c = client(api)
        listing = c.list(Node)
        nodes = [n async for n in listing]
        assert listing.resourceVersion == str(api.resource_version)
        assert [n.metadata.name for n in nodes if n.metadata] == ["n1", "n2"]
        n1 = await c.get(Node, "n1")
        stored = api.get_node("n1")
        assert stored is not None
        assert n1.apiVersion == "v1" and n1.kind == "Node"
        assert n1.metadata and n1.metadata.uid == stored["metadata"]["uid"]
        assert n1.metadata.resourceVersion == stored["metadata"]["resourceVersion"]
        assert n1.metadata.creationTimestamp is not None
        assert n1.metadata.labels and n1.metadata.labels["kubernetes.io/hostname"] == "n1"
        assert n1.spec and n1.spec.podCIDR == "10.244.1.0/24"
        assert n1.status and n1.status.addresses
        assert [(a.type, a.address) for a in n1.status.addresses] == [
            ("InternalIP", "198.18.0.1"),
            ("Hostname", "n1"),
        ]
        assert n1.status.conditions and "Ready" in {c.type for c in n1.status.conditions}
        n2 = await c.get(Node, "n2")
        assert n2.spec and (n2.spec.podCIDR, n2.spec.podCIDRs) == (
            "10.244.2.0/24",
            ["10.244.2.0/24", "fd00:2::/64"],
        )
        pod = await c.get(Pod, "kube-flannel-ds-abc", namespace="kube-flannel")
        assert pod.spec and pod.spec.nodeName == "n2"
        with pytest.raises(ApiError) as missing:
            await c.get(Node, "nope")
        assert (missing.value.status.code, missing.value.status.reason) == (404, "NotFound")
        assert missing.value.status.message == 'nodes "nope" not found'
        with pytest.raises(ApiError) as no_pod:
            await c.get(Pod, "kube-flannel-ds-abc", namespace="default")
        assert no_pod.value.status.code == 404
        await c.close()

    run(main())
    raw = json.loads(httpx2.get(f"{api.url}/api/v1/nodes", headers=auth(api)).content)
    assert raw["kind"] == "NodeList" and raw["metadata"]["resourceVersion"].isdigit()
    assert {"name", "uid", "resourceVersion", "creationTimestamp", "labels", "annotations"} <= set(
        raw["items"][0]["metadata"]
    )


def auth(api: KubeApiServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.token}"}


def test_list_pages_and_expired_continue(api: KubeApiServer) -> None:
    for i in range(5):
        api.create_node(f"n{i}")

    async def main() -> None:
        c = client(api)
        assert await names(c, chunk_size=2) == [f"n{i}" for i in range(5)]
        pages = api.requests("GET", "/api/v1/nodes")
        assert [r.query.get("limit") for r in pages] == ["2", "2", "2"]
        assert "continue" not in pages[0].query and all("continue" in r.query for r in pages[1:])

        it = aiter(c.list(Node, chunk_size=2))
        first = await anext(it)
        assert first.metadata and first.metadata.name == "n0"
        api.patch_node("n4", {"metadata": {"labels": {"x": "y"}}})
        api.compact()
        await anext(it)  # still the first page
        with pytest.raises(ApiError) as gone:
            await anext(it)
        assert (gone.value.status.code, gone.value.status.reason) == (410, "Expired")
        await c.close()

    run(main())


def test_list_exact_resource_version_and_compaction(api: KubeApiServer) -> None:
    api.create_node("n1")
    old = api.resource_version
    api.create_node("n2")
    url = f"{api.url}/api/v1/nodes"
    params = {"resourceVersion": str(old), "resourceVersionMatch": "Exact"}
    exact = httpx2.get(url, headers=auth(api), params=params)
    assert exact.status_code == 200
    assert [i["metadata"]["name"] for i in exact.json()["items"]] == ["n1"]
    assert exact.json()["metadata"]["resourceVersion"] == str(old)
    # NotOlderThan (no resourceVersionMatch): the current state, never 410 — as the real API
    assert (
        len(httpx2.get(url, headers=auth(api), params={"resourceVersion": old}).json()["items"])
        == 2
    )
    api.compact()
    gone = httpx2.get(url, headers=auth(api), params=params)
    assert gone.status_code == 410
    assert gone.headers["Content-Type"] == "application/json"
    assert gone.json()["kind"] == "Status" and gone.json()["reason"] == "Expired"


def test_label_and_field_selectors(api: KubeApiServer) -> None:
    api.create_node("a", labels={"role": "edge", "zone": "z1"})
    api.create_node("b", labels={"role": "core"})
    api.create_node("c", labels={})

    async def main() -> None:
        c = client(api)
        assert await names(c, labels={"role": "edge"}) == ["a"]
        assert await names(c, fields={"metadata.name": "b"}) == ["b"]
        raw = await asyncio.to_thread(
            httpx2.get,
            f"{api.url}/api/v1/nodes",
            headers=auth(api),
            params={"labelSelector": "role in (edge,core),!zone"},
        )
        assert [i["metadata"]["name"] for i in raw.json()["items"]] == ["b"]
        w = Watcher(c.watch(Node, labels={"role": "edge"}))
        assert (await w.next())[:2] == ("ADDED", "a")
        api.patch_node("b", {"metadata": {"labels": {"role": "edge"}}})  # moves in: ADDED
        assert (await w.next())[:2] == ("ADDED", "b")
        api.patch_node("a", {"metadata": {"labels": {"role": "core"}}})  # moves out: DELETED
        assert (await w.next())[:2] == ("DELETED", "a")
        api.patch_node("c", {"metadata": {"labels": {"other": "1"}}})  # never in: nothing
        api.patch_node("b", {"metadata": {"annotations": {"k": "v"}}})
        assert (await w.next())[:2] == ("MODIFIED", "b")
        await w.stop()
        await c.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# watch


def test_watch_resumes_from_resource_version(api: KubeApiServer) -> None:
    api.create_node("n1")

    async def main() -> None:
        c = client(api)
        listing = c.list(Node)
        assert [n async for n in listing]
        rv0 = listing.resourceVersion
        await c.create(Node(metadata=ObjectMeta(name="n2", labels={"a": "b"})))
        await c.patch(NodeStatus, "n1", {"metadata": {"annotations": {f"{PREFIX}/x": "1"}}})
        await c.delete(Node, "n2")
        w = Watcher(c.watch(Node, resource_version=rv0))
        events = [await w.next() for _ in range(3)]
        await w.stop()
        assert [e[:2] for e in events] == [("ADDED", "n2"), ("MODIFIED", "n1"), ("DELETED", "n2")]
        rvs = [int(e[2]) for e in events]
        assert rvs == sorted(rvs) and rvs[0] > int(rv0) and rvs[-1] == api.resource_version

        w = Watcher(c.watch(Node, resource_version=str(rvs[0])))  # resume after the first
        assert (await w.next())[:2] == ("MODIFIED", "n1")
        assert (await w.next())[:2] == ("DELETED", "n2")
        api.create_node("n3")
        assert (await w.next())[:2] == ("ADDED", "n3")
        await w.stop()
        await c.close()

    run(main())


def test_watch_without_version_starts_with_added_for_every_node(api: KubeApiServer) -> None:
    api.create_node("n1")
    api.create_node("n2")
    api.delete_node("n2")
    api.create_node("n3")

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node))
        assert [(await w.next())[:2] for _ in range(2)] == [("ADDED", "n1"), ("ADDED", "n3")]
        api.patch_node("n1", {"spec": {"podCIDR": "10.244.9.0/24"}})
        assert await w.next() == ("MODIFIED", "n1", str(api.resource_version))
        await w.stop()
        await c.close()

    run(main())


def test_watch_ends_at_timeout_and_lightkube_resumes_from_last_version(
    api: KubeApiServer,
) -> None:
    api.create_node("n1")
    rv0 = str(api.resource_version)

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node, resource_version=rv0, server_timeout=1))
        await watches_open(api)
        api.create_node("n2")
        etype, name, rv = await w.next()
        assert (etype, name) == ("ADDED", "n2")
        second = (await asyncio.to_thread(api.wait_for_requests, watch=True, count=2))[1]
        first = api.requests(watch=True)[0]
        assert first.query["resourceVersion"] == rv0 and first.query["timeoutSeconds"] == "1"
        assert second.query["resourceVersion"] == rv  # resumed from the last event it yielded
        assert 0.9 <= second.time - first.time < 3
        api.create_node("n3")
        assert (await w.next())[:2] == ("ADDED", "n3")
        await w.stop()
        await c.close()

    run(main())
    assert all(r.status == 200 for r in api.requests(watch=True))


def test_close_watches_clean_then_abrupt(api: KubeApiServer) -> None:
    api.create_node("n1")

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node))
        assert (await w.next())[:2] == ("ADDED", "n1")
        await watches_open(api)
        assert api.close_watches() == 1  # clean end of stream: lightkube silently reconnects
        reconnect = (await asyncio.to_thread(api.wait_for_requests, watch=True, count=2))[1]
        assert reconnect.query["resourceVersion"] == str(api.resource_version)
        await watches_open(api)
        api.patch_node("n1", {"metadata": {"annotations": {"a": "1"}}})
        assert (await w.next())[:2] == ("MODIFIED", "n1")

        api.close_watches(abrupt=True)  # a cut connection: raised with the default on_error
        err = await w.error()
        assert isinstance(err, httpx2.RemoteProtocolError), repr(err)
        await w.stop()
        await watches_open(api, 0)

        retried: list[Exception] = []

        def retry(e: Exception, count: int) -> OnErrorResult:
            retried.append(e)
            return on_error_retry(e, count)

        w = Watcher(c.watch(Node, resource_version=str(api.resource_version), on_error=retry))
        await watches_open(api)
        api.close_watches(abrupt=True)
        api.patch_node("n1", {"metadata": {"annotations": {"a": "2"}}})
        assert (await w.next())[:2] == ("MODIFIED", "n1")
        assert len(retried) == 1 and isinstance(retried[0], httpx2.RemoteProtocolError)
        await w.stop()
        await c.close()

    run(main())


def test_watch_from_compacted_version_gets_410_expired(api: KubeApiServer) -> None:
    api.create_node("n1")
    old = str(api.resource_version)
    api.create_node("n2")
    api.delete_node("n1")
    api.compact()

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node, resource_version=old))
        err = await w.error()
        assert isinstance(err, ApiError), repr(err)
        assert (err.status.code, err.status.reason) == (410, "Expired")
        assert err.status.message == f"too old resource version: {old} ({api.compacted_rv})"
        await w.stop()

        w = Watcher(c.watch(Node, resource_version=old, on_error=on_error_retry))
        assert (await w.next())[:2] == ("ADDED", "n2")  # re-watch from scratch: current state
        await w.stop()
        first, second = api.requests(watch=True)[1:3]
        assert first.query["resourceVersion"] == old and "resourceVersion" not in second.query
        await c.close()

    run(main())
    assert api.requests(watch=True)[0].status == 200  # 410 travels as an ERROR event


def test_bookmarks_only_when_asked(api: KubeApiServer) -> None:
    api.create_node("n1")
    rv = api.resource_version

    def stream(params: dict[str, Any], lines: int) -> list[dict[str, Any]]:
        out = []
        with httpx2.stream(
            "GET", f"{api.url}/api/v1/nodes", params=params, headers=auth(api), timeout=5
        ) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            for line in resp.iter_lines():
                out.append(json.loads(line))
                if len(out) == lines:
                    break
        return out

    events = stream({"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"}, 2)
    assert events[0] == {
        "type": "BOOKMARK",
        "object": {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}},
    }
    assert events[1]["type"] == "BOOKMARK"

    def later() -> None:
        time.sleep(0.5)
        api.send_bookmarks()
        api.create_node("n2")

    t = threading.Thread(target=later)
    t.start()
    events = stream({"watch": "true", "resourceVersion": rv, "timeoutSeconds": "3"}, 1)
    t.join()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "n2")]

    async def via_lightkube() -> None:
        # lightkube's public watch() has no allowWatchBookmarks; through its internals a BOOKMARK
        # decodes as a Node with only metadata.resourceVersion, and it resumes from there.
        c = client(api)
        br = c._client.prepare_request(
            "list",
            res=Node,
            watch=True,
            params={"resourceVersion": str(rv), "allowWatchBookmarks": "true", "timeoutSeconds": 1},
        )
        w = Watcher(c._client.watch(br))
        assert (await w.next())[:2] == ("ADDED", "n2")
        etype, name, bookmark_rv = await w.next()
        assert (etype, name, bookmark_rv) == ("BOOKMARK", None, str(api.resource_version))
        second = (await asyncio.to_thread(api.wait_for_requests, watch=True, count=4))[-1]
        assert second.query["resourceVersion"] == bookmark_rv  # resumed from the BOOKMARK
        await w.stop()
        await c.close()

    run(via_lightkube())


# ---------------------------------------------------------------------------------------------
# patch


def test_strategic_merge_patch_on_node_status(api: KubeApiServer) -> None:
    api.create_node("n1", pod_cidr="10.244.1.0/24")
    patch = {
        "metadata": {
            "annotations": {
                f"{PREFIX}/kube-subnet-manager": "true",
                f"{PREFIX}/backend-type": "",
                f"{PREFIX}/backend-data": "null",
                f"{PREFIX}/public-ip": "198.18.0.1",
            }
        },
        "status": {"conditions": [NET_UP]},
    }

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node, resource_version=str(api.resource_version)))
        await watches_open(api)
        before = api.resource_version
        node = await c.patch(NodeStatus, "n1", patch)
        assert node.metadata and node.metadata.annotations
        assert node.metadata.annotations[f"{PREFIX}/public-ip"] == "198.18.0.1"
        assert node.metadata.annotations["node.alpha.kubernetes.io/ttl"] == "0"  # kept
        assert int(node.metadata.resourceVersion or 0) == before + 1
        assert node.status and node.status.conditions
        types = [c.type for c in node.status.conditions]
        assert types == ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready",
                         "NetworkUnavailable"]  # fmt: skip
        assert await w.next() == ("MODIFIED", "n1", str(before + 1))

        sent = api.requests("PATCH")[-1]
        assert sent.path == "/api/v1/nodes/n1/status"
        assert sent.content_type == "application/strategic-merge-patch+json"
        assert sent.json() == patch

        # the same patch again changes nothing: no new resourceVersion, no event (real API)
        again = await c.patch(NodeStatus, "n1", patch)
        assert again.metadata and again.metadata.resourceVersion == str(before + 1)
        # conditions merge by type; null deletes an annotation; spec is ignored on /status
        flip = {**NET_UP, "status": "True", "reason": "NoRouteCreated"}
        node = await c.patch(
            NodeStatus,
            "n1",
            {
                "metadata": {"annotations": {f"{PREFIX}/backend-data": None}},
                "status": {"conditions": [flip]},
                "spec": {"podCIDR": "10.99.0.0/24"},
            },
        )
        assert await w.next() == ("MODIFIED", "n1", str(before + 2))  # not a no-op event
        assert node.status and node.status.conditions and node.spec
        nu = [c for c in node.status.conditions if c.type == "NetworkUnavailable"]
        assert [(c.status, c.reason) for c in nu] == [("True", "NoRouteCreated")]
        assert node.metadata and node.metadata.annotations
        assert f"{PREFIX}/backend-data" not in node.metadata.annotations
        assert node.spec.podCIDR == "10.244.1.0/24"
        # and status is ignored on the main resource
        main_res = await c.patch(
            Node, "n1", {"status": {"conditions": []}, "spec": {"unschedulable": True}}
        )
        assert main_res.spec and main_res.spec.unschedulable is True
        assert main_res.status and main_res.status.conditions
        assert len(main_res.status.conditions) == 5
        await w.stop()
        await c.close()

    run(main())


def test_merge_patch_replaces_lists_and_json_patch_is_refused(api: KubeApiServer) -> None:
    api.create_node("n1")

    async def main() -> None:
        c = client(api)
        node = await c.patch(
            NodeStatus, "n1", {"status": {"conditions": [NET_UP]}}, patch_type=PatchType.MERGE
        )
        assert node.status and node.status.conditions
        assert [c.type for c in node.status.conditions] == ["NetworkUnavailable"]
        assert api.requests("PATCH")[-1].content_type == "application/merge-patch+json"
        with pytest.raises(ApiError) as refused:
            await c.patch(
                NodeStatus,
                "n1",
                [{"op": "add", "path": "/metadata/annotations/a", "value": "b"}],
                patch_type=PatchType.JSON,
            )
        assert (refused.value.status.code, refused.value.status.reason) == (
            415,
            "UnsupportedMediaType",
        )
        await c.close()

    run(main())


def test_stale_resource_version_conflicts(api: KubeApiServer) -> None:
    api.create_node("n1")

    async def main() -> None:
        c = client(api)
        node = await c.get(Node, "n1")
        assert node.metadata
        stale = node.metadata.resourceVersion
        api.patch_node("n1", {"metadata": {"labels": {"moved": "on"}}})
        with pytest.raises(ApiError) as conflict:
            await c.patch(NodeStatus, "n1", {"metadata": {"resourceVersion": stale}})
        assert (conflict.value.status.code, conflict.value.status.reason) == (409, "Conflict")
        assert conflict.value.status.message == (
            'Operation cannot be fulfilled on nodes "n1": the object has been modified; please '
            "apply your changes to the latest version and try again"
        )
        with pytest.raises(ApiError) as replace:
            await c.replace(node)  # PUT with the stale resourceVersion
        assert replace.value.status.code == 409
        fresh = await c.get(Node, "n1")
        assert fresh.metadata and fresh.metadata.labels
        fresh.metadata.labels["replaced"] = "yes"
        done = await c.replace(fresh)
        assert done.metadata and done.metadata.labels and done.metadata.labels["replaced"] == "yes"
        await c.close()

    run(main())


def test_strategic_merge_directives() -> None:
    old: dict[str, Any] = {
        "metadata": {"finalizers": ["a"]},
        "spec": {"podCIDRs": ["10.0.0.0/24"]},
        "status": {"conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "x"}]},
    }
    new = strategic_merge(
        old,
        {
            "metadata": {"finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"podCIDRs": ["fd00::/64"], "$retainKeys": ["podCIDRs"]},
            "status": {
                "$setElementOrder/conditions": [{"type": "B"}, {"type": "A"}],
                "conditions": [{"type": "A", "$patch": "delete"}, {"type": "B", "status": "y"}],
            },
        },
    )
    assert new == {
        "metadata": {"finalizers": ["b"]},
        "spec": {"podCIDRs": ["10.0.0.0/24", "fd00::/64"]},
        "status": {"conditions": [{"type": "B", "status": "y"}]},
    }
    assert old["status"]["conditions"][0] == {"type": "A", "status": "True"}  # not mutated
    assert strategic_merge({"spec": {"x": 1, "y": 2}}, {"spec": {"$patch": "replace", "z": 3}}) == {
        "spec": {"z": 3}
    }


# ---------------------------------------------------------------------------------------------
# auth


def test_unauthorized_without_or_with_a_wrong_token(api: KubeApiServer) -> None:
    api.create_node("n1")

    async def main() -> None:
        config = api.kubeconfig_dict()
        config["users"] = [{"name": "stand-in", "user": {}}]  # no credentials at all
        anonymous = AsyncClient(KubeConfig.from_dict(config), trust_env=False)
        wrong = client(api, token="not-the-token")
        for c in (anonymous, wrong):
            with pytest.raises(ApiError) as denied:
                await c.get(Node, "n1")
            assert (denied.value.status.code, denied.value.status.reason) == (401, "Unauthorized")
            w = Watcher(c.watch(Node))
            err = await w.error()
            assert type(err) is httpx2.HTTPStatusError and err.response.status_code == 401
            await c.close()

    run(main())
    assert "Authorization" not in api.requests()[0].headers
    assert api.requests()[2].headers["Authorization"] == "Bearer not-the-token"
    assert httpx2.get(f"{api.url}/version").json()["major"] == "1"  # public, as on a real API


def test_rbac_denial_names_verb_and_resource(api: KubeApiServer) -> None:
    api.create_node("n1")
    api.create_pod("p", "kube-flannel", node_name="n1")
    api.deny("patch", "nodes/status")
    api.deny("list", "nodes")
    api.deny("get", "pods")

    async def main() -> None:
        c = client(api)
        with pytest.raises(ApiError) as patch:
            await c.patch(NodeStatus, "n1", {"metadata": {"annotations": {"a": "b"}}})
        assert (patch.value.status.code, patch.value.status.reason) == (403, "Forbidden")
        assert patch.value.status.message == (
            f'nodes "n1" is forbidden: User "{DEFAULT_USER}" cannot patch resource '
            '"nodes/status" in API group "" at the cluster scope'
        )
        await c.patch(Node, "n1", {"metadata": {"annotations": {"a": "b"}}})  # not denied
        await c.get(Node, "n1")
        with pytest.raises(ApiError) as listing:
            await names(c)
        assert listing.value.status.message == (
            f'nodes is forbidden: User "{DEFAULT_USER}" cannot list resource "nodes" in API '
            'group "" at the cluster scope'
        )
        with pytest.raises(ApiError) as pod:
            await c.get(Pod, "p", namespace="kube-flannel")
        assert pod.value.status.message == (
            f'pods "p" is forbidden: User "{DEFAULT_USER}" cannot get resource "pods" in API '
            'group "" in the namespace "kube-flannel"'
        )
        api.allow("patch", "nodes/status")
        await c.patch(NodeStatus, "n1", {"metadata": {"annotations": {"a": "c"}}})
        await c.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# faults, outage


@pytest.mark.parametrize("code", [409, 429, 500, 503])
def test_injected_faults(api: KubeApiServer, code: int) -> None:
    api.create_node("n1")
    fault = api.fail_next(code, 2, method="PATCH", path="/api/v1/nodes/*/status", retry_after=3)

    async def main() -> None:
        c = client(api)
        await c.get(Node, "n1")  # does not match
        for _ in range(2):
            with pytest.raises(ApiError) as err:
                await c.patch(NodeStatus, "n1", {"metadata": {"annotations": {"a": "b"}}})
            assert err.value.status.code == code
            if code == 409:
                assert (err.value.status.message or "").startswith(
                    'Operation cannot be fulfilled on nodes "n1": the object has been modified'
                )
            assert err.value.response.headers["Retry-After"] == "3"
            assert err.value.status.details and err.value.status.details.retryAfterSeconds == 3
        node = await c.patch(NodeStatus, "n1", {"metadata": {"annotations": {"a": "b"}}})
        assert node.metadata and node.metadata.annotations and node.metadata.annotations["a"] == "b"
        await c.close()

    run(main())
    assert (fault.hits, fault.remaining) == (2, 0)
    assert [r.status for r in api.requests("PATCH")] == [code, code, 200]
    assert api.get_node("n1") is not None


def test_fault_on_watch_and_default_retry_after(api: KubeApiServer) -> None:
    api.create_node("n1")
    api.fail_next(500, watch=True)
    busy = api.fail_next(429, method="GET", path="/api/v1/nodes", watch=False)

    async def main() -> None:
        c = client(api)
        await c.get(Node, "n1")  # GET /api/v1/nodes/n1: no match
        with pytest.raises(ApiError) as err:
            await names(c)
        assert err.value.status.reason == "TooManyRequests"
        assert err.value.response.headers["Retry-After"] == "1"
        w = Watcher(c.watch(Node))
        failure = await w.error()
        assert type(failure) is httpx2.HTTPStatusError
        assert failure.response.status_code == 500
        w = Watcher(c.watch(Node))
        assert (await w.next())[:2] == ("ADDED", "n1")
        await w.stop()
        await c.close()

    run(main())
    assert busy.hits == 1


def test_outage_and_restart_on_the_same_port(api: KubeApiServer) -> None:
    api.create_node("n1")
    port = api.port

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node, on_error=on_error_retry))
        assert (await w.next())[:2] == ("ADDED", "n1")
        await watches_open(api)
        api.stop(abrupt=False)  # graceful: the stream ends, the reconnect is refused
        err = await w.error()
        assert isinstance(err, httpx2.ConnectError), repr(err)  # on_error_retry did not apply
        with pytest.raises(httpx2.ConnectError):
            await c.get(Node, "n1")
        api.start()
        assert api.port == port
        assert (await c.get(Node, "n1")).metadata is not None

        w = Watcher(c.watch(Node, resource_version=str(api.resource_version)))
        await watches_open(api)
        started = time.monotonic()
        api.outage(1.0)  # abrupt: the watch is cut
        assert isinstance(await w.error(), httpx2.RemoteProtocolError)
        while True:
            try:
                node = await c.get(Node, "n1")
                break
            except httpx2.ConnectError:
                await asyncio.sleep(0.05)
        assert 0.9 <= time.monotonic() - started < 4
        assert node.metadata and node.metadata.resourceVersion == str(api.resource_version)
        api.create_node("n2")  # the resourceVersion counter goes on
        assert int((await c.get(Node, "n2")).metadata.resourceVersion or 0) > int(  # type: ignore[union-attr]
            node.metadata.resourceVersion or 0
        )
        await c.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# kubeconfig, TLS, lifecycle


def test_kubeconfig_file_and_tls(tmp_path: Path) -> None:
    with KubeApiServer(tls=True, token="tls-token") as api:
        api.create_node("n1")
        assert api.url.startswith("https://127.0.0.1:") and api.ca_file is not None
        path = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="kube-flannel")

        async def main() -> None:
            config = KubeConfig.from_file(path)
            c = AsyncClient(config, trust_env=False)
            assert c.namespace == "kube-flannel"
            assert (await c.get(Node, "n1")).metadata is not None
            w = Watcher(c.watch(Node))
            assert (await w.next())[:2] == ("ADDED", "n1")
            await w.stop()
            await c.close()
            untrusted = dict(api.kubeconfig_dict())
            untrusted["clusters"] = [{"name": "stand-in", "cluster": {"server": api.url}}]
            c = AsyncClient(KubeConfig.from_dict(untrusted), trust_env=False)
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get(Node, "n1")
            await c.close()

        run(main())
        sa_dir, env = api.write_service_account()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            in_cluster = KubeConfig.from_service_account(sa_dir)

        async def pod_view() -> None:
            c = AsyncClient(in_cluster, trust_env=False)
            assert c.namespace == "kube-flannel"
            assert (await c.get(Node, "n1")).metadata is not None
            await c.close()

        run(pod_view())
        assert api.requests()[-1].headers["Authorization"] == "Bearer tls-token"
        assert api.errors == []
        tmp = api.ca_file.parent
    assert not tmp.exists()


def test_close_ends_every_thread_and_socket() -> None:
    before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))
    api = KubeApiServer()
    api.create_node("n1")
    port = api.port

    async def main() -> None:
        c = client(api)
        w = Watcher(c.watch(Node))
        await w.next()
        await c.get(Node, "n1")  # and a keep-alive connection
        await watches_open(api)
        await asyncio.to_thread(api.close)
        await w.error()
        await c.close()

    run(main())
    api.close()  # idempotent
    assert set(threading.enumerate()) <= before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    with pytest.raises(RuntimeError):
        api.start()


def test_sock_factory_is_used_for_every_listen() -> None:
    made: list[socket.socket] = []

    def factory() -> socket.socket:
        made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        return made[-1]

    with KubeApiServer(sock_factory=factory) as api:
        port = api.port
        api.outage(0.2)
        deadline = time.monotonic() + 5
        while not api.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx2.get(f"{api.url}/healthz").text == "ok"
        assert len(made) == 2 and api.port == port
    assert all(s.fileno() == -1 for s in made)


# ---------------------------------------------------------------------------------------------
# inside a network namespace (root only)

CLONE_NEWNET = 0x40000000


def _in_netns(path: str, fn: Any) -> Any:
    """Run fn() in a fresh thread switched into the netns at `path`; returns its result."""
    result: list[Any] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip(8)")
def test_bound_inside_a_netns_and_used_from_there() -> None:
    name = f"kas-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    path = f"/run/netns/{name}"
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", "198.18.200.1/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True, timeout=10)

        def factory() -> socket.socket:
            return _in_netns(path, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

        with KubeApiServer("198.18.200.1", sock_factory=factory) as api:
            api.create_node("n1")
            assert api.url.startswith("http://198.18.200.1:")

            async def main() -> str | None:
                c = client(api)
                node = await c.get(Node, "n1")
                await c.close()
                return node.metadata.name if node.metadata else None

            assert _in_netns(path, lambda: run(main())) == "n1"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
