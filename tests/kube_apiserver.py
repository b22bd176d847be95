"""A kube-apiserver stand-in for tests: real HTTP/1.1 (optionally TLS) on 127.0.0.1 or a given
address, speaking the Kubernetes REST protocol for Nodes (list/get/watch/patch/put/create/delete,
the `status` subresource) and Pods, with bearer-token auth, RBAC denials, fault injection,
compaction (410 Expired), outages on the same port and a request log.  Stdlib only.  Must not:
import the product, lightkube or anything outside the stdlib, or bind outside 127.0.0.0/8 and
198.18.0.0/15; every socket and thread it opens is closed by close().
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fnmatch
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "Fault",
    "KubeApiServer",
    "RecordedRequest",
    "strategic_merge",
]

JSON = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace, name); namespace "" for cluster-scoped kinds

DEFAULT_TOKEN = "stand-in-token"
DEFAULT_USER = "system:serviceaccount:kube-flannel:flannel"

# resource plural -> (kind, namespaced)
_RESOURCES = {"nodes": ("Node", False), "pods": ("Pod", True)}
_KIND_PLURAL = {kind: plural for plural, (kind, _) in _RESOURCES.items()}

# Strategic-merge list fields (patchStrategy:"merge") of Node and Pod, by path -> merge key.
# A key of None marks a list of primitives merged as a set (e.g. spec.podCIDRs, finalizers).
_MERGE_LISTS: dict[tuple[str, ...], str | None] = {
    ("metadata", "ownerReferences"): "uid",
    ("metadata", "finalizers"): None,
    ("spec", "podCIDRs"): None,
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "volumes"): "name",
}

_PATCH_TYPES = {
    "application/strategic-merge-patch+json": "strategic",
    "application/merge-patch+json": "merge",
}
_ACCEPTED_PATCH_TYPES = (
    "application/json-patch+json, application/merge-patch+json, "
    "application/apply-patch+yaml, application/strategic-merge-patch+json"
)
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "t", "true")


def status_object(code: int, message: str, reason: str | None = None, **details: Any) -> JSON:
    """A `Status` object (kind Status, status Failure) as the API server sends it."""
    obj: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


class ApiStatusError(Exception):
    """Raised inside the handler: answered as an HTTP error with a Status body."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status_object(code, message, reason, **details)
        self.headers = headers or {}


# ----------------------------------------------------------------------------------------------
# Patching


def strategic_merge(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Apply a strategic-merge patch (the Node/Pod subset) to `target`; returns a new value.

    Maps merge recursively, `null` deletes a key; lists listed in _MERGE_LISTS merge by their
    key (`$patch: delete` in an item removes it), other lists replace; `$patch: replace` on a
    map replaces it; `$deleteFromPrimitiveList/<f>` removes values; `$setElementOrder/<f>` and
    `$retainKeys` directives are accepted and ignored.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    if directive is not None:
        raise ApiStatusError(400, f"Unknown patch type: {directive}")
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list):
                result[name] = [x for x in result[name] if x not in (value or [])]
            continue
        sub = (*path, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge(result.get(key), value, sub)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and sub in _MERGE_LISTS:
            old = result.get(key)
            result[key] = _merge_list(
                old if isinstance(old, list) else [], value, _MERGE_LISTS[sub], sub
            )
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(
    old: list[Any], items: list[Any], merge_key: str | None, path: tuple[str, ...]
) -> Any:
    if merge_key is None:  # a set of primitives
        out = list(old)
        out.extend(x for x in items if x not in out)
        return out
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in items):
        return [copy.deepcopy(i) for i in items if not (isinstance(i, dict) and "$patch" in i)]
    out = copy.deepcopy(old)
    for item in items:
        if not isinstance(item, dict) or merge_key not in item:
            raise ApiStatusError(
                400, f"map: {item!r} does not contain declared merge key: {merge_key}"
            )
        idx = next(
            (
                i
                for i, o in enumerate(out)
                if isinstance(o, dict) and o.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        merged = strategic_merge(out[idx] if idx is not None else {}, item, path)
        if idx is None:
            out.append(merged)
        else:
            out[idx] = merged
    return out


def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, `null` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge(result.get(key), value)
    return result


# ----------------------------------------------------------------------------------------------
# Selectors

_SET_RE = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def _label_matcher(text: str) -> Callable[[JSON], bool]:
    """Equality- and set-based label selectors: k=v, k==v, k!=v, k in (..), k notin (..), k, !k."""
    reqs: list[tuple[str, str, frozenset[str]]] = []
    for req in _split_selector(text):
        if m := _EQ_RE.match(req):
            k, op, v = m.groups()
            reqs.append((k, "notin" if op == "!=" else "in", frozenset({v})))
        elif m := _SET_RE.match(req):
            neg, k, op, vals = m.groups()
            values = frozenset(x.strip() for x in (vals or "").split(",") if x.strip())
            reqs.append((k, op or ("absent" if neg else "exists"), values))
        else:
            raise ApiStatusError(400, f"unable to parse requirement: {req!r}")

    def ok(labels: dict[str, str], k: str, op: str, values: frozenset[str]) -> bool:
        if op == "in":
            return labels.get(k) in values
        if op == "notin":
            return labels.get(k) not in values
        return (k in labels) == (op == "exists")

    return lambda obj: all(ok(obj["metadata"].get("labels") or {}, *r) for r in reqs)


def _field_matcher(text: str) -> Callable[[JSON], bool]:
    tests: list[tuple[list[str], bool, str]] = []
    for req in _split_selector(text):
        m = _EQ_RE.match(req)
        if not m:
            raise ApiStatusError(400, f"invalid selector: {req!r}")
        k, op, v = m.groups()
        tests.append((k.split("."), op != "!=", v))

    def lookup(obj: Any, parts: list[str]) -> str:
        for p in parts:
            obj = obj.get(p) if isinstance(obj, dict) else None
        return "" if obj is None else str(obj)

    return lambda obj: all((lookup(obj, p) == v) == eq for p, eq, v in tests)


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class RecordedRequest:
    """One request as received (status is filled in when the answer is sent)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: bytes
    headers: dict[str, str]
    time: float
    status: int = 0

    @property
    def watch(self) -> bool:
        return _truthy(self.query.get("watch"))

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Fault:
    """Answer the next `count` requests that match with `status` (see KubeApiServer.fail_next)."""

    status: int
    count: int
    method: str = "*"
    path: str = "*"
    watch: bool | None = None
    retry_after: int | None = None
    message: str | None = None
    hits: int = 0

    @property
    def remaining(self) -> int:
        return self.count - self.hits

    def matches(self, method: str, path: str, watch: bool) -> bool:
        return (
            self.remaining > 0
            and fnmatch.fnmatchcase(method, self.method.upper())
            and fnmatch.fnmatchcase(path, self.path)
            and (self.watch is None or self.watch == watch)
        )


@dataclass
class _Watch:
    kind: str
    pos: int
    conn: socket.socket
    epoch: int
    bookmark_epoch: int


@dataclass
class _Event:
    rv: int
    kind: str
    type: str
    obj: JSON
    old: JSON | None  # the object before this change (None for ADDED)


@dataclass
class _Route:
    verb: str
    plural: str
    kind: str
    namespace: str
    name: str | None
    subresource: str | None
    action: Callable[..., None] = field(repr=False)


# ----------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins every handler thread
    api: KubeApiServer

    def __init__(self, sock: socket.socket, api: KubeApiServer, tls: ssl.SSLContext | None):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.api = api
        self.tls = tls
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed TLS handshake or a client gone mid-request: not worth a traceback."""

    def drop_connections(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    record: RecordedRequest | None = None

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
            with self.server.conns_lock:
                self.server.conns.add(self.request)
        super().setup()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.conns_lock:
            self.server.conns.discard(self.request)
        if self.server.tls is not None:  # the wrapped socket is not the one socketserver closes
            self.request.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        self.server.api._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.record is not None:
            self.record.status = code

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


# ----------------------------------------------------------------------------------------------
# The stand-in


class KubeApiServer:
    """The API server stand-in; starts serving in the constructor (see module docstring).

    host/port: where to listen (port 0 = a free one, kept across stop()/start()).
    token/user: the one accepted bearer token and the user name it authenticates as.
    tls: serve HTTPS with a throw-away self-signed certificate (CA in `ca_file`).
    sock_factory: makes the unbound listening TCP socket, e.g. one created inside a netns.
    bookmark_interval: seconds between BOOKMARKs to watches that asked for them.
    watch_timeout: server-side cap (seconds) on watches that give no timeoutSeconds.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        tls: bool = False,
        sock_factory: Callable[[], socket.socket] | None = None,
        bookmark_interval: float = 1.0,
        watch_timeout: float | None = None,
        start_rv: int = 1000,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.user = user
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self._sock_factory = sock_factory
        self._cond = threading.Condition()
        self._rv = start_rv
        self._compacted = 0
        self._objects: dict[Key, JSON] = {}
        self._versions: dict[Key, list[tuple[int, JSON | None]]] = {}
        self._events: list[_Event] = []
        self._watches: dict[int, _Watch] = {}
        self._watch_ids = iter(range(1, 1 << 62))
        self._epoch = 0
        self._bookmark_epoch = 0
        self._faults: list[Fault] = []
        self._denied: set[tuple[str, str]] = set()
        self._log: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of stand-in bugs (tests may assert it is empty)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._closed = False
        self._tmpdir = Path(tempfile.mkdtemp(prefix="kube-apiserver-stand-in-"))
        self._tls: ssl.SSLContext | None = None
        self.ca_file: Path | None = None
        try:
            if tls:
                self._tls, self.ca_file = self._make_tls()
            self.start()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = (
            self._sock_factory()
            if self._sock_factory
            else socket.socket(family, socket.SOCK_STREAM)
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 5
            while True:
                try:
                    sock.bind((self.host, self.port))
                    break
                except OSError:
                    if self.port == 0 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> None:
        """Listen again (on the same port after a stop())."""
        with self._cond:
            if self._closed:
                raise RuntimeError("KubeApiServer is closed")
            if self._server is not None:
                return
            sock = self._listen()
            self.port = sock.getsockname()[1]
            server = _Server(sock, self, self._tls)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"kube-apiserver-stand-in:{self.port}",
                daemon=True,
            )
            self._server, self._thread = server, thread
            thread.start()

    def stop(self, *, abrupt: bool = True) -> None:
        """Stop accepting connections (refused until start()); state is kept.

        abrupt=True cuts every open connection (a crash); abrupt=False ends open watches
        cleanly first (a graceful shutdown), then closes the connections.
        """
        with self._cond:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # the accept loop
        server.socket.close()
        if abrupt:  # cut first, so that no watch gets to send its clean end
            server.drop_connections()
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()
        if not abrupt:
            self._wait(lambda: not self._watches, 5)
            server.drop_connections()
        server.server_close()  # joins the handler threads
        if thread is not None:
            thread.join()

    def outage(self, seconds: float, *, abrupt: bool = True) -> None:
        """stop() now and start() again on the same port after `seconds` (does not block)."""
        self.stop(abrupt=abrupt)

        def restart() -> None:
            with contextlib.suppress(RuntimeError):
                self.start()

        timer = threading.Timer(seconds, restart)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def close(self) -> None:
        """Stop serving, end every thread and socket, remove the temp dir. Idempotent."""
        for timer in self._timers:
            timer.cancel()
            timer.join()
        self.stop()
        with self._cond:
            self._closed = True
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> KubeApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_tls(self) -> tuple[ssl.SSLContext, Path]:
        cert, key = self._tmpdir / "apiserver.pem", self._tmpdir / "apiserver-key.pem"
        literal = re.fullmatch(r"[\d.]+|[\da-fA-F:]+", self.host) is not None
        san = f"IP:{self.host},DNS:localhost" if literal else f"DNS:{self.host}"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=kube-apiserver-stand-in",
             "-addext", f"subjectAltName={san}",
             "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx, cert

    # -- kubeconfig ---------------------------------------------------------------------------

    def kubeconfig_dict(self, *, token: str | None = None, namespace: str | None = None) -> JSON:
        """A kubeconfig (as a dict) with one context `stand-in` pointing at this server."""
        cluster: JSON = {"server": self.url}
        if self.ca_file is not None:
            cluster["certificate-authority"] = str(self.ca_file)
        context: JSON = {"cluster": "stand-in", "user": "stand-in"}
        if namespace:
            context["namespace"] = namespace
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": cluster}],
            "users": [
                {"name": "stand-in", "user": {"token": self.token if token is None else token}}
            ],
            "contexts": [{"name": "stand-in", "context": context}],
            "current-context": "stand-in",
        }

    def write_kubeconfig(
        self,
        path: str | Path | None = None,
        *,
        token: str | None = None,
        namespace: str | None = None,
    ) -> Path:
        """Write kubeconfig_dict() as a file (JSON, which is YAML) and return its path."""
        target = Path(path) if path is not None else self._tmpdir / "kubeconfig"
        target.write_text(
            json.dumps(self.kubeconfig_dict(token=token, namespace=namespace), indent=2)
        )
        return target

    def write_service_account(
        self, directory: str | Path | None = None, *, namespace: str = "kube-flannel"
    ) -> tuple[Path, dict[str, str]]:
        """An in-cluster service-account dir (token, namespace, ca.crt) and the env a pod gets
        (KUBERNETES_SERVICE_HOST/_PORT). In-cluster clients use https: needs tls=True."""
        if self.ca_file is None:
            raise RuntimeError("in-cluster config is https only: start the stand-in with tls=True")
        target = Path(directory) if directory is not None else self._tmpdir / "serviceaccount"
        target.mkdir(parents=True, exist_ok=True)
        (target / "token").write_text(self.token)
        (target / "namespace").write_text(namespace)
        shutil.copyfile(self.ca_file, target / "ca.crt")
        env = {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}
        return target, env

    # -- objects (Python API for tests; every change emits a watch event) ------------------------

    @property
    def resource_version(self) -> int:
        """The current (global, last written) resourceVersion."""
        with self._cond:
            return self._rv

    @property
    def compacted_rv(self) -> int:
        with self._cond:
            return self._compacted

    def _commit(self, key: Key, obj: JSON | None, etype: str) -> JSON:
        """Write a new version of key (None = delete) under the lock; returns the written object."""
        old = self._objects.get(key)
        self._rv += 1
        written = copy.deepcopy(obj if obj is not None else old)
        assert written is not None
        meta = written["metadata"]
        meta["resourceVersion"] = str(self._rv)
        for m in ("labels", "annotations"):
            if m in meta and not meta[m]:
                del meta[m]  # omitempty, as the API server serialises them
        if obj is None:
            self._objects.pop(key, None)
        else:
            self._objects[key] = written
        self._versions.setdefault(key, []).append((self._rv, written if obj is not None else None))
        self._events.append(_Event(self._rv, key[0], etype, written, old))
        self._cond.notify_all()
        return copy.deepcopy(written)

    def create(self, obj: JSON) -> JSON:
        """Create a Node or Pod from a full object (server fields are filled in)."""
        with self._cond:
            return self._create(copy.deepcopy(obj))

    def _create(self, obj: JSON) -> JSON:
        kind = obj.get("kind")
        if kind not in _KIND_PLURAL:
            raise ApiStatusError(400, f"kind {kind!r} is not served by the stand-in")
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiStatusError(422, f'{kind} "" is invalid: metadata.name: Required value')
        namespaced = _RESOURCES[_KIND_PLURAL[kind]][1]
        ns = meta.setdefault("namespace", "default") if namespaced else ""
        key = (kind, ns, name)
        if key in self._objects:
            raise ApiStatusError(
                409, f'{_KIND_PLURAL[kind]} "{name}" already exists', "AlreadyExists",
                name=name, kind=_KIND_PLURAL[kind],
            )  # fmt: skip
        obj["apiVersion"] = "v1"
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta.pop("resourceVersion", None)
        obj.setdefault("spec", {})
        obj.setdefault("status", {})
        return self._commit(key, obj, "ADDED")

    def create_node(
        self,
        name: str,
        *,
        pod_cidr: str | None = None,
        pod_cidrs: list[str] | None = None,
        internal_ip: str | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        conditions: list[JSON] | None = None,
    ) -> JSON:
        """Create a Node as a kubelet would register it (and the node IPAM assign podCIDR)."""
        spec: JSON = {}
        cidrs = pod_cidrs if pod_cidrs is not None else ([pod_cidr] if pod_cidr else [])
        if cidrs:
            spec = {"podCIDR": cidrs[0], "podCIDRs": list(cidrs)}
        now = _now()

        def cond(ctype: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": ctype, "status": status, "lastHeartbeatTime": now,
                "lastTransitionTime": now, "reason": reason, "message": message,
            }  # fmt: skip

        addresses = [{"type": "Hostname", "address": name}]
        if internal_ip:
            addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
        return self.create(
            {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "labels": labels
                    if labels is not None
                    else {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                    },
                    "annotations": annotations
                    if annotations is not None
                    else {
                        "node.alpha.kubernetes.io/ttl": "0",
                        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                    },
                },
                "spec": spec,
                "status": {
                    "conditions": conditions
                    if conditions is not None
                    else [
                        cond(
                            "MemoryPressure",
                            "False",
                            "KubeletHasSufficientMemory",
                            "kubelet has sufficient memory available",
                        ),
                        cond(
                            "DiskPressure",
                            "False",
                            "KubeletHasNoDiskPressure",
                            "kubelet has no disk pressure",
                        ),
                        cond(
                            "PIDPressure",
                            "False",
                            "KubeletHasSufficientPID",
                            "kubelet has sufficient PID available",
                        ),
                        cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                    ],
                    "addresses": addresses,
                },
            }
        )

    def create_pod(
        self,
        name: str,
        namespace: str = "kube-flannel",
        *,
        node_name: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> JSON:
        """Create a running Pod (e.g. the flannel DaemonSet pod) scheduled on node_name."""
        spec: JSON = {"containers": [{"name": "kube-flannel", "image": "flannel"}]}
        if node_name:
            spec["nodeName"] = node_name
        return self.create(
            {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
                "spec": spec,
                "status": {"phase": "Running"},
            }
        )

    def _key(self, kind: str, name: str, namespace: str = "") -> Key:
        return (kind, namespace if _RESOURCES[_KIND_PLURAL[kind]][1] else "", name)

    def get(self, kind: str, name: str, namespace: str = "") -> JSON | None:
        with self._cond:
            obj = self._objects.get(self._key(kind, name, namespace))
            return copy.deepcopy(obj)

    def get_node(self, name: str) -> JSON | None:
        return self.get("Node", name)

    def get_pod(self, name: str, namespace: str = "kube-flannel") -> JSON | None:
        return self.get("Pod", name, namespace)

    def nodes(self) -> dict[str, JSON]:
        with self._cond:
            return {k[2]: copy.deepcopy(o) for k, o in self._objects.items() if k[0] == "Node"}

    def patch(self, kind: str, name: str, patch: JSON, namespace: str = "") -> JSON:
        """Strategic-merge `patch` into the whole object (spec, status and metadata alike)."""
        with self._cond:
            key = self._key(kind, name, namespace)
            old = self._existing(key)
            new = strategic_merge(old, patch)
            self._keep_server_fields(old, new)
            return copy.deepcopy(old) if new == old else self._commit(key, new, "MODIFIED")

    def patch_node(self, name: str, patch: JSON) -> JSON:
        return self.patch("Node", name, patch)

    def replace(self, obj: JSON) -> JSON:
        """Replace a stored object by `obj` (server fields are kept)."""
        with self._cond:
            meta = obj["metadata"]
            key = self._key(obj["kind"], meta["name"], meta.get("namespace", ""))
            old = self._existing(key)
            new = copy.deepcopy(obj)
            self._keep_server_fields(old, new)
            return copy.deepcopy(old) if new == old else self._commit(key, new, "MODIFIED")

    def delete(self, kind: str, name: str, namespace: str = "") -> JSON:
        with self._cond:
            key = self._key(kind, name, namespace)
            self._existing(key)
            return self._commit(key, None, "DELETED")

    def delete_node(self, name: str) -> JSON:
        return self.delete("Node", name)

    def delete_pod(self, name: str, namespace: str = "kube-flannel") -> JSON:
        return self.delete("Pod", name, namespace)

    def _existing(self, key: Key) -> JSON:
        obj = self._objects.get(key)
        if obj is None:
            plural = _KIND_PLURAL[key[0]]
            raise ApiStatusError(404, f'{plural} "{key[2]}" not found', name=key[2], kind=plural)
        return obj

    @staticmethod
    def _keep_server_fields(old: JSON, new: JSON) -> None:
        meta = new.setdefault("metadata", {})
        for f in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            if f in old["metadata"]:
                meta[f] = old["metadata"][f]
        new["kind"], new["apiVersion"] = old["kind"], old["apiVersion"]
        for m in ("labels", "annotations"):
            if m in meta and not meta[m]:
                del meta[m]

    def _state_at(self, rv: int) -> dict[Key, JSON]:
        state = {}
        for key, versions in self._versions.items():
            older = [obj for v, obj in versions if v <= rv]
            if older and older[-1] is not None:
                state[key] = older[-1]
        return state

    # -- faults, RBAC, compaction, watches ----------------------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        method: str = "*",
        path: str = "*",
        watch: bool | None = None,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> Fault:
        """Answer the next `count` matching requests with HTTP `status` and a Status body.

        method and path are fnmatch patterns ("PATCH", "/api/v1/nodes/*/status"); watch=True or
        False restricts to watch or non-watch GETs. For 429 (and 503 if given) a Retry-After
        header is sent (default 1 s for 429). Checked after authentication, before RBAC.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        fault = Fault(status, count, method, path, watch, retry_after, message)
        with self._cond:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def deny(self, verb: str, resource: str) -> None:
        """RBAC: answer `verb` ("get", "list", "watch", "patch", "update", "create", "delete",
        or "*") on `resource` ("nodes", "nodes/status", "pods") with 403 Forbidden."""
        with self._cond:
            self._denied.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        with self._cond:
            self._denied.discard((verb, resource))

    def compact(self, rv: int | None = None) -> int:
        """Compact history at `rv` (default: now): watches/lists from older versions get 410."""
        with self._cond:
            point = self._rv if rv is None else min(rv, self._rv)
            self._compacted = max(self._compacted, point)
            for key in list(self._versions):
                versions = self._versions[key]
                older = [v for v in versions if v[0] <= self._compacted]
                kept = [v for v in versions if v[0] > self._compacted]
                if older and older[-1][1] is not None:
                    kept.insert(0, older[-1])
                if kept:
                    self._versions[key] = kept
                else:
                    del self._versions[key]
            # open watches keep the events they still have to send
            floor = min([self._compacted, *(w.pos for w in self._watches.values())])
            self._events = [e for e in self._events if e.rv > floor]
            return self._compacted

    def close_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch: cleanly (final chunk) or abrupt (connection cut). Returns count."""
        with self._cond:
            watches = list(self._watches.values())
        if abrupt:  # cut first, so that no watch gets to send its clean end
            for w in watches:
                with contextlib.suppress(OSError):
                    w.conn.shutdown(socket.SHUT_RDWR)
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()
        return len(watches)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now to every open watch that allowed bookmarks."""
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    @property
    def open_watches(self) -> int:
        with self._cond:
            return len(self._watches)

    def wait_for_watches(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until exactly `count` watches are open (TimeoutError otherwise)."""
        if not self._wait(lambda: len(self._watches) == count, timeout):
            raise TimeoutError(f"{len(self._watches)} watches open, wanted {count}")

    # -- request log ----------------------------------------------------------------------------

    def requests(
        self, method: str | None = None, path: str | None = None, *, watch: bool | None = None
    ) -> list[RecordedRequest]:
        """The request log, optionally filtered (path is an fnmatch pattern)."""
        with self._cond:
            return [
                r for r in self._log
                if (method is None or r.method == method.upper())
                and (path is None or fnmatch.fnmatchcase(r.path, path))
                and (watch is None or r.watch == watch)
            ]  # fmt: skip

    def clear_requests(self) -> None:
        with self._cond:
            self._log.clear()

    def wait_for_requests(
        self,
        method: str | None = None,
        path: str | None = None,
        *,
        count: int = 1,
        watch: bool | None = None,
        timeout: float = 5.0,
    ) -> list[RecordedRequest]:
        """Block until the log holds `count` matching requests; returns them."""
        found: list[RecordedRequest] = []

        def enough() -> bool:
            found[:] = [
                r for r in self._log
                if (method is None or r.method == method.upper())
                and (path is None or fnmatch.fnmatchcase(r.path, path))
                and (watch is None or r.watch == watch)
            ]  # fmt: skip
            return len(found) >= count

        if not self._wait(enough, timeout):
            raise TimeoutError(f"{len(found)} of {count} {method} {path} requests seen")
        return list(found)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # -- request handling -------------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        path = url.path.rstrip("/") or "/"
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        body = h.read_body()
        ctype = h.headers.get("Content-Type")
        record = RecordedRequest(
            h.command, path, query, ctype, body, dict(h.headers.items()), time.time()
        )
        h.record = record
        with self._cond:
            self._log.append(record)
            self._cond.notify_all()
        try:
            if path in ("/healthz", "/livez", "/readyz", "/version"):
                if path == "/version":
                    h.send_json(
                        200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-stand-in"}
                    )
                else:
                    body = b"ok"
                    h.send_response(200)
                    h.send_header("Content-Type", "text/plain; charset=utf-8")
                    h.send_header("Content-Length", str(len(body)))
                    h.end_headers()
                    h.wfile.write(body)
                    record.status = 200
                return
            if h.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiStatusError(401, "Unauthorized")
            self._inject_fault(h.command, path, record.watch)
            route = self._route(h.command, path, query)
            self._authorize(route)
            route.action(h, route, query, body, ctype)
        except ApiStatusError as e:
            h.send_json(e.code, e.status, e.headers)
        except OSError:  # the client went away, or stop()/close_watches(abrupt=True) cut it
            h.close_connection = True
        except Exception as e:  # a bug in the stand-in: answer 500 and keep it for the test
            with self._cond:
                self.errors.append(traceback.format_exc())
            with contextlib.suppress(OSError):
                h.send_json(500, status_object(500, f"stand-in bug: {e!r}"))

    def _inject_fault(self, method: str, path: str, watch: bool) -> None:
        with self._cond:
            fault = next((f for f in self._faults if f.matches(method, path, watch)), None)
            if fault is None:
                return
            fault.hits += 1
        code = fault.status
        headers = {}
        details: JSON = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
            details["retryAfterSeconds"] = fault.retry_after
        m = re.fullmatch(r"/api/v1/(?:namespaces/[^/]+/)?([a-z]+)(?:/([^/]+))?(?:/.*)?", path)
        target = (f'{m[1]} "{m[2]}"' if m[2] else m[1]) if m else "the object"
        default = {
            409: f"Operation cannot be fulfilled on {target}: the object has been modified; "
            "please apply your changes to the latest version and try again",
            429: "Too many requests, please try again later.",
            500: "Internal error occurred: injected by the test",
            503: "The server is currently unable to handle the request",
        }.get(code, "injected by the test")
        raise ApiStatusError(code, fault.message or default, headers=headers, **details)

    def _route(self, method: str, path: str, query: dict[str, str]) -> _Route:
        m = re.fullmatch(
            r"/api/v1(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[a-z]+)"
            r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?",
            path,
        )
        if not m or m["res"] not in _RESOURCES or m["sub"] not in (None, "status"):
            raise ApiStatusError(404, "the server could not find the requested resource")
        plural = m["res"]
        kind, namespaced = _RESOURCES[plural]
        ns, name, sub = m["ns"] or "", m["name"], m["sub"]
        if ns and not namespaced:
            raise ApiStatusError(404, "the server could not find the requested resource")
        if namespaced and name is not None and not ns:
            raise ApiStatusError(404, "the server could not find the requested resource")
        table: dict[tuple[str, bool], tuple[str, Callable[..., None]]] = {
            ("GET", False): (
                ("watch", self._do_watch)
                if _truthy(query.get("watch"))
                else ("list", self._do_list)
            ),
            ("POST", False): ("create", self._do_create),
            ("GET", True): ("get", self._do_get),
            ("PATCH", True): ("patch", self._do_patch),
            ("PUT", True): ("update", self._do_put),
            ("DELETE", True): ("delete", self._do_delete),
        }
        entry = table.get((method if method != "HEAD" else "GET", name is not None))
        if entry is None or (sub and method not in ("GET", "PATCH", "PUT", "HEAD")):
            raise ApiStatusError(
                405, "the server does not allow this method on the requested resource"
            )
        verb, action = entry
        return _Route(verb, plural, kind, ns, name, sub, action)

    def _authorize(self, route: _Route) -> None:
        resource = route.plural + (f"/{route.subresource}" if route.subresource else "")
        with self._cond:
            denied = any(v in (route.verb, "*") and r == resource for v, r in self._denied)
        if not denied:
            return
        who = f'{route.plural} "{route.name}"' if route.name else route.plural
        scope = (
            f'in the namespace "{route.namespace}"' if route.namespace else "at the cluster scope"
        )
        details: JSON = {"kind": route.plural}
        if route.name:
            details["name"] = route.name
        raise ApiStatusError(
            403,
            f'{who} is forbidden: User "{self.user}" cannot {route.verb} resource "{resource}" '
            f'in API group "" {scope}',
            **details,
        )

    def _selector(self, query: dict[str, str]) -> Callable[[JSON], bool]:
        tests = []
        if query.get("labelSelector"):
            tests.append(_label_matcher(query["labelSelector"]))
        if query.get("fieldSelector"):
            tests.append(_field_matcher(query["fieldSelector"]))
        return lambda obj: all(t(obj) for t in tests)

    def _in_scope(self, route: _Route, key: Key) -> bool:
        return key[0] == route.kind and (not route.namespace or key[1] == route.namespace)

    def _do_get(self, h: _Handler, route: _Route, *_: Any) -> None:
        assert route.name is not None
        with self._cond:
            obj = copy.deepcopy(self._existing((route.kind, route.namespace, route.name)))
        h.send_json(200, obj)

    def _do_list(self, h: _Handler, route: _Route, query: dict[str, str], *_: Any) -> None:
        match = self._selector(query)
        rv_param = query.get("resourceVersion", "")
        rv_match = query.get("resourceVersionMatch", "")
        limit = int(query.get("limit") or 0)
        start_after = ""
        with self._cond:
            if query.get("continue"):
                try:
                    token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                    at, start_after = int(token["rv"]), str(token["start"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ApiStatusError(400, f"continue key is not valid: {e}") from None
                if at < self._compacted:
                    raise ApiStatusError(
                        410,
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                        "Expired",
                    )
            elif rv_match == "Exact":
                if rv_param in ("", "0"):
                    raise ApiStatusError(
                        400,
                        'resourceVersionMatch: Forbidden: resourceVersionMatch "Exact" is '
                        'forbidden for resourceVersion "" or "0"',
                    )
                at = int(rv_param)
                if at < self._compacted:
                    raise ApiStatusError(
                        410, "The resourceVersion for the provided list is too old.", "Expired"
                    )
                if at > self._rv:
                    raise ApiStatusError(
                        504,
                        f"Too large resource version: {at}, current: {self._rv}",
                    )
            else:
                # "" and "0" mean most recent / any; N means "not older than N"
                want = int(rv_param) if rv_param not in ("", "0") else 0
                if want > self._rv and not self._cond.wait_for(lambda: self._rv >= want, 3):
                    raise ApiStatusError(
                        504, f"Too large resource version: {want}, current: {self._rv}"
                    )
                at = self._rv
            state = self._state_at(at) if at != self._rv else self._objects
            items = sorted(
                (
                    copy.deepcopy(o)
                    for k, o in state.items()
                    if self._in_scope(route, k) and k[2] + "\0" + k[1] > start_after and match(o)
                ),
                key=lambda o: o["metadata"]["name"] + "\0" + o["metadata"].get("namespace", ""),
            )
        meta: JSON = {"resourceVersion": str(at)}
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps(
                    {"rv": at, "start": last["name"] + "\0" + last.get("namespace", "")}
                ).encode()
            ).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        h.send_json(200, {"kind": f"{route.kind}List", "apiVersion": "v1", "metadata": meta,
                          "items": items})  # fmt: skip

    def _do_create(self, h: _Handler, route: _Route, _q: Any, body: bytes, *_: Any) -> None:
        obj = self._parse(body)
        obj.setdefault("kind", route.kind)
        if obj["kind"] != route.kind:
            raise ApiStatusError(400, f"the body kind {obj['kind']!r} does not match {route.kind}")
        if route.namespace:
            obj.setdefault("metadata", {})["namespace"] = route.namespace
        with self._cond:
            created = self._create(obj)
        h.send_json(201, created)

    def _do_delete(self, h: _Handler, route: _Route, *_: Any) -> None:
        assert route.name is not None
        with self._cond:
            key = (route.kind, route.namespace, route.name)
            self._existing(key)
            obj = self._commit(key, None, "DELETED")
        h.send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                          "status": "Success", "details": {"name": route.name,
                          "kind": route.plural, "uid": obj["metadata"]["uid"]}})  # fmt: skip

    @staticmethod
    def _parse(body: bytes) -> JSON:
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise ApiStatusError(400, f"the body of the request is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiStatusError(400, "the body of the request must be a JSON object")
        return obj

    def _update(
        self, route: _Route, make: Callable[[JSON], JSON], precondition: str | None
    ) -> JSON:
        """Write make(old) by the API server's subresource rules; skip no-op writes."""
        assert route.name is not None
        key = (route.kind, route.namespace, route.name)
        with self._cond:
            old = self._existing(key)
            if precondition and precondition != old["metadata"]["resourceVersion"]:
                raise ApiStatusError(
                    409,
                    f'Operation cannot be fulfilled on {route.plural} "{route.name}": the object '
                    "has been modified; please apply your changes to the latest version and try "
                    "again",
                    name=route.name, kind=route.plural,
                )  # fmt: skip
            new = make(old)
            if not isinstance(new, dict):
                raise ApiStatusError(400, "the patched object is not a JSON object")
            self._keep_server_fields(old, new)
            # status subresource: only status (and metadata) change; main resource: not status
            if route.subresource == "status":
                new["spec"] = copy.deepcopy(old.get("spec", {}))
            else:
                new["status"] = copy.deepcopy(old.get("status", {}))
            if new == old:
                return copy.deepcopy(old)
            return self._commit(key, new, "MODIFIED")

    def _do_patch(
        self, h: _Handler, route: _Route, _q: Any, body: bytes, ctype: str | None
    ) -> None:
        base = (ctype or "").split(";")[0].strip().lower()
        kind = _PATCH_TYPES.get(base)
        if kind is None:
            raise ApiStatusError(
                415,
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {_ACCEPTED_PATCH_TYPES} (the stand-in serves only strategic-merge "
                f"and merge patches; got {base or 'no Content-Type'})",
            )
        patch = self._parse(body)
        fn = strategic_merge if kind == "strategic" else json_merge
        precondition = (patch.get("metadata") or {}).get("resourceVersion")
        h.send_json(200, self._update(route, lambda old: fn(old, patch), precondition))

    def _do_put(self, h: _Handler, route: _Route, _q: Any, body: bytes, *_: Any) -> None:
        obj = self._parse(body)
        meta = obj.get("metadata") or {}
        if meta.get("name") != route.name:
            raise ApiStatusError(400, "the name of the object does not match the name on the URL")
        h.send_json(200, self._update(route, lambda _old: obj, meta.get("resourceVersion")))

    # -- watch --------------------------------------------------------------------------------

    def _do_watch(self, h: _Handler, route: _Route, query: dict[str, str], *_: Any) -> None:
        match = self._selector(query)
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        rv_param = query.get("resourceVersion", "")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        if timeout is None:
            timeout = self.watch_timeout
        deadline = time.monotonic() + timeout if timeout is not None else None
        initial: list[JSON] = []
        expired: JSON | None = None
        with self._cond:
            if rv_param in ("", "0"):
                pos = self._rv
                initial = sorted(
                    (copy.deepcopy(o) for k, o in self._objects.items()
                     if self._in_scope(route, k) and match(o)),
                    key=lambda o: o["metadata"]["name"],
                )  # fmt: skip
            else:
                try:
                    pos = int(rv_param)
                except ValueError:
                    raise ApiStatusError(400, f"invalid resource version: {rv_param}") from None
                if pos < self._compacted:
                    expired = status_object(
                        410, f"too old resource version: {pos} ({self._compacted})", "Expired"
                    )
            wid = next(self._watch_ids)
            watch = _Watch(route.kind, pos, h.connection, self._epoch, self._bookmark_epoch)
            if expired is None:
                self._watches[wid] = watch
                self._cond.notify_all()
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Cache-Control", "no-cache, private")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            assert h.record is not None
            h.record.status = 200
            if expired is not None:
                h.write_chunk(self._line("ERROR", expired))
            else:
                for obj in initial:
                    h.write_chunk(self._line("ADDED", obj))
                self._stream(h, route, match, watch, bookmarks, deadline)
            h.write_chunk(b"")  # the terminating zero-length chunk: a clean end of stream
        finally:
            with self._cond:
                self._watches.pop(wid, None)
                self._cond.notify_all()

    @staticmethod
    def _line(etype: str, obj: JSON) -> bytes:
        return json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"

    def _stream(
        self,
        h: _Handler,
        route: _Route,
        match: Callable[[JSON], bool],
        watch: _Watch,
        bookmarks: bool,
        deadline: float | None,
    ) -> None:
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            out: list[bytes] = []
            with self._cond:
                while True:
                    if watch.epoch != self._epoch:
                        return
                    pending = [e for e in self._events if e.rv > watch.pos]
                    now = time.monotonic()
                    if pending:
                        break
                    if deadline is not None and now >= deadline:
                        return
                    if bookmarks and (
                        now >= next_bookmark or watch.bookmark_epoch != self._bookmark_epoch
                    ):
                        break
                    waits = [next_bookmark - now] if bookmarks else []
                    if deadline is not None:
                        waits.append(deadline - now)
                    self._cond.wait(min([*waits, 1.0]))
                for e in pending:
                    if e.kind != route.kind or not self._in_scope(
                        route, (e.kind, e.obj["metadata"].get("namespace", ""), "")
                    ):
                        continue
                    now_in = match(e.obj)
                    was_in = e.old is not None and match(e.old)
                    if e.type == "DELETED":
                        etype = "DELETED" if was_in else ""
                    elif now_in:
                        etype = "MODIFIED" if was_in and e.type == "MODIFIED" else "ADDED"
                    else:
                        etype = "DELETED" if was_in else ""
                    if etype:
                        out.append(self._line(etype, e.obj))
                if pending:
                    watch.pos = pending[-1].rv
                elif bookmarks:
                    watch.bookmark_epoch = self._bookmark_epoch
                    next_bookmark = now + self.bookmark_interval
                    watch.pos = self._rv
                    out.append(self._line("BOOKMARK", {
                        "kind": route.kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(self._rv)},
                    }))  # fmt: skip
            for line in out:
                h.write_chunk(line)
