"""Keep-alive HTTP/1.1 connections to one backend: an asyncio Protocol and a bounded pool.

The protocol parses responses with httptools and hands the body out piece by piece, pausing the
socket when the reader falls behind, so a long streamed response (Server-Sent Events) flows
through without being buffered whole. Errors are translated here, at the boundary, into the
balancer's families; ``request_sent`` is False only when no byte can have reached the backend.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from photostack.blocks.balancer._errors import (
    IllegalTransition,
    PoolTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from photostack.blocks.balancer._health import Backend

__all__ = ["ConnState", "ConnectionPool", "ResponseHead", "UpstreamConnection"]

# Pause reading from the backend when this much body is waiting for the consumer.
_HIGH_WATER_BYTES = 256 * 1024
_LOW_WATER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]
    content_length: int | None
    chunked: bool


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


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, one request at a time (no pipelining upstream)."""

    def __init__(self, backend: Backend, on_close: Callable[[UpstreamConnection], None]) -> None:
        self.backend = backend
        self.state = ConnState.IDLE
        self.requests_sent = 0
        self.idle_since = 0.0
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._closed = self._loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False
        self._waiter: asyncio.Future[None] | None = None
        self._reset_exchange(head_only=False)

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.backend.name} state={self.state.name}>"

    def _reset_exchange(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._headers: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._informational = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._until_close = False
        self._keep_alive = True
        self._error: UpstreamError | None = None
        self._reading_paused = False

    def _transition(self, target: ConnState) -> None:
        if (self.state, target) not in _CONN_TRANSITIONS:
            raise IllegalTransition(f"{self!r} cannot become {target.name}")
        self.state = target

    # -- used by the pool and the exchange ------------------------------------------------

    @property
    def is_reusable(self) -> bool:
        """The last response was read whole and both sides want to keep the connection."""
        return (
            self.state is not ConnState.CLOSED
            and self._complete
            and self._keep_alive
            and self._error is None
            and not self._chunks
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def mark_idle(self, now: float) -> None:
        self._transition(ConnState.IDLE)
        self.idle_since = now

    def send(self, data: bytes, *, head_only: bool) -> None:
        """Write one request. Raises UpstreamConnectError (not sent) if the socket is known dead."""
        transport = self._transport
        if self.state is not ConnState.IDLE or transport is None or transport.is_closing():
            raise UpstreamConnectError(
                "pooled connection closed before use", backend=self.backend.name, request_sent=False
            )
        self._transition(ConnState.BUSY)
        self._reset_exchange(head_only=head_only)
        if self._parser_dirty:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self.requests_sent += 1
        transport.write(data)

    async def read_head(self) -> ResponseHead:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

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

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.state is not ConnState.BUSY or self._complete:
            # Bytes nobody asked for (an early 408, garbage): the connection is unusable.
            self._fail(self._protocol_error("unsolicited bytes from backend"))
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(self._protocol_error(f"invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports what it means

    def connection_lost(self, exc: Exception | None) -> None:
        was_busy = self.state is ConnState.BUSY
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
        if not self._closed.done():
            self._closed.set_result(None)
        self._on_close(self)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue and friends: wait for the real answer
            return
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                content_length = int(value)
            elif lowered == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        no_body = self._head_only or status in (204, 304)
        self._until_close = not no_body and content_length is None and not chunked
        self._head = ResponseHead(status, self._headers, content_length, chunked)
        if self._head_only:
            # httptools cannot be told a HEAD response has no body; finish here and start the
            # next exchange on a fresh parser.
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
            self._parser_dirty = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only:
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
        self._wake()

    def _protocol_error(self, message: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(message, backend=self.backend.name, request_sent=True)


class ConnectionPool:
    """At most ``max_connections`` keep-alive connections to one backend, reused LIFO.

    Idle connections older than ``idle_timeout_s`` are dropped instead of reused: a backend
    closes idle connections on its own timer, and a request written just as it does so may or
    may not have been seen, which makes non-idempotent requests unretriable.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_connections: int,
        connect_timeout_s: float,
        idle_timeout_s: float,
    ) -> None:
        self.backend = backend
        self._max = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.backend.name} open={len(self._all)} idle={len(self._idle)}>"

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def acquire(self, deadline: float) -> UpstreamConnection:
        """A connection ready for one request, by ``deadline`` (event-loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamConnectError(
                    "connection pool closed", backend=self.backend.name, request_sent=False
                )
            now = loop.time()
            while self._idle:
                conn = self._idle.pop()
                if conn.state is ConnState.IDLE and now - conn.idle_since < self._idle_timeout_s:
                    return conn
                conn.close()
            if len(self._all) + self._connecting < self._max:
                return await self._connect(loop, deadline)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError as exc:
                raise PoolTimeout(
                    "every pooled connection stayed busy",
                    backend=self.backend.name,
                    request_sent=False,
                ) from exc
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> UpstreamConnection:
        self._connecting += 1
        name = self.backend.name
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout_s)):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self.backend, self._forget),
                    self.backend.host,
                    self.backend.port,
                )
            self._all.add(conn)
        except TimeoutError as exc:
            raise UpstreamTimeout("connect timed out", backend=name, request_sent=False) from exc
        except OSError as exc:
            raise UpstreamConnectError(
                f"connect failed: {exc}", backend=name, request_sent=False
            ) from exc
        finally:
            self._connecting -= 1
            self._notify()
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose response was read whole; keeps it if reusable."""
        if conn.is_reusable and not self._closed:
            conn.mark_idle(asyncio.get_running_loop().time())
            self._idle.append(conn)
            self._notify()
        else:
            conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection in an unknown state (error, timeout, body left unread)."""
        conn.close()

    async def aclose(self) -> None:
        self._closed = True
        conns = list(self._all)
        for conn in conns:
            conn.close()
        self._notify_all()
        await asyncio.gather(*(conn.wait_closed() for conn in conns))

    def _forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _notify_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
