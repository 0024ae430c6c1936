"""Keep-alive HTTP/1.1 connections to one backend: an asyncio Protocol and a bounded pool.

The protocol parses responses with httptools and delivers them in one of two ways:

- **pull** (``read_head`` / ``read_body``): the body is buffered piece by piece for a coroutine
  reader, the socket pausing when the reader falls behind; used by ``StreamedResponse``.
- **push** (a ``ConnectionSink`` set on ``sink``): the parser's callbacks hand the head and each
  body piece straight to the sink, with no future or task; used by the callback ``Exchange``.
  The sink applies backpressure with ``pause_reading`` / ``resume_reading``.

A request body may be written after the head (``write_body``), waiting with ``drain`` while the
socket's write buffer is above its high-water mark. Errors are translated here, at the
boundary, into the balancer's families; ``request_sent`` is False only when no byte can have
reached the backend.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from photostack.blocks.balancer._errors import (
    IllegalTransition,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from photostack.blocks.balancer._health import Backend

__all__ = ["ConnState", "ConnectionSink", "ResponseHead", "UpstreamConnection"]

# Pull mode: pause reading from the backend when this much body waits for the consumer.
_HIGH_WATER_BYTES = 256 * 1024


@dataclass(slots=True)
class ResponseHead:
    """A response's status and headers; a value (do not mutate). Not ``frozen``: one is built
    per request, and a frozen dataclass costs ~4x to construct."""

    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    chunked: bool


class ConnectionSink(Protocol):
    """Where a connection in push mode delivers one response (see ``UpstreamConnection.sink``).

    ``on_end`` and ``on_error`` are called after the parser returns, so the sink may hand the
    connection back to its pool (and even reuse it) from there.
    """

    def on_head(self, head: ResponseHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_error(self, error: UpstreamError) -> None: ...


class ConnState(enum.Enum):
    IDLE = "idle"  # in the pool, no request outstanding
    BUSY = "busy"  # a request written, its response not yet fully read
    CLOSED = "closed"


_CONN_TRANSITIONS = frozenset(
    {
        (ConnState.IDLE, ConnState.BUSY),
        (ConnState.BUSY, ConnState.IDLE),
        (ConnState.IDLE, ConnState.CLOSED),
        (ConnState.BUSY, ConnState.CLOSED),
    }
)
_IDLE = ConnState.IDLE
_BUSY = ConnState.BUSY


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, one request at a time (no pipelining upstream)."""

    def __init__(self, backend: Backend, on_close: Callable[[UpstreamConnection], None]) -> None:
        self.backend = backend
        self.state = ConnState.IDLE
        self.requests_sent = 0
        self.idle_since = 0.0
        # Push mode: set by the caller before ``send``; cleared when the response is delivered.
        self.sink: ConnectionSink | None = None
        self._on_close = on_close
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._closed = self.loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._reset_exchange(head_only=False)

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.backend.name} state={self.state.name}>"

    def _reset_exchange(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._headers: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._informational = False
        if self._chunks:
            self._chunks = deque()
        self._buffered = 0
        self._complete = False
        self._until_close = False
        self._keep_alive = True
        self._error: UpstreamError | None = None
        self._reading_paused = False
        self._delivered = False  # push mode: on_end / on_error called
        self._abandoned = False  # the request body was not sent whole (an early answer)
        self.body_sender: asyncio.Task[None] | None = None  # still sending it after an early answer

    def _transition(self, target: ConnState) -> None:
        if (self.state, target) not in _CONN_TRANSITIONS:
            raise IllegalTransition(f"{self!r} cannot become {target.name}")
        self.state = target

    # -- used by the pool and the exchange ------------------------------------------------

    @property
    def is_reusable(self) -> bool:
        """The last response was read whole and both sides want to keep the connection."""
        transport = self._transport
        return (
            self.state is _BUSY
            and self._complete
            and self._keep_alive
            and self._error is None
            and not self._abandoned
            and not self._chunks
            and transport is not None
            and not transport.is_closing()
        )

    def mark_idle(self, now: float) -> None:
        if self.state is not _BUSY:  # the one edge into IDLE in _CONN_TRANSITIONS
            raise IllegalTransition(f"{self!r} cannot become IDLE")
        self.state = _IDLE
        self.idle_since = now

    def send(self, data: bytes, *, head_only: bool) -> None:
        """Write one request. Raises UpstreamConnectError (not sent) if the socket is known dead."""
        transport = self._transport
        if self.state is not _IDLE or transport is None or transport.is_closing():
            raise UpstreamConnectError(
                "pooled connection closed before use", backend=self.backend.name, request_sent=False
            )
        self.state = _BUSY  # IDLE -> BUSY, checked just above
        self._reset_exchange(head_only=head_only)
        if self._parser_dirty:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self.requests_sent += 1
        transport.write(data)

    def write_body(self, data: bytes) -> None:
        """More request body after ``send``. Raises UpstreamConnectError if the socket died."""
        transport = self._transport
        if self._error is not None:
            raise self._error
        if self.state is not _BUSY or transport is None or transport.is_closing():
            raise UpstreamConnectError(
                "connection closed while sending the body",
                backend=self.backend.name,
                request_sent=True,
            )
        transport.write(data)

    def adopt_body(self, sender: asyncio.Task[None]) -> None:
        """The backend answered while the request body was still being sent by ``sender``: it
        goes on in the background until ``stop_body`` (at the response's end)."""
        self.body_sender = sender
        sender.add_done_callback(self._body_done)

    def _body_done(self, sender: asyncio.Task[None]) -> None:
        if sender.cancelled() or sender.exception() is not None:
            self._abandoned = True  # the body was not sent whole: no request may follow

    def stop_body(self) -> None:
        """Stop a body still being sent after an early answer. A connection whose body was not
        sent whole cannot carry another request: it is aborted (and never pooled again)."""
        sender, self.body_sender = self.body_sender, None
        if sender is not None and not sender.done():
            self._abandoned = True
            sender.cancel()
        if self._abandoned and self._transport is not None:
            # Not close(): that would wait to flush body bytes a backend may never read.
            self._transport.abort()

    @property
    def write_paused(self) -> bool:
        """The socket's write buffer is above its high-water mark: ``await drain()``."""
        return self._write_paused

    async def drain(self) -> None:
        """Wait until the write buffer is below its low-water mark (or the connection failed)."""
        while self._write_paused and self._error is None and self.state is _BUSY:
            waiter = self.loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self._error is not None:
            raise self._error

    async def read_head(self) -> ResponseHead:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    def time_out_head(self) -> None:
        """The response head did not arrive in time: fail the reader (a timer calls this)."""
        if self._head is None:
            self._fail(
                UpstreamTimeout("no response in time", backend=self.backend.name, request_sent=True)
            )

    def body_ready(self) -> bool:
        """Whether ``read_body`` would return at once (data, the end, or an error)."""
        return bool(self._chunks) or self._complete or self._error is not None

    async def read_body(self) -> bytes | None:
        """Every body byte received so far (waiting for some), or None once the body is done."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._reading_paused and self._transport is not None:
                    self._reading_paused = False
                    self._transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            await self._wait()

    def pause_reading(self) -> None:
        """Push mode backpressure: stop reading the backend until ``resume_reading``."""
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def _wait(self) -> None:
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        self._wake_drain()

    def _deliver(self) -> None:
        """Push mode: report the end or the error once, outside the parser's callbacks."""
        sink = self.sink
        if sink is None or self._delivered:
            return
        if self._error is not None:
            self._delivered = True
            self.sink = None
            sink.on_error(self._error)
        elif self._complete:
            self._delivered = True
            self.sink = None
            sink.on_end()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.state is not _BUSY or self._complete:
            # Bytes nobody asked for (an early 408, garbage): the connection is unusable.
            self._fail(self._protocol_error("unsolicited bytes from backend"))
            self.close()
        else:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._fail(self._protocol_error(f"invalid HTTP response: {exc}"))
                self.close()
        if self.sink is not None and (self._complete or self._error is not None):
            self._deliver()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports what it means

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        was_busy = self.state is _BUSY
        self.state = ConnState.CLOSED
        if was_busy and not self._complete:
            if self._until_close and self._head is not None and exc is None:
                # A response without length or chunking ends when the backend closes.
                self._complete = True
                self._keep_alive = False
                self._wake()
            else:
                reason = f"connection lost ({exc})" if exc else "connection closed by backend"
                # Bytes were written: whether the backend acted on them is unknowable.
                self._fail(
                    UpstreamConnectError(reason, backend=self.backend.name, request_sent=True)
                )
        self._wake_drain()
        if not self._closed.done():
            self._closed.set_result(None)
        self._on_close(self)
        if self.sink is not None:
            self._deliver()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and friends: wait for the real answer
            self._headers = []
            return
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            size = len(name)  # cheaper than lower-casing every name
            if size == 14 and name.lower() == "content-length":
                content_length = int(value)
            elif size == 17 and name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        no_body = self._head_only or status in (204, 304)
        self._until_close = not no_body and content_length is None and not chunked
        head = self._head = ResponseHead(status, self._headers, content_length, chunked)
        if self._head_only:
            # httptools cannot be told a HEAD response has no body; finish here and start the
            # next exchange on a fresh parser.
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
            self._parser_dirty = True
        sink = self.sink
        if sink is not None:
            sink.on_head(head)
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        sink = self.sink
        if sink is not None:
            sink.on_body(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._head_only:
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        if self.sink is None:
            self._wake()

    def _protocol_error(self, message: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(message, backend=self.backend.name, request_sent=True)
