"""One client connection to the edge: httptools parsing, in-order answers, streamed relaying.

Requests are parsed as bytes arrive and queued; one task per connection answers them in order,
so pipelined requests get their responses in the order they were sent. Anything the edge
rejects itself (limits, malformed bytes) is queued too, after the requests before it, and closes
the connection once answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections import deque
from typing import cast

import httptools

from photostack.blocks.balancer import (
    NoBackendAvailable,
    StreamedResponse,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
)
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._headers import (
    downstream_headers,
    error_body,
    new_request_id,
    request_id_of,
    upstream_headers,
)
from photostack.blocks.proxy._metrics import ProxyMetrics

__all__ = ["ClientConnection", "ProxyContext"]

_JSON = "application/json; charset=utf-8"
# Reason phrases for every registered status, built once (the hot path only indexes it).
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


class ProxyContext:
    """What every connection of one proxy server shares."""

    def __init__(self, config: ProxyConfig, upstream: Upstream, metrics: ProxyMetrics) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = metrics
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.all_closed = asyncio.Event()

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.all_closed.set()


class _Request:
    __slots__ = ("body", "headers", "http_1_0", "keep_alive", "method", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        keep_alive: bool,
        http_1_0: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0


class _Reject(Exception):
    """Raised from a parser callback: the edge answers ``status`` itself and closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx
        self._config = ctx.config
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client_ip = ""
        self._queue: deque[_Request | _Reject] = deque()
        self._task: asyncio.Task[None] | None = None
        self._rejected = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False
        self._reset_request()

    def __repr__(self) -> str:
        return f"<ClientConnection {self._client_ip} queued={len(self._queue)}>"

    def _reset_request(self) -> None:
        self._in_head = False  # between on_message_begin and on_headers_complete
        self._head_bytes = 0  # parsed request line and headers
        self._raw_head_bytes = 0  # bytes received while inside a head (parser-held included)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body_parts: list[bytes] = []
        self._body_bytes = 0

    @property
    def is_idle(self) -> bool:
        return self._task is None and not self._queue

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client_ip = str(peer[0]) if peer else ""
        self._ctx.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_timer()
        if self._task is not None:
            # Nobody to answer: stop waiting on the backend (frees a streamed upstream).
            self._task.cancel()
        self._wake_writer()
        self._ctx.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(_Reject(501, "upgrade_not_supported", "protocol upgrade not supported"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause)
            else:
                self._reject(_Reject(400, "malformed_request", "malformed HTTP request"))
            return
        if self._in_head:
            # The parser holds an unfinished header line we have not seen yet: bound it too.
            # A chunk may also carry earlier pipelined requests, hence the slack.
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > 2 * self._config.max_header_bytes:
                self._reject(_too_many_header_bytes())

    def eof_received(self) -> bool:
        # Half-closed by the client: answer what was queued, then close (keep the write side).
        self._eof = True
        return not self.is_idle

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_request()
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._config.max_header_bytes:
            raise _too_many_header_bytes()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._config.max_header_bytes:
            raise _too_many_header_bytes()
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        for name, value in self._headers:
            if name.lower() == "content-length" and int(value) > self._config.max_body_bytes:
                raise _too_large()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._config.max_body_bytes:
            raise _too_large()
        self._body_parts.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        body = b"".join(self._body_parts) if len(self._body_parts) != 1 else self._body_parts[0]
        request = _Request(
            parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            self._headers,
            body,
            keep_alive=parser.should_keep_alive(),
            http_1_0=parser.get_http_version() == "1.0",
        )
        self._reset_request()
        self._enqueue(request)

    # -- queue and timers ---------------------------------------------------------------------

    def _reject(self, reject: _Reject) -> None:
        self._rejected = True
        self._enqueue(reject)

    def _enqueue(self, item: _Request | _Reject) -> None:
        self._disarm_timer()
        self._queue.append(item)
        if len(self._queue) >= self._config.max_pipelined_requests and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._answer_queue())

    def _arm_timer(self) -> None:
        self._disarm_timer()
        self._timer = self._loop.call_later(self._config.client_timeout_s, self.close)

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _answer_queue(self) -> None:
        try:
            while self._queue:
                item = self._queue.popleft()
                if self._reading_paused and len(self._queue) < self._config.max_pipelined_requests:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                if isinstance(item, _Reject):
                    self._write_error(item.status, item.code, item.message, keep_alive=False)
                    keep_alive = False
                else:
                    keep_alive = await self._answer(item)
                if not keep_alive or self._transport is None or self._transport.is_closing():
                    self.close()
                    return
        finally:
            self._task = None
        if self._ctx.draining or self._eof:
            self.close()
        else:
            self._arm_timer()

    async def _answer(self, request: _Request) -> bool:
        """Answer one request; returns whether the connection stays open."""
        keep_alive = request.keep_alive and not self._ctx.draining
        if request.method == "GET":
            path = request.target.partition("?")[0]
            if path == "/healthz":
                return self._answer_health(keep_alive)
            if path == "/metrics":
                body = self._ctx.metrics.render()
                self._write_simple(200, ProxyMetrics.content_type, body, keep_alive=keep_alive)
                return keep_alive
        request_id = request_id_of(request.headers) or new_request_id()
        headers = upstream_headers(
            request.headers,
            client_ip=self._client_ip,
            proto=self._config.forwarded_proto,
            request_id=request_id,
        )
        try:
            response = await self._ctx.upstream.open(
                request.method, request.target, headers=headers, body=request.body
            )
        except NoBackendAvailable:
            self._write_error(
                503, "no_backend", "no backend available", keep_alive, request_id, retry=True
            )
            return keep_alive
        except UpstreamTimeout:
            self._write_error(504, "upstream_timeout", "backend timed out", keep_alive, request_id)
            return keep_alive
        except UpstreamError:
            self._write_error(502, "bad_gateway", "backend failed", keep_alive, request_id)
            return keep_alive
        with contextlib.closing(response):
            return await self._relay(request, response, keep_alive, request_id)

    async def _relay(
        self, request: _Request, response: StreamedResponse, keep_alive: bool, request_id: str
    ) -> bool:
        status = response.status
        keep_alive = keep_alive and not self._ctx.draining  # drain may have begun meanwhile
        headers = downstream_headers(response.headers, request_id=request_id)
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        chunked = False
        if response.content_length is not None and status not in (204, 304):
            headers.append(("Content-Length", str(response.content_length)))
        elif not no_body:
            if request.http_1_0:
                keep_alive = False  # HTTP/1.0 has no chunking: the body ends at close
            else:
                chunked = True
                headers.append(("Transfer-Encoding", "chunked"))
        self._write_head(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
        self._ctx.metrics.count_response(status)
        transport = self._transport
        assert transport is not None
        timeout_s = self._config.stream_idle_timeout_s
        while True:
            try:
                data = await response.read_chunk(timeout_s=timeout_s)
            except UpstreamError:
                return False  # head already sent: all we can do is cut the connection
            if data is None:
                break
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                transport.write(data)
            if self._write_paused:
                await self._drain()
            if transport.is_closing():
                return False
        if chunked:
            transport.write(b"0\r\n\r\n")
        return keep_alive

    def _answer_health(self, keep_alive: bool) -> bool:
        if self._ctx.draining:
            self._write_simple(503, _JSON, b'{"status":"draining"}', keep_alive=False)
            return False
        self._write_simple(200, _JSON, b'{"status":"ok"}', keep_alive=keep_alive)
        return keep_alive

    # -- writing ----------------------------------------------------------------------------

    async def _drain(self) -> None:
        while self._write_paused and self._transport is not None:
            if self._transport.is_closing():
                return
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            await waiter

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write_head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        keep_alive: bool,
        http_1_0: bool = False,
    ) -> None:
        reason = _REASONS.get(status, "")
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if not keep_alive:
            lines.append("Connection: close\r\n")
        elif http_1_0:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        if self._transport is not None:
            self._transport.write("".join(lines).encode("latin-1"))

    def _write_simple(
        self, status: int, content_type: str, body: bytes, *, keep_alive: bool
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self._write_head(status, headers, keep_alive=keep_alive)
        if self._transport is not None:
            self._transport.write(body)
        self._ctx.metrics.count_response(status)

    def _write_error(
        self,
        status: int,
        code: str,
        message: str,
        keep_alive: bool,
        request_id: str | None = None,
        *,
        retry: bool = False,
    ) -> None:
        body = error_body(code, message)
        headers = [("Content-Type", _JSON), ("Content-Length", str(len(body)))]
        headers.append(("X-Request-Id", request_id or new_request_id()))
        if retry:
            headers.append(("Retry-After", "1"))
        self._write_head(status, headers, keep_alive=keep_alive)
        if self._transport is not None:
            self._transport.write(body)
        self._ctx.metrics.count_response(status)


def _too_many_header_bytes() -> _Reject:
    return _Reject(431, "headers_too_large", "request headers too large")


def _too_large() -> _Reject:
    return _Reject(413, "body_too_large", "request body too large")
