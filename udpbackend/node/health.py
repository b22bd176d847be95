"""The health HTTP server of --healthz-ip/--healthz-port, with flannel's meaning:
/healthz answers while the process runs, /readyz once subnet.env is written and the rules
are in.  A tiny asyncio server on the daemon's loop; it reads state, it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

Route = Callable[[], tuple[int, str, bytes]]  # -> (status, content type, body)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves GET on a few paths; ``routes`` maps a path to a function giving the answer."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 3)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path in self.routes:
                status, ctype, body = self.routes[path]()
            else:
                status, ctype, body = 404, "text/plain", b"404 page not found\n"
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if method == "GET" else b"")
            )
            await writer.drain()
        except (
            OSError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ):
            pass  # a broken client is its own problem
        finally:
            writer.close()
