# EtcdRegistry: subnet.Registry over etcd v3 (aetcd on grpc.aio, on the running event loop):
# flanneld's key layout under a prefix, its lease/transaction protocol, endpoint failover, TLS
# and user/password auth.  The only importer of aetcd/grpc in the project; imports nothing from
# udpbackend but subnet (no data-plane module), and holds no policy (retries, backoff: manager).
from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aetcd
import grpc
import grpc.aio
from aetcd import rpc, utils

from ..errors import ConfigError
from .registry import (
    CompactedError,
    KeyValue,
    Registry,
    RegistryUnavailable,
    WatchBatch,
    WatchEvent,
    WatchKind,
)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "EtcdRegistry", "go_path_join"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_PORT = 2379
DEFAULT_TIMEOUT = 5.0  # seconds: every unary call, opening a watch, authenticating

T = TypeVar("T")

# gRPC channel settings.  The stock reconnect backoff grows to 120 s, so after a long outage
# the channel could sit in TRANSIENT_FAILURE for minutes after etcd is back: cap it at
# 0.5 s.  Even so a failed call drops a channel found in TRANSIENT_FAILURE (a CI run saw one
# wait 8 s on a loaded machine), so the retry after it (control.manager.RECONNECT_MAX) dials
# afresh and a join after an outage is learned within a second.
# Keepalive pings on active streams notice a silent peer (partition, SIGSTOP) in ~15 s; 10 s
# stays above etcd's --grpc-keepalive-min-time (5 s), and no pings without calls (etcd's
# enforcement policy does not permit them).
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.max_receive_message_length": -1,  # clientv3 allows MaxInt32: a big subnets listing
}


class _EndpointError(Exception):
    """This endpoint cannot serve the request right now (str: why); another one might."""


# Errors of one attempt that mean "this endpoint, right now" (everything else propagates).
_RPC_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, TimeoutError, _EndpointError)


# ---------------------------------------------------------------------------------------------
# Settings: Go path.Join for the prefix, flanneld-style endpoint URLs.
# ---------------------------------------------------------------------------------------------


def _go_clean(p: str) -> str:
    """Go's path.Clean: collapse slashes, drop '.', resolve '..', no trailing slash."""
    if not p:
        return "."
    rooted = p.startswith("/")
    out: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    body = "/".join(out)
    if rooted:
        return "/" + body
    return body or "."


def go_path_join(*elems: str) -> str:
    """Go's path.Join: join the non-empty elements with '/', then Clean ('' if all empty)."""
    joined = "/".join(e for e in elems if e)
    return _go_clean(joined) if joined else ""


@dataclass(frozen=True)
class _Endpoint:
    url: str  # as given: for messages
    host: str  # gRPC target host (IPv6 literals keep their brackets)
    port: int
    tls: bool


def _parse_endpoint(text: str, client_cert: bool) -> _Endpoint:
    """`http://h:p` (plaintext, like clientv3 even with a client cert), `https://h:p` (TLS),
    bare `h:p` (TLS only with a client certificate).  The port defaults to 2379."""
    raw = text.strip()
    what = f"--etcd-endpoints: {raw!r}"
    parts = urllib.parse.urlsplit(raw if "://" in raw else "//" + raw)
    scheme = parts.scheme.lower()
    if scheme not in ("", "http", "https"):
        raise ConfigError(f"{what}: unsupported scheme {scheme!r} (use http:// or https://)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"{what}: bad port") from None
    if not host:
        raise ConfigError(f"{what}: no host")
    if ":" in host:
        host = f"[{host}]"
    tls = scheme == "https" or (scheme == "" and client_cert)
    return _Endpoint(raw, host, port or DEFAULT_PORT, tls)


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path!r}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------
# aetcd's Client with the channel it lacks: aetcd 1.0.0 always opens an insecure channel and
# never re-authenticates.  This connect() mirrors aetcd's (same attributes) but can use TLS
# credentials, and tolerates a server with auth disabled (as clientv3 does).
# ---------------------------------------------------------------------------------------------


class _Client(aetcd.Client):
    # set by aetcd.Client.__init__ (aetcd ships no type information)
    _connected: asyncio.Event
    _is_connecting: bool
    _connect_wait_timeout: float
    _host: str
    _port: int
    _options: dict[str, Any]
    _timeout: float
    _username: str | None
    _password: str | None

    def __init__(
        self,
        endpoint: _Endpoint,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        super().__init__(
            host=endpoint.host,
            port=endpoint.port,
            username=username,
            password=password,
            timeout=timeout,
            options=_CHANNEL_OPTIONS,
            connect_wait_timeout=timeout,
        )
        self._credentials = credentials
        self.endpoint = endpoint

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        channel: grpc.aio.Channel | None = None
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is not None:
                channel = rpc.secure_channel(target, self._credentials, options=options)
            else:
                channel = rpc.insecure_channel(target, options=options)
            metadata = None
            if self._username is not None:
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    resp = await rpc.AuthStub(channel).Authenticate(request, timeout=self._timeout)
                    metadata = (("token", resp.token),)
                except grpc.aio.AioRpcError as e:
                    if "authentication is not enabled" not in (e.details() or ""):
                        raise
            self.channel, self.metadata = channel, metadata
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._connected.set()
            channel = None
        finally:
            self._is_connecting = False
            if channel is not None:
                await channel.close()


def _rpc_status(exc: BaseException) -> tuple[grpc.StatusCode | None, str]:
    """The gRPC status behind an error (aetcd keeps the AioRpcError as __cause__)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, grpc.aio.AioRpcError):
            return e.code(), e.details() or ""
        e = e.__cause__
    return None, str(exc) or type(exc).__name__


def _being_cancelled() -> bool:
    """Is the current task being cancelled (rather than a gRPC call cancelled under it)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _is_auth_problem(code: grpc.StatusCode | None, details: str) -> bool:
    """Wrong or missing credentials, or a role without access: retrying will not help."""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return True
    return code == grpc.StatusCode.INVALID_ARGUMENT and (
        "authentication failed" in details or "user name is empty" in details
    )


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------


class EtcdRegistry:
    """subnet.Registry over etcd v3.

    Errors: a lost/refused/timed-out connection (on every endpoint) is RegistryUnavailable; a
    watch from a compacted revision is CompactedError; bad credentials or a permission error is
    ConfigError (retrying cannot fix it).  Each call tries the endpoints in order, starting at the
    last one that worked, and sticks to the first that answers.
    """

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        client_cert = bool(certfile and keyfile)
        if bool(certfile) != bool(keyfile):
            log.warning(
                "etcd: --etcd-certfile and --etcd-keyfile go together; "
                "ignoring the one given (no client certificate)"
            )
        self._endpoints = [_parse_endpoint(e, client_cert) for e in endpoints if e.strip()]
        if not self._endpoints:
            raise ConfigError("--etcd-endpoints: no endpoint given")
        self._credentials: grpc.ChannelCredentials | None = None
        if any(ep.tls for ep in self._endpoints):
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(cafile, "--etcd-cafile") if cafile else None,
                private_key=_read(keyfile, "--etcd-keyfile") if client_cert and keyfile else None,
                certificate_chain=(
                    _read(certfile, "--etcd-certfile") if client_cert and certfile else None
                ),
            )
        self._username = username or None
        self._password = (password or "") if self._username else None
        self._timeout = float(timeout)
        self._prefix = go_path_join(prefix)
        # what to cut from a full key to get the relative one ("/p/config" -> "config")
        self._strip = {"": "", ".": "", "/": "/"}.get(self._prefix, self._prefix + "/")
        self._subnets = self._key("subnets")
        self._clients: dict[int, _Client] = {}
        self._current = 0
        self._watch_calls: set[grpc.aio.StreamStreamCall] = set()
        self._closed = False

    # -- keys --------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def endpoints(self) -> list[str]:
        return [ep.url for ep in self._endpoints]

    def _key(self, rel: str) -> bytes:
        return go_path_join(self._prefix, rel).encode("utf-8", "surrogateescape")

    def _rel(self, key: bytes) -> str:
        text = key.decode("utf-8", "surrogateescape")
        return text[len(self._strip) :] if text.startswith(self._strip) else text

    def _kv(self, kv: Any) -> KeyValue:
        return KeyValue(self._rel(kv.key), bytes(kv.value), int(kv.lease), int(kv.mod_revision))

    # -- plumbing ----------------------------------------------------------------------------
    def _client(self, idx: int) -> _Client:
        client = self._clients.get(idx)
        if client is None:
            ep = self._endpoints[idx]
            creds = self._credentials if ep.tls else None
            client = _Client(ep, creds, self._username, self._password, self._timeout)
            self._clients[idx] = client
        return client

    async def _drop_client(self, idx: int) -> None:
        client = self._clients.pop(idx, None)
        if client is not None:
            try:
                await client.close()
            except Exception as e:  # closing a broken channel: nothing to do about it
                log.debug("etcd %s: close: %r", self._endpoints[idx].url, e)

    async def _drop_if_backing_off(self, idx: int) -> None:
        """A channel that failed to connect waits out gRPC's reconnect backoff (up to
        max_reconnect_backoff_ms, jittered, and longer when the process is starved) and fails
        every call meanwhile: drop it, so the caller's next retry dials at once."""
        client = self._clients.get(idx)
        channel = getattr(client, "channel", None) if client is not None else None
        if channel is None:
            return
        try:
            state = channel.get_state(try_to_connect=False)
        except Exception as e:  # a closed channel: it goes either way
            log.debug("etcd %s: channel state: %r", self._endpoints[idx].url, e)
            state = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await self._drop_client(idx)

    def _translate(self, exc: BaseException, idx: int, what: str) -> Exception:
        code, details = _rpc_status(exc)
        where = f"etcd {self._endpoints[idx].url}: {what}"
        if _is_auth_problem(code, details):
            hint = "" if self._username else " (the server wants --etcd-username/--etcd-password)"
            return ConfigError(f"{where}: {details}{hint}")
        if isinstance(exc, TimeoutError) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer within {self._timeout:g}s"
        return RegistryUnavailable(f"{where}: {details}")

    async def _call(self, what: str, op: Callable[[_Client], Awaitable[T]]) -> T:
        """Run op on the current endpoint, failing over to the others in order."""
        if self._closed:
            raise RegistryUnavailable(f"etcd: {what}: registry is closed")
        failures: list[str] = []
        n = len(self._endpoints)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            for attempt in range(2):
                client = self._client(idx)
                try:
                    async with asyncio.timeout(self._timeout * 4):  # belt and braces
                        result = await op(client)
                except asyncio.CancelledError:
                    if self._closed and not _being_cancelled():  # grpc.aio: channel closed
                        raise RegistryUnavailable(f"etcd: {what}: registry is closed") from None
                    raise
                except _RPC_ERRORS as exc:
                    code, _ = _rpc_status(exc)
                    if attempt == 0 and self._username and code == grpc.StatusCode.UNAUTHENTICATED:
                        # simple tokens expire (5 min) and die with a restart: log in again
                        log.info(
                            "etcd %s: auth token rejected, logging in again", client.endpoint.url
                        )
                        await self._drop_client(idx)
                        continue
                    err = self._translate(exc, idx, what)
                    if not isinstance(err, RegistryUnavailable):
                        raise err from exc
                    await self._drop_if_backing_off(idx)
                    failures.append(str(err))
                    if n > 1:
                        log.warning("%s; trying the next endpoint", err)
                    break
                else:
                    if idx != self._current:
                        log.info("etcd: now using %s", self._endpoints[idx].url)
                        self._current = idx
                    return result
        raise RegistryUnavailable("; ".join(failures))

    async def _revoke_quietly(self, client: _Client, lease_id: int) -> None:
        try:
            await client.revoke_lease(lease_id)
        except _RPC_ERRORS as e:  # it has no keys: it simply ages out
            log.debug("etcd: revoking lease %x: %s", lease_id, e)

    # -- Registry ----------------------------------------------------------------------------
    async def get_config(self) -> bytes | None:
        key = self._key("config")

        async def op(c: _Client) -> bytes | None:
            got = await c.get(key)
            return None if got is None else bytes(got.value)

        return await self._call("get config", op)

    async def list_subnets(self) -> tuple[list[KeyValue], int]:
        async def op(c: _Client) -> tuple[list[KeyValue], int]:
            res = await c.get_prefix(self._subnets)  # no trailing slash, like flannel
            return [self._kv(kv) for kv in res.kvs], int(res.header.revision)

        return await self._call("list subnets", op)

    async def lease_ttl(self, lease_id: int) -> int:
        if lease_id == 0:
            return -1

        async def op(c: _Client) -> int:
            info = await c.get_lease_info(lease_id, keys=False)
            return int(info.TTL)  # the server says -1 for an expired or unknown lease

        return await self._call(f"lease {lease_id:x} ttl", op)

    async def create_subnet(self, key: str, value: bytes, ttl: int) -> bool:
        full = self._key(key)
        granted: list[int] = []

        async def op(c: _Client) -> bool:
            lease = await c.lease(ttl)
            granted.append(lease.id)
            try:
                ok, responses = await c.transaction(
                    compare=[c.transactions.version(full) == 0],
                    success=[c.transactions.put(full, value, lease=lease.id)],
                    failure=[c.transactions.get(full)],
                )
            except Exception:
                await self._revoke_quietly(c, lease.id)
                raise
            if ok:
                return True
            await self._revoke_quietly(c, lease.id)
            existing = responses[0] if responses else []  # [(value, rtypes.Get)] of the key
            # A failover retry: if an earlier attempt's transaction did land (its reply was
            # lost with the connection), the key carries one of our own leases.
            return bool(existing) and existing[0][1].lease in granted[:-1]

        return await self._call(f"create {key}", op)

    async def update_subnet(self, key: str, value: bytes, ttl: int | None) -> int:
        full = self._key(key)

        async def op(c: _Client) -> int:
            if ttl is None:
                await c.put(full, value)
                return 0
            lease = await c.lease(ttl)
            try:
                await c.put(full, value, lease=lease.id)
            except Exception:
                await self._revoke_quietly(c, lease.id)
                raise
            return int(lease.id)

        return await self._call(f"update {key}", op)

    async def delete_subnet(self, key: str) -> None:
        full = self._key(key)

        async def op(c: _Client) -> None:
            await c.delete(full)

        await self._call(f"delete {key}", op)

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchBatch]:
        """One etcd watch stream (prefix <prefix>/subnets, require-leader, progress notify).

        A batch's revision is the header revision, except while etcd replays history (an
        "unsynced" watcher may send a batch whose header is ahead of its last event): then it is
        the last event's revision.  Either way revision + 1 is a resume point that loses nothing.
        """
        call = await self._call("watch subnets", lambda c: self._open_watch(c, start_revision))
        idx = self._current  # _call has just set it to the endpoint that answered
        self._watch_calls.add(call)
        try:
            while True:
                try:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise _EndpointError("watch stream ended by the server")
                    self._check_watch_response(resp, self._endpoints[idx].url)
                except asyncio.CancelledError:
                    if self._closed and not _being_cancelled():  # close() cancelled the call
                        raise RegistryUnavailable(
                            "etcd: watch subnets: registry is closed"
                        ) from None
                    raise
                except _RPC_ERRORS as exc:
                    raise self._translate(exc, idx, "watch subnets") from exc
                if resp.created:
                    continue
                events = [self._event(ev) for ev in resp.events]
                revision = int(resp.header.revision)
                if events:
                    revision = max(ev.kv.mod_revision for ev in events)
                yield WatchBatch(events, revision)
        finally:
            self._watch_calls.discard(call)
            call.cancel()

    async def _open_watch(self, c: _Client, start_revision: int) -> grpc.aio.StreamStreamCall:
        await c.connect()
        metadata = (*(c.metadata or ()), ("hasleader", "true"))  # clientv3 RequireLeader
        call = rpc.WatchStub(c.channel).Watch(metadata=metadata)
        try:
            create = rpc.WatchCreateRequest(
                key=self._subnets,
                range_end=utils.prefix_range_end(self._subnets),
                start_revision=max(int(start_revision), 0),
                progress_notify=True,
            )
            async with asyncio.timeout(self._timeout):
                await call.write(rpc.WatchRequest(create_request=create))
                resp = await call.read()
            if resp is grpc.aio.EOF or not resp.created:
                raise _EndpointError("watch stream closed before the watch was created")
            self._check_watch_response(resp, c.endpoint.url)
        except BaseException:
            call.cancel()
            raise
        return call

    @staticmethod
    def _check_watch_response(resp: Any, url: str) -> None:
        """Compaction: CompactedError; no permission: ConfigError; any other cancel (e.g.
        "no leader" under require-leader): _EndpointError, so another endpoint may be tried."""
        where = f"etcd {url}: watch subnets"
        if resp.compact_revision:
            raise CompactedError(f"{where}: revisions below {resp.compact_revision} are compacted")
        if resp.canceled:
            reason = resp.cancel_reason or "watch canceled by the server"
            if "compacted" in reason:
                raise CompactedError(f"{where}: {reason}")
            if "permission denied" in reason:
                raise ConfigError(f"{where}: {reason}")
            raise _EndpointError(reason)

    def _event(self, ev: Any) -> WatchEvent:
        kv = ev.kv
        if ev.type == rpc.Event.EventType.DELETE:
            return WatchEvent(
                WatchKind.DELETE, KeyValue(self._rel(kv.key), b"", 0, int(kv.mod_revision))
            )
        return WatchEvent(WatchKind.PUT, self._kv(kv))

    # -- lifetime ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Cancel open watches (their iterators raise RegistryUnavailable) and close channels."""
        self._closed = True
        for call in list(self._watch_calls):
            call.cancel()
        for idx in list(self._clients):
            await self._drop_client(idx)

    async def __aenter__(self) -> EtcdRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.endpoints!r}, prefix={self._prefix!r})"


if TYPE_CHECKING:  # mypy checks that EtcdRegistry satisfies the protocol

    def _is_a_registry(r: EtcdRegistry) -> Registry:
        return r
