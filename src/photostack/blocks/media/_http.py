"""A small HTTP/1.1 server core on raw asyncio + httptools, shared by the origin and the CDN.

A handler answers each request in one of two ways: ``answer_now`` returns the whole response
as bytes synchronously (a cache hit: no task, no await, one ``transport.write``), or returns
None and ``answer`` (a coroutine) writes the response through the connection. Pipelined requests
are answered in order: while a connection has a request in ``answer``, later ones queue behind
it. A server-wide tick (not a timer per request) closes connections whose head is late or that
sat idle too long. Request bodies are buffered up to ``max_body_bytes`` (413 above).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import IO, Protocol, cast

import httptools

__all__ = [
    "Connection",
    "Handler",
    "HttpLimits",
    "HttpServer",
    "Request",
    "error_response",
    "json_response",
    "response_head",
    "simple_response",
]

log = logging.getLogger("photostack.media")

_NEVER = math.inf
_JSON = "application/json; charset=utf-8"
_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in http.HTTPStatus
}
_ABORT_GRACE_S = 1.0


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0  # a request head must arrive whole in this time
    idle_timeout_s: float = 60.0  # keep-alive connections idle longer are closed
    max_pipelined: int = 32  # queued requests per connection before reading pauses
    drain_timeout_s: float = 10.0


class Request:
    """One parsed request; ``headers`` maps lowercased names to the last value."""

    __slots__ = ("body", "headers", "http_1_0", "keep_alive", "method", "path", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        *,
        keep_alive: bool,
        http_1_0: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.partition("?")[0]
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target}>"


class Handler(Protocol):
    def answer_now(self, request: Request) -> bytes | None:
        """The whole response when it can be made without waiting, else None."""

    async def answer(self, request: Request, conn: Connection) -> bool:
        """Write the response through ``conn``; returns whether the connection stays open."""


def response_head(
    status: int, headers: list[tuple[str, str]], *, keep_alive: bool, http_1_0: bool = False
) -> bytes:
    """Status line and headers (framing headers are the caller's), encoded once."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http_1_0:
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode("latin-1")
    return status_line + "".join(lines).encode("latin-1")


def simple_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    keep_alive: bool,
    http_1_0: bool = False,
    headers: list[tuple[str, str]] | None = None,
    head_only: bool = False,
) -> bytes:
    out = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if headers:
        out += headers
    head = response_head(status, out, keep_alive=keep_alive, http_1_0=http_1_0)
    return head if head_only else head + body


def json_response(
    status: int, payload: object, *, keep_alive: bool, http_1_0: bool = False
) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return simple_response(status, _JSON, body, keep_alive=keep_alive, http_1_0=http_1_0)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    keep_alive: bool,
    http_1_0: bool = False,
    headers: list[tuple[str, str]] | None = None,
    head_only: bool = False,
) -> bytes:
    """API.md's error shape: ``{"error": {"code", "message"}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return simple_response(
        status, _JSON, body, keep_alive=keep_alive, http_1_0=http_1_0, headers=headers,
        head_only=head_only,
    )  # fmt: skip


class _Refuse(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._closed = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.deadline = self._loop.time() + self._limits.header_timeout_s
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    @property
    def is_idle(self) -> bool:
        return not self._busy and not self._queue

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = _NEVER
        if self._task is not None:
            self._task.cancel()
        self._wake()
        self._server.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._parser.feed_data(data)
        except _Refuse as exc:
            self._refuse(exc.status, exc.code, exc.message)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "upgrade_not_supported", "protocol upgrade not supported")
        except httptools.HttpParserError:
            self._refuse(400, "bad_request", "malformed HTTP request")

    def eof_received(self) -> bool | None:
        if self.is_idle:
            return None  # close now
        return True  # keep the write side open to answer what is queued

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self.deadline = self._loop.time() + self._limits.header_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_header_bytes:
            raise _Refuse(431, "headers_too_large", "request headers too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > self._limits.max_header_bytes:
            raise _Refuse(431, "headers_too_large", "request headers too large")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes:
            raise _Refuse(413, "body_too_large", "request body too large")
        self.deadline = self._loop.time() + self._limits.idle_timeout_s

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Refuse(413, "body_too_large", "request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        parts = self._body
        http_1_0 = parser.get_http_version() == "1.0"
        request = Request(
            parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            self._headers,
            parts[0] if len(parts) == 1 else b"".join(parts),
            keep_alive=parser.should_keep_alive() and not self._server.draining,
            http_1_0=http_1_0,
        )
        self._reset()
        if self.is_idle:
            data = self._handler.answer_now(request)
            if data is not None:
                transport = self._transport
                if transport is not None:
                    transport.write(data)
                    if not request.keep_alive:
                        transport.close()
                        self._closed = True
                # The server's coarse clock (set by its tick): no clock read per request.
                self.deadline = self._server.coarse_now + self._limits.idle_timeout_s
                return
        self.deadline = _NEVER
        self._queue.append(request)
        if len(self._queue) >= self._limits.max_pipelined and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    # -- answering -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while self._queue:
                self._busy = True
                request = self._queue.popleft()
                if self._reading_paused and self._transport is not None:
                    self._reading_paused = False
                    self._transport.resume_reading()
                data = self._handler.answer_now(request)
                if data is not None:
                    self.write(data)
                    keep_alive = request.keep_alive
                else:
                    try:
                        keep_alive = await self._handler.answer(request, self)
                    except Exception:  # a bug in a handler: answer 500, keep serving others
                        log.exception("handler failed on %r", request)
                        self.write(error_response(500, "internal", "internal error",
                                                  keep_alive=False))  # fmt: skip
                        keep_alive = False
                if not keep_alive or self._transport is None or self._transport.is_closing():
                    self.close()
                    return
        finally:
            self._busy = False
            self._task = None
        if self._server.draining:
            self.close()
            return
        self.deadline = self._loop.time() + self._limits.idle_timeout_s

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._closed = True
        data = error_response(status, code, message, keep_alive=False)
        if self._transport is not None:
            if self.is_idle:
                self._transport.write(data)
            self._transport.close()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the client's socket buffer is full."""
        while self._write_paused and self._transport is not None:
            if self._transport.is_closing():
                return
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            await waiter

    async def sendfile(self, file: IO[bytes], offset: int, count: int) -> None:
        """Send ``count`` bytes of ``file`` from ``offset`` (os.sendfile on the default loop)."""
        if self._transport is None or self._transport.is_closing() or count <= 0:
            return
        await self._loop.sendfile(self._transport, file, offset, count)

    def _wake(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()


class HttpServer:
    """Listens on one address and serves ``handler``; ``start`` / ``port`` / ``aclose``."""

    def __init__(self, handler: Handler, limits: HttpLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.connections: set[Connection] = set()
        self.draining = False
        self.coarse_now = 0.0  # loop time, updated by the tick (deadlines need no more)
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Bind and accept. Raises OSError when the address is taken."""
        self._loop = asyncio.get_running_loop()
        self.coarse_now = self._loop.time()
        self._server = await self._loop.create_server(
            lambda: Connection(self), host, port, backlog=1024
        )
        self._ticker = self._loop.create_task(self._tick())

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def _tick(self) -> None:
        interval_s = min(1.0, self.limits.header_timeout_s / 4, self.limits.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            now = self.coarse_now = self.loop.time()
            for conn in list(self.connections):
                if conn.deadline <= now:
                    conn.deadline = _NEVER
                    conn.abort()

    async def aclose(self) -> None:
        """Stop accepting, let in-flight requests finish (``drain_timeout_s``), then cut."""
        if self._server is None:
            return
        self.draining = True
        self._server.close()
        for conn in list(self.connections):
            if conn.is_idle:
                conn.close()
        if self.connections:
            self._all_closed.clear()
            if not await _wait(self._all_closed, self.limits.drain_timeout_s):
                for conn in list(self.connections):
                    conn.abort()
                await _wait(self._all_closed, _ABORT_GRACE_S)
        await self._server.wait_closed()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self._server = None


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
