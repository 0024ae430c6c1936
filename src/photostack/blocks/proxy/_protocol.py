"""One client connection to the edge: httptools parsing, in-order answers, streamed relaying.

Requests are parsed as bytes arrive and answered in order, so pipelined requests get their
responses in the order they were sent. Anything the edge rejects itself (limits, malformed or
ambiguous framing) is queued too, after the requests before it, and closes the connection
once answered.

The common request (body in memory, Host present, no micro-cache or collapsing) is answered
by callbacks (``_relay``): parse, choose a backend, one write upstream, and the upstream
parser's callbacks write the response: no coroutine, task, future or timer per request.
Deadlines (slow heads, idle keep-alive, a silent body, a backend that does not answer) are
checked by the server's one housekeeping tick. Other requests (``_answer``) run as a task.

A request body above ``BODY_BUFFER_BYTES`` (or a chunked one that grows past it) is not held
whole: the request goes upstream while its body is still arriving (``BodyStream``), and the
client is read only as fast as the backend takes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, cast

import httptools

from photostack.blocks.balancer import Exchange
from photostack.blocks.proxy._answer import answer_general
from photostack.blocks.proxy._body import BodyStream
from photostack.blocks.proxy._headers import (
    new_request_id,
    request_id_of,
)
from photostack.blocks.proxy._metrics import ProxyMetrics
from photostack.blocks.proxy._policy import (
    check_filter,
)
from photostack.blocks.proxy._relay import Relay
from photostack.blocks.proxy._request import (
    Reject,
    Request,
    check_framing,
    too_large,
    too_many_header_bytes,
)
from photostack.blocks.proxy._respond import ResponseWriter
from photostack.blocks.proxy._tunnel import is_websocket_upgrade, start_tunnel

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext

__all__ = ["BODY_BUFFER_BYTES", "ClientConnection", "Request"]

log = logging.getLogger("photostack.proxy")

_NEVER = math.inf
# Lingering close (nginx's lingering_time / lingering_timeout): after answering a request whose
# body is still arriving, the edge half-closes and reads (and drops) what the client still
# sends, so that closing does not reset the connection before the client has read the answer.
LINGER_TIME_S = 30.0
LINGER_TIMEOUT_S = 5.0
# A request body up to this size is read whole before it goes upstream (so that a failed try
# can be repeated); a longer one is streamed.
BODY_BUFFER_BYTES = 64 * 1024


class ClientConnection(ResponseWriter, asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, *, proto: str) -> None:
        self.ctx = ctx
        self._config = ctx.config
        self.proto = proto
        self._loop = ctx.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.client_ip = ""
        self._queue: deque[Request | Reject] = deque()
        self._busy = False  # a request is being answered
        self._dispatching = False
        self._relay = Relay(self, ctx)
        self.exchange: Exchange | None = None  # the fast path's request in flight upstream
        self._task: asyncio.Task[None] | None = None  # the general path's request in flight
        self._rejected = False
        self._linger_until = 0.0  # lingering (see LINGER_TIME_S) until then, if not 0
        self._paused_pipeline = False
        self._paused_body = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._upgrade: Request | None = None  # a WebSocket upgrade request, for the tunnel
        self._stream: BodyStream | None = None  # the body being streamed upstream
        # Raw forwarding (Request.raw): the bytes of the current read, whether the parser was
        # between requests when it began, and how many requests began in it.
        self._chunk = b""
        self._fresh = False
        self._between = True
        self._begun = 0
        # When the connection must have made progress (event-loop time); the server's tick
        # closes it past this. A new connection must send a request head in header_timeout_s.
        self.deadline = ctx.head_deadline
        self._reset_request()

    def __repr__(self) -> str:
        return f"<ClientConnection {self.client_ip} queued={len(self._queue)}>"

    def _reset_request(self) -> None:
        self._in_head = False  # between on_message_begin and on_headers_complete
        self._head_bytes = 0  # parsed request line and headers
        self._raw_head_bytes = 0  # bytes received while inside a head (parser-held included)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body_parts: list[bytes] = []
        self._body_bytes = 0
        self._content_length: int | None = None
        self._framing = False  # a Content-Length or Transfer-Encoding header was seen

    @property
    def is_idle(self) -> bool:
        return not self._busy and not self._queue

    @property
    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def on_deadline(self) -> None:
        """Called by the server's tick once ``deadline`` has passed: a slow or idle client."""
        self.deadline = _NEVER
        if self._linger_until:
            self.close()  # the answer went out long ago; the rest of the body is not wanted
            return
        self.ctx.metrics.timeouts += 1
        self.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else ""
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = _NEVER
        # Nobody to answer: stop the upstream work (the backend sees its connection close).
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._stream is not None:
            self._stream.fail(ConnectionResetError("client closed the connection"))
        self._wake_writer()
        self.ctx.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_reading()
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            if self._linger_until:
                now = self._loop.time()
                self.deadline = min(self._linger_until, now + LINGER_TIMEOUT_S)
            return
        self._chunk = data
        self._fresh = self._between
        self._begun = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            request, transport = self._upgrade, self._transport
            if request is not None and self.is_idle and transport is not None:
                self.ctx.forget(self)  # the tunnel owns the transport from here on
                start_tunnel(
                    self.ctx, transport, request.method, request.target,
                    headers=request.headers, early=data[exc.args[0]:],
                    client_ip=self.client_ip, proto=self.proto,
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
        # _reset_request(), inlined: this runs for every request
        self._head_bytes = self._raw_head_bytes = self._body_bytes = 0
        self._url = b""
        self._headers = []
        self._body_parts = []
        self._content_length = None
        self._framing = False
        self._in_head = True
        self._between = False
        self._begun += 1
        if not self._busy and not self._queue:
            # The head must arrive whole in header_timeout_s from its first byte (a head that
            # starts while earlier requests are answered gets its clock when they are done).
            self.deadline = self.ctx.head_deadline

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._config.max_header_bytes:
            raise too_many_header_bytes()

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        self._head_bytes += size + len(value) + 4
        if self._head_bytes > self._config.max_header_bytes:
            raise too_many_header_bytes()
        if size in {14, 17}:  # as long as content-length or transfer-encoding
            self._framing = True
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        # Without Content-Length or Transfer-Encoding there is nothing to check and no body.
        if self._framing:
            self._content_length = check_framing(
                self._headers,
                max_body_bytes=self._config.max_body_bytes,
                http_1_0=self._parser.get_http_version() == "1.0",
            )
            self.deadline = self.ctx.idle_deadline  # the body must flow

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._config.max_body_bytes:
            raise too_large()
        # Like nginx's client_body_timeout: the limit is on silence, not on the whole upload.
        self.deadline = self.ctx.idle_deadline
        stream = self._stream
        if stream is not None:
            stream.feed(body)
            return
        self._body_parts.append(body)
        if self._body_bytes > BODY_BUFFER_BYTES:
            self._start_stream()

    def on_message_complete(self) -> None:
        parser = self._parser
        self._between = True
        stream = self._stream
        if stream is not None:  # queued already; its body is whole now
            self._stream = None
            stream.finish()
            self.deadline = _NEVER
            return
        parts = self._body_parts
        body = (parts[0] if len(parts) == 1 else b"".join(parts)) if parts else b""
        url = self._url
        method = parser.get_method()
        version = parser.get_http_version()
        raw: bytes | None = None
        if not parts and self._fresh and self._begun == 1 and version == "1.1":
            # This read is this request alone, from its first byte (the parser was between
            # requests when the read began, and only this one began in it) to its last, when
            # its length is that of the canonical form: "METHOD SP target SP HTTP/1.1 CRLF",
            # "Name: value CRLF" per header (_head_bytes), CRLF.
            chunk = self._chunk
            if (
                len(chunk) == len(method) + len(url) + 14 + self._head_bytes
                and chunk.startswith(method)
                and chunk.find(b"\r\n\r\n") + 4 == len(chunk)  # the head ends the read
            ):
                raw = chunk
        request = Request(
            method.decode("ascii"),
            url.decode("latin-1"),
            self._headers,
            body,
            parser.should_keep_alive(),
            version == "1.0",
            self._head_bytes + len(url) + 14 + len(body),
            perf_counter(),
            None,
            raw,
        )
        # (on_message_begin resets the per-request state for the next one)
        if parser.should_upgrade() and is_websocket_upgrade(request.headers):
            self._upgrade = request  # data_received hands the connection to a tunnel
            return
        self._enqueue(request)

    def _start_stream(self) -> None:
        """The body outgrew the buffer: queue the request now and stream the rest upstream."""
        parser = self._parser
        stream = BodyStream(self, self._loop, self._body_parts)
        self._body_parts = []
        self._stream = stream
        url = self._url
        request = Request(
            parser.get_method().decode("ascii"),
            url.decode("latin-1"),
            self._headers,
            stream,
            keep_alive=parser.should_keep_alive(),
            http_1_0=parser.get_http_version() == "1.0",
            bytes_in=self._head_bytes + len(url) + 14 + self._body_bytes,
            started=perf_counter(),
            body_length=self._content_length,
        )
        deadline = self.deadline
        self._enqueue(request)
        self.deadline = deadline  # the client must keep sending its body

    # -- reading flow control -----------------------------------------------------------------

    def pause_body(self) -> None:
        """The upstream has not taken the streamed body yet: stop reading the client."""
        self._paused_body = True
        self._set_reading()

    def resume_body(self) -> None:
        self._paused_body = False
        self._set_reading()

    def _set_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._paused_body or self._paused_pipeline:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- answering in order -------------------------------------------------------------------

    def _reject(self, reject: Reject) -> None:
        self._rejected = True
        stream, self._stream = self._stream, None
        if stream is not None:
            # The request is being answered already: its answer becomes this refusal.
            stream.fail(reject)
            return
        self._enqueue(reject)

    def _enqueue(self, item: Request | Reject) -> None:
        self.deadline = _NEVER
        if not self._busy and not self._queue and type(item) is Request:
            # Nothing before it (the usual keep-alive request): answer at once.
            self._busy = True
            self._answer(item)
            return
        self._queue.append(item)
        if len(self._queue) >= self._config.max_pipelined_requests and not self._paused_pipeline:
            self._paused_pipeline = True
            self._set_reading()
        if not self._busy:
            self._dispatch()

    def _dispatch(self) -> None:
        """Answer queued requests in order until one waits on a backend or the queue is empty."""
        if self._dispatching:
            return  # an answer finished synchronously: the loop below goes on
        self._dispatching = True
        try:
            queue = self._queue
            while queue and not self._busy:
                if self.is_closing:
                    return
                item = queue.popleft()
                if self._paused_pipeline and len(queue) < self._config.max_pipelined_requests:
                    self._paused_pipeline = False
                    self._set_reading()
                if isinstance(item, Reject):
                    self.write_error(item.status, item.code, item.message, keep_alive=False)
                    self.close()
                    return
                self._busy = True
                self._answer(item)
            if not self._busy and not self.is_closing:
                self._went_idle()
        finally:
            self._dispatching = False

    def finished(self, keep_alive: bool) -> None:
        """The current request is answered; go on with the next one, or close."""
        self._busy = False
        self.exchange = None
        self._task = None
        transport = self._transport
        if not keep_alive or transport is None or transport.is_closing():
            if self._stream is not None or self._rejected:
                self._linger()  # answered while the body was still coming
            else:
                self.close()
            return
        if self._dispatching:
            return  # the dispatch loop goes on
        if self._queue:
            self._dispatch()
        else:
            self._went_idle()

    def _linger(self) -> None:
        """Close once the client has had the answer: half-close, then drop what it still
        sends until it closes too, or for LINGER_TIMEOUT_S of silence, LINGER_TIME_S at most.

        Closing at once with unread bytes in the socket would reset the connection, and the
        client could lose the answer before reading it (e.g. a 413 for an upload).
        """
        transport = self._transport
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail(ConnectionResetError("answered before the request body was whole"))
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        self._rejected = True  # data_received drops what comes now
        now = self._loop.time()
        self._linger_until = now + LINGER_TIME_S
        self.deadline = now + LINGER_TIMEOUT_S
        self._paused_body = self._paused_pipeline = False
        self._queue.clear()
        transport.write_eof()  # after what is buffered: the client reads the answer, then EOF
        transport.resume_reading()

    def _went_idle(self) -> None:
        if self.ctx.draining or self._eof:
            self.close()
            return
        if self._stream is None:
            ctx = self.ctx
            self.deadline = ctx.head_deadline if self._in_head else ctx.idle_deadline

    def _answer(self, request: Request) -> None:
        ctx = self.ctx
        keep_alive = request.keep_alive and not ctx.draining
        method = request.method
        if method == "GET" and request.path in ("/healthz", "/metrics"):
            if request.path == "/healthz":
                keep_alive = self._answer_health(keep_alive)
            else:
                body = ctx.metrics.render()
                self._write_simple(200, ProxyMetrics.content_type, body, keep_alive=keep_alive)
            self.finished(keep_alive)
            return
        rules = ctx.filter
        if rules is not None:
            refusal = check_filter(rules, method, request.path)
            if refusal is not None:
                if isinstance(request.body, BodyStream):
                    keep_alive = False  # its body is still coming: no way to skip it
                request_id = request_id_of(request.headers) or new_request_id()
                self.write_error(
                    refusal.status, refusal.code, refusal.message, keep_alive, request_id
                )
                ctx.log(self, request, request_id, refusal.status, None, 0, None)
                self.finished(keep_alive)
                return
        content = request.body
        if (
            isinstance(content, bytes)
            and not (ctx.shares_responses and not content and method in ("GET", "HEAD"))
            and self._relay.start(request, keep_alive)
        ):
            return
        request_id = request_id_of(request.headers) or new_request_id()
        self._task = self._loop.create_task(self._answer_general(request, request_id, keep_alive))

    async def _answer_general(self, request: Request, request_id: str, keep_alive: bool) -> None:
        try:
            keep = await answer_general(self, request, request_id, keep_alive)
        except Exception:  # a bug must not leave the client waiting forever
            log.exception("answering %s %s failed", request.method, request.path)
            keep = False
        self.finished(keep)
