"""One client connection to the edge: httptools parsing, in-order answers, streamed relaying.

Requests are parsed as bytes arrive and queued; one task per connection answers them in order,
so pipelined requests get their responses in the order they were sent. Anything the edge
rejects itself (limits, malformed or ambiguous framing) is queued too, after the requests
before it, and closes the connection once answered.

The hot path avoids per-request timers (a server-wide housekeeping tick checks each
connection's ``deadline``), per-request ``getrandom`` calls (request ids come from a counter)
and second writes (a small response's head and body leave in one ``transport.write``).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, cast

import httptools

from photostack.blocks.balancer import (
    NoBackendAvailable,
    StreamedResponse,
    UpstreamError,
    UpstreamTimeout,
)
from photostack.blocks.proxy._headers import (
    downstream_headers,
    error_body,
    new_request_id,
    request_id_of,
    upstream_headers,
)
from photostack.blocks.proxy._metrics import ProxyMetrics
from photostack.blocks.proxy._policy import (
    accepts_gzip,
    apply_header_rules,
    check_filter,
    compress,
    header_value,
    is_compressible,
    is_compressible_type,
)
from photostack.blocks.proxy._request import (
    Reject,
    Request,
    add_vary,
    check_framing,
    head_bytes,
    too_large,
    too_many_header_bytes,
)
from photostack.blocks.proxy._tunnel import is_websocket_upgrade, start_tunnel

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext

__all__ = ["ClientConnection", "Request", "error_status"]

_JSON = "application/json; charset=utf-8"
# A response body up to this size is read whole and written with its head in one write.
_SMALL_BODY_BYTES = 64 * 1024
_NEVER = math.inf


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, *, proto: str) -> None:
        self._ctx = ctx
        self._config = ctx.config
        self._proto = proto
        self._loop = ctx.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client_ip = ""
        self._queue: deque[Request | Reject] = deque()
        # One task per connection answers its requests in order, for the connection's life: it
        # waits on ``_idle_waiter`` between requests (a future is cheaper than a task each).
        self._task: asyncio.Task[None] | None = None
        self._idle_waiter: asyncio.Future[None] | None = None
        self._busy = False
        self._rejected = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._upgrade: Request | None = None  # a WebSocket upgrade request, for the tunnel
        # When the connection must have made progress (event-loop time); the server's tick
        # closes it past this. A new connection must send a request head in header_timeout_s.
        self.deadline = self._loop.time() + self._config.header_timeout_s
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
        return not self._busy and not self._queue

    @property
    def client_ip(self) -> str:
        return self._client_ip

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def on_deadline(self) -> None:
        """Called by the server's tick once ``deadline`` has passed: a slow or idle client."""
        self.deadline = _NEVER
        self._ctx.metrics.timeouts += 1
        self.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client_ip = str(peer[0]) if peer else ""
        self._ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = _NEVER
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
        except httptools.HttpParserUpgrade as exc:
            request, transport = self._upgrade, self._transport
            if request is not None and self.is_idle and transport is not None:
                self._ctx.forget(self)  # the tunnel owns the transport from here on
                start_tunnel(
                    self._ctx, transport, request.method, request.target,
                    headers=request.headers, early=data[exc.args[0]:],
                    client_ip=self._client_ip, proto=self._proto,
                )  # fmt: skip
                return
            self._reject(Reject(501, "upgrade_not_supported", "protocol upgrade not supported"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause)
            else:
                self._reject(Reject(400, "malformed_request", "malformed HTTP request"))
            return
        if self._in_head:
            # The parser holds an unfinished header line we have not seen yet: bound it too.
            # A chunk may also carry earlier pipelined requests, hence the slack.
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > 2 * self._config.max_header_bytes:
                self._reject(too_many_header_bytes())

    def eof_received(self) -> bool:
        # The client closed its side. A close and a half-close look the same from here, and
        # like nginx (proxy_ignore_client_abort off) the edge takes both as the client leaving:
        # returning False closes the transport, and connection_lost cancels the upstream work.
        self._eof = True
        return False

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_request()
        self._in_head = True
        if self.is_idle:
            # The head must arrive whole in header_timeout_s from its first byte (a head that
            # starts while earlier requests are answered gets its clock when they are done).
            self.deadline = self._loop.time() + self._config.header_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._config.max_header_bytes:
            raise too_many_header_bytes()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._config.max_header_bytes:
            raise too_many_header_bytes()
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        check_framing(
            self._headers,
            max_body_bytes=self._config.max_body_bytes,
            http_1_0=self._parser.get_http_version() == "1.0",
        )
        self.deadline = self._loop.time() + self._config.client_timeout_s  # body must flow

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._config.max_body_bytes:
            raise too_large()
        self._body_parts.append(body)
        # Like nginx's client_body_timeout: the limit is on silence, not on the whole upload.
        self.deadline = self._loop.time() + self._config.client_timeout_s

    def on_message_complete(self) -> None:
        parser = self._parser
        parts = self._body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        url = self._url
        request = Request(
            parser.get_method().decode("ascii"),
            url.decode("latin-1"),
            self._headers,
            body,
            keep_alive=parser.should_keep_alive(),
            http_1_0=parser.get_http_version() == "1.0",
            bytes_in=self._head_bytes + len(url) + 14 + len(body),
            started=perf_counter(),
        )
        self._reset_request()
        if parser.should_upgrade() and is_websocket_upgrade(request.headers):
            self._upgrade = request  # data_received hands the connection to a tunnel
            return
        self._enqueue(request)

    # -- queue --------------------------------------------------------------------------------

    def _reject(self, reject: Reject) -> None:
        self._rejected = True
        self._enqueue(reject)

    def _enqueue(self, item: Request | Reject) -> None:
        self.deadline = _NEVER
        self._queue.append(item)
        if len(self._queue) >= self._config.max_pipelined_requests and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        waiter = self._idle_waiter
        if waiter is not None:
            self._idle_waiter = None
            waiter.set_result(None)
        elif self._task is None:
            self._task = self._loop.create_task(self._answer_queue())

    async def _answer_queue(self) -> None:
        queue = self._queue
        while True:
            self._busy = True
            while queue:
                item = queue.popleft()
                if self._reading_paused and len(queue) < self._config.max_pipelined_requests:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                if isinstance(item, Reject):
                    self.write_error(item.status, item.code, item.message, keep_alive=False)
                    keep_alive = False
                else:
                    keep_alive = await self._answer(item)
                if not keep_alive or self._transport is None or self._transport.is_closing():
                    self._busy = False
                    self.close()
                    return
            self._busy = False
            if self._ctx.draining or self._eof:
                self.close()
                return
            config = self._config
            wait_s = config.header_timeout_s if self._in_head else config.client_timeout_s
            self.deadline = self._loop.time() + wait_s
            waiter = self._loop.create_future()
            self._idle_waiter = waiter
            await waiter

    # -- answering ----------------------------------------------------------------------------

    async def _answer(self, request: Request) -> bool:
        """Answer one request; returns whether the connection stays open."""
        ctx = self._ctx
        keep_alive = request.keep_alive and not ctx.draining
        method = request.method
        if method == "GET" and request.path in ("/healthz", "/metrics"):
            if request.path == "/healthz":
                return self._answer_health(keep_alive)
            body = ctx.metrics.render()
            self._write_simple(200, ProxyMetrics.content_type, body, keep_alive=keep_alive)
            return keep_alive
        request_id = request_id_of(request.headers) or new_request_id()
        rules = ctx.filter
        if rules is not None:
            refusal = check_filter(rules, method, request.path)
            if refusal is not None:
                self.write_error(
                    refusal.status, refusal.code, refusal.message, keep_alive, request_id
                )
                ctx.log(self, request, request_id, refusal.status, None, 0, None)
                return keep_alive
        headers = upstream_headers(
            request.headers, client_ip=self._client_ip, proto=self._proto, request_id=request_id
        )
        header_rules = ctx.header_rules
        if header_rules is not None:
            headers = apply_header_rules(
                headers, header_rules.request_add, header_rules.request_remove
            )
        if ctx.shares_responses and method in ("GET", "HEAD") and not request.body:
            from photostack.blocks.proxy._shared import answer_shared

            return await answer_shared(self, ctx, request, headers, request_id, keep_alive)
        try:
            response = await ctx.upstream.open(
                method, request.target, headers=headers, body=request.body
            )
        except (NoBackendAvailable, UpstreamError) as exc:
            self.write_upstream_error(exc, keep_alive, request_id)
            ctx.log(self, request, request_id, error_status(exc), None, 0, None)
            return keep_alive
        first_byte = perf_counter()
        try:
            return await self.relay(request, response, keep_alive, request_id, first_byte)
        finally:
            response.close()

    def write_upstream_error(
        self, exc: NoBackendAvailable | UpstreamError, keep_alive: bool, request_id: str
    ) -> None:
        if isinstance(exc, NoBackendAvailable):
            self.write_error(
                503, "no_backend", "no backend available", keep_alive, request_id, retry=True
            )
        elif isinstance(exc, UpstreamTimeout):
            self.write_error(504, "upstream_timeout", "backend timed out", keep_alive, request_id)
        else:
            self.write_error(502, "bad_gateway", "backend failed", keep_alive, request_id)

    def response_headers(
        self, headers: list[tuple[str, str]], request_id: str
    ) -> list[tuple[str, str]]:
        out = downstream_headers(headers, request_id=request_id)
        rules = self._ctx.header_rules
        if rules is not None:
            out = apply_header_rules(out, rules.response_add, rules.response_remove)
        return out

    async def relay(
        self,
        request: Request,
        response: StreamedResponse,
        keep_alive: bool,
        request_id: str,
        first_byte: float,
    ) -> bool:
        status = response.status
        keep_alive = keep_alive and not self._ctx.draining  # drain may have begun meanwhile
        headers = self.response_headers(response.headers, request_id)
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        length = response.content_length
        gzip = self._ctx.config.gzip
        if not no_body and length is not None:
            limit = (
                _SMALL_BODY_BYTES if gzip is None else max(gzip.max_buffer_bytes, _SMALL_BODY_BYTES)
            )
            if length <= limit:
                # The common case: read the small body whole, then one write with the head.
                try:
                    body = await response.read_all(
                        deadline=self._loop.time() + self._config.stream_idle_timeout_s
                    )
                except UpstreamError:
                    self.write_error(502, "bad_gateway", "backend failed", keep_alive, request_id)
                    self._ctx.log(self, request, request_id, 502, response.backend, 0, first_byte)
                    return False
                sent = self.write_whole(request, status, headers, body, keep_alive)
                self._ctx.log(self, request, request_id, status, response.backend, sent, first_byte)
                return keep_alive
        if gzip is not None and is_compressible_type(header_value(headers, "content-type")):
            add_vary(headers)
        chunked = False
        if length is not None and status not in (204, 304):
            headers.append(("Content-Length", str(length)))
        elif not no_body:
            if request.http_1_0:
                keep_alive = False  # HTTP/1.0 has no chunking: the body ends at close
            else:
                chunked = True
                headers.append(("Transfer-Encoding", "chunked"))
        transport = self._transport
        assert transport is not None
        head = head_bytes(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
        transport.write(head)
        self._ctx.metrics.count_response(status)
        sent, ok = await self._pump(response, transport, chunked=chunked, sent=len(head))
        self._ctx.log(self, request, request_id, status, response.backend, sent, first_byte)
        return keep_alive and ok

    async def _pump(
        self, response: StreamedResponse, transport: asyncio.Transport, *, chunked: bool, sent: int
    ) -> tuple[int, bool]:
        """Relay the body as it arrives, pausing while the client's socket is full.

        Returns the bytes written and whether the body went through whole.
        """
        timeout_s = self._config.stream_idle_timeout_s
        while True:
            try:
                data = await response.read_chunk(timeout_s=timeout_s)
            except UpstreamError:
                return sent, False  # head already sent: all we can do is cut the connection
            if data is None:
                break
            sent += len(data)
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                transport.write(data)
            if self._write_paused:
                await self._drain()
            if transport.is_closing():
                return sent, False
        if chunked:
            transport.write(b"0\r\n\r\n")
            sent += 5
        return sent, True

    def write_whole(
        self,
        request: Request,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        *,
        head_length: int | None = None,
    ) -> int:
        """Write a response whose body is in memory (gzipping it when allowed), in one write.

        ``headers`` are downstream headers without framing. Returns the bytes written.
        """
        gzip = self._ctx.config.gzip
        if gzip is not None and is_compressible_type(header_value(headers, "content-type")):
            add_vary(headers)
            if (
                request.method != "HEAD"
                and is_compressible(status, headers, len(body), gzip)
                and accepts_gzip(header_value(request.headers, "accept-encoding"))
            ):
                body = compress(body, gzip.level)
                headers.append(("Content-Encoding", "gzip"))
        if request.method == "HEAD":
            if head_length is not None:
                headers.append(("Content-Length", str(head_length)))
            body = b""
        elif status not in (204, 304) and status >= 200:
            headers.append(("Content-Length", str(len(body))))
        data = head_bytes(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
        if body:
            data += body
        if self._transport is not None:
            self._transport.write(data)
        self._ctx.metrics.count_response(status)
        return len(data)

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

    def _write_simple(
        self, status: int, content_type: str, body: bytes, *, keep_alive: bool
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        data = head_bytes(status, headers, keep_alive=keep_alive) + body
        if self._transport is not None:
            self._transport.write(data)
        self._ctx.metrics.count_response(status)

    def write_error(
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
        data = head_bytes(status, headers, keep_alive=keep_alive) + body
        if self._transport is not None:
            self._transport.write(data)
        self._ctx.metrics.count_response(status)


def error_status(exc: NoBackendAvailable | UpstreamError) -> int:
    if isinstance(exc, NoBackendAvailable):
        return 503
    return 504 if isinstance(exc, UpstreamTimeout) else 502
