"""KubeManager: flannel's kube subnet manager (--kube-subnet-mgr) over lightkube on the node's
event loop: net-conf.json for the network, this node's podCIDR for its subnet, its own Node's
annotations patched as a flannel UDP node writes them, peers from a Node list + watch, and
NetworkUnavailable=False once up.  The only importer of lightkube; must not import the data
plane.  Which Node is a lease, and what to patch, is decided in control/annotations.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube import ConfigError as KubeConfigError
from lightkube.resources.core_v1 import Node, Pod

from ..errors import ConfigError, StartupError
from .annotations import (
    Annotations,
    annotations_for,
    lease_fields,
    network_available_patch,
    node_name,
    node_to_lease,
    own_annotations_patch,
    pod_cidr,
    stored_public_ip,
)
from .lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventKind, LeaseWatcher
from .manager import RECONNECT_FIRST, RECONNECT_MAX
from .network import NetworkConfig, parse_network_config
from .registry import RegistryUnavailable

log = logging.getLogger("udpbackend")

DEFAULT_NET_CONF = "/etc/kube-flannel/net-conf.json"
PATCH_RETRY = 3.0  # flannel retries its Node patch every 3 s ...
PATCH_TIMEOUT = 30.0  # ... for up to 30 s
WATCH_TIMEOUT = 300  # seconds a watch request may stay open (the server may end it sooner)

T = TypeVar("T")


def kube_config(api_url: str, kubeconfig_file: str) -> KubeConfig:
    """flannel's BuildConfigFromFlags: the kubeconfig file (its server replaced by the URL when
    both are given), else the URL alone, else the in-cluster service account."""
    try:
        if kubeconfig_file:
            cfg = KubeConfig.from_file(kubeconfig_file)
            if not api_url:
                return cfg
            one = cfg.get()
            assert one is not None
            return KubeConfig.from_one(
                cluster=dataclasses.replace(one.cluster, server=api_url),
                user=one.user,
                namespace=one.namespace,
            )
        if api_url:
            return KubeConfig.from_server(api_url)
        return KubeConfig.from_service_account()
    except (KubeConfigError, OSError, KeyError, ValueError, AssertionError) as e:
        where = kubeconfig_file or api_url or "in-cluster config"
        if isinstance(e, KeyError):
            e = KubeConfigError(f"{e.args[0]} is not set")
        raise StartupError(f"fail to create kubernetes config ({where}): {e}") from None


def _status_of(e: Exception) -> int:
    if isinstance(e, ApiError):
        return int(e.status.code or 0)
    if isinstance(e, httpx2.HTTPStatusError):
        return e.response.status_code
    return 0


def _api_problem(e: Exception, what: str) -> Exception:
    """A client error as the lifecycle's vocabulary: RegistryUnavailable (retry quietly: the
    API server is down or busy) or ConfigError (retry, but a person must act: RBAC, 404)."""
    code = _status_of(e)
    if isinstance(e, httpx2.TransportError) or code in (0, 409, 429) or code >= 500:
        detail = str(e) or type(e).__name__
        return RegistryUnavailable(f"kube API unavailable ({what}): {detail}")
    message = e.status.message if isinstance(e, ApiError) else str(e)
    if code in (401, 403):
        return ConfigError(f"kube API refused to {what} (HTTP {code}): {message}")
    return ConfigError(f"kube API: {what}: HTTP {code}: {message}")


class KubeManager:
    """control.manager.SubnetManager over the Kubernetes API (flannel's kubeSubnetManager).

    config: the client configuration (kube_config()); node_name: NODE_NAME, else the node of
    the pod POD_NAMESPACE/POD_NAME; sleep: awaited between retries (injected for tests)."""

    kind = "kube"

    def __init__(
        self,
        config: KubeConfig,
        *,
        net_conf_path: str = DEFAULT_NET_CONF,
        annotation_prefix: str = "flannel.alpha.coreos.com",
        node_name: str = "",
        pod_name: str = "",
        pod_namespace: str = "",
        set_node_network_unavailable: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ann: Annotations = annotations_for(annotation_prefix)
        if not node_name and not (pod_name and pod_namespace):
            raise StartupError("env variables POD_NAME and POD_NAMESPACE must be set")
        self.config = config
        self.net_conf_path = net_conf_path
        self.node_name = node_name
        self.pod = (pod_namespace, pod_name)
        self.set_node_network_unavailable = set_node_network_unavailable
        self.sleep = sleep
        self.on_state: Callable[[bool], None] | None = None
        self.skipped = 0  # Nodes seen that are not (or not valid) flannel leases
        self._client: AsyncClient | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:  # made on the running loop: httpx binds to it
            self._client = AsyncClient(self.config, trust_env=False)
        return self._client

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (httpx2.HTTPError, ApiError) as e:
            raise _api_problem(e, what) from None

    # -- config and lease -------------------------------------------------------------------
    async def get_network_config(self) -> NetworkConfig:
        try:
            with open(self.net_conf_path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise StartupError(
                f"failed to read net conf {self.net_conf_path}: {e.strerror}"
            ) from None
        try:
            return parse_network_config(raw, kube=True)
        except ConfigError as e:
            raise StartupError(f"error parsing subnet config {self.net_conf_path}: {e}") from None

    async def _node_name(self) -> str:
        if not self.node_name:
            ns, name = self.pod
            pod = await self._call(
                f'get pod "{ns}/{name}"', lambda: self.client.get(Pod, name, namespace=ns)
            )
            found = pod.spec.nodeName if pod.spec else None
            if not found:
                raise ConfigError(f"node name not present in pod spec '{ns}/{name}'")
            self.node_name = found
            log.info("node name from pod %s/%s: %s", ns, name, found)
        return self.node_name

    async def _own_node(self) -> dict[str, Any]:
        name = await self._node_name()
        node = await self._call(f'get node "{name}"', lambda: self.client.get(Node, name))
        return node.to_dict()

    async def stored_public_ip(self) -> IPv4Address | None:
        return stored_public_ip(await self._own_node(), self.ann)

    async def _patch_status(self, what: str, patch: dict[str, Any]) -> None:
        """PATCH nodes/<name>/status (strategic merge), retried like flannel: every 3 s for
        up to 30 s on conflicts, throttling, server errors and a lost connection."""
        name = await self._node_name()
        waited = 0.0
        while True:
            try:
                await self._call(what, lambda: self.client.patch(Node.Status, name, patch))
                return
            except RegistryUnavailable as e:
                if waited >= PATCH_TIMEOUT:
                    raise RegistryUnavailable(
                        f"timeout contacting kube-api, failed to patch node {name!r}: {e}"
                    ) from None
            await self.sleep(PATCH_RETRY)
            waited += PATCH_RETRY

    async def acquire_lease(
        self, cfg: NetworkConfig, public_ip: IPv4Address, prev_subnet: IPv4Network | None
    ) -> Lease:
        """The node's podCIDR as this node's lease, after writing flannel's annotations
        (only those that differ).  ConfigError while no podCIDR is assigned (the lifecycle
        waits and says so once); StartupError when it lies outside Network."""
        node = await self._own_node()
        name = await self._node_name()
        subnet = pod_cidr(node)
        if subnet is None:
            raise ConfigError(f'node "{name}" pod cidr not assigned')
        patch, effective = own_annotations_patch(node, self.ann, public_ip)
        if effective != public_ip:
            log.info(
                "Overriding public ip with '%s' from node annotation '%s'",
                effective,
                self.ann.public_ip_overwrite,
            )
        if patch is not None:
            await self._patch_status(f'patch node "{name}" status', patch)
            written = ", ".join(patch["metadata"]["annotations"])
            log.info("annotations of node %s written: %s", name, written)
        if not subnet.subnet_of(cfg.network):
            raise StartupError(
                f'subnet "{cfg.network}" specified in the flannel net config doesn\'t contain '
                f'"{subnet}" PodCIDR of the "{name}" node'
            )
        return Lease(subnet, LeaseAttrs(effective), None, f"nodes/{name}")

    def renew_at(self, lease: Lease) -> float | None:
        return None  # a podCIDR is the node's for its life: nothing to renew

    async def renew_lease(self, lease: Lease) -> Lease:
        return lease

    async def complete_lease(self, lease: Lease) -> None:
        if not self.set_node_network_unavailable:
            return
        patch = network_available_patch(dt.datetime.now(dt.UTC))
        await self._patch_status("patch node status (NetworkUnavailable)", patch)
        log.info("node condition NetworkUnavailable=False (FlannelIsUp)")

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # -- peers ------------------------------------------------------------------------------
    def _leases_of(self, nodes: list[dict[str, Any]]) -> dict[str, Lease]:
        out = {}
        for node in nodes:
            lease, why = node_to_lease(node, self.ann)
            if lease is None:
                self._skip(node, why)
            else:
                out[node_name(node)] = lease
        return out

    def _skip(self, node: dict[str, Any], why: str) -> None:
        self.skipped += 1
        if "not managed" not in why:  # a node without flannel is normal, a bad one is not
            log.warning("ignoring node %s: %s", node_name(node) or "?", why)

    async def _list(self) -> tuple[list[dict[str, Any]], str]:
        async def go() -> tuple[list[dict[str, Any]], str]:
            it = self.client.list(Node)
            nodes = [n.to_dict() async for n in it]
            return nodes, it.resourceVersion  # set by the first page, even an empty one

        return await self._call("list nodes", go)

    async def watch_leases(
        self,
        own_subnet: IPv4Network | None,
        *,
        on_own: Callable[[LeaseEvent], None] | None = None,
    ) -> AsyncIterator[list[LeaseEvent]]:
        """The peers' leases: LIST, then WATCH from its resourceVersion (lightkube resumes a
        stream the server ended from the last version it saw).  410 Gone: LIST again and
        yield the difference.  A lost API server: back off 0.1 s doubling to 0.8 s, resume
        from the last version; on_state(False/True) once per outage.  An update is passed
        on only when backend-data, backend-type, public-ip or the podCIDR changed."""
        watcher = LeaseWatcher(own_subnet)
        by_name: dict[str, Lease] = {}
        fields: dict[str, tuple[str, ...]] = {}
        rv: str | None = None
        first, connected, backoff, relisted = True, True, RECONNECT_FIRST, False
        while True:
            try:
                if rv is None:
                    nodes, rv = await self._list()
                    by_name = self._leases_of(nodes)
                    fields = {node_name(n): lease_fields(n, self.ann) for n in nodes}
                    events = watcher.reset(by_name.values())
                    if not connected:
                        connected = True
                        self._state(True)
                    if events or first:
                        first = False
                        yield events
                async for kind, obj in self.client.watch(
                    Node, resource_version=rv, server_timeout=WATCH_TIMEOUT
                ):
                    backoff, relisted = RECONNECT_FIRST, False
                    if not connected:
                        connected = True
                        self._state(True)
                    node = obj.to_dict()
                    rv = node.get("metadata", {}).get("resourceVersion") or rv
                    if kind not in ("ADDED", "MODIFIED", "DELETED"):
                        continue  # BOOKMARK: only moves the resume point
                    raw = self._node_events(kind, node, by_name, fields)
                    events = watcher.update(raw)
                    if events:
                        yield events
            except (ApiError, httpx2.HTTPError) as e:
                if _status_of(e) == 410:
                    log.warning("watch of nodes fell behind (410 Gone): re-listing")
                    rv = None
                    if not relisted:
                        relisted = True
                        continue
                else:
                    problem = _api_problem(e, "watch nodes")
                    if connected:
                        connected = False
                        self._state(False)
                        log.warning("%s", problem)
            except RegistryUnavailable as e:
                if connected:
                    connected = False
                    self._state(False)
                    log.warning("%s", e)
            except ConfigError as e:
                log.warning("%s (retrying)", e)
            await self.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX)

    def _state(self, connected: bool) -> None:
        if self.on_state is not None:
            self.on_state(connected)

    def _node_events(
        self,
        kind: str,
        node: dict[str, Any],
        by_name: dict[str, Lease],
        fields: dict[str, tuple[str, ...]],
    ) -> list[LeaseEvent]:
        """One watch event of a Node as lease events, keeping by_name/fields current."""
        name = node_name(node)
        old = by_name.get(name)
        if kind == "DELETED":
            fields.pop(name, None)
            by_name.pop(name, None)
            return [LeaseEvent(LeaseEventKind.REMOVED, old)] if old else []
        now = lease_fields(node, self.ann)
        if fields.get(name) == now and (old is not None or kind == "MODIFIED"):
            return []  # nothing a route depends on changed (status heartbeats, labels ...)
        fields[name] = now
        lease, why = node_to_lease(node, self.ann)
        out = []
        if old is not None and (lease is None or lease.subnet != old.subnet):
            out.append(LeaseEvent(LeaseEventKind.REMOVED, old))
            del by_name[name]
        if lease is None:
            self._skip(node, why)
        else:
            by_name[name] = lease
            out.append(LeaseEvent(LeaseEventKind.ADDED, lease))
        return out


def kube_manager_from_env(
    api_url: str,
    kubeconfig_file: str,
    net_conf_path: str,
    annotation_prefix: str,
    set_node_network_unavailable: bool,
    environ: dict[str, str] | None = None,
) -> KubeManager:
    env = os.environ if environ is None else environ
    return KubeManager(
        kube_config(api_url, kubeconfig_file),
        net_conf_path=net_conf_path,
        annotation_prefix=annotation_prefix,
        node_name=env.get("NODE_NAME", ""),
        pod_name=env.get("POD_NAME", ""),
        pod_namespace=env.get("POD_NAMESPACE", ""),
        set_node_network_unavailable=set_node_network_unavailable,
    )
