"""A bounded pool of keep-alive connections to one backend."""

from __future__ import annotations

import asyncio
from collections import deque

from photostack.blocks.balancer._connection import ConnState, UpstreamConnection
from photostack.blocks.balancer._errors import PoolTimeout, UpstreamConnectError, UpstreamTimeout
from photostack.blocks.balancer._health import Backend

__all__ = ["ConnectionPool"]

_IDLE = ConnState.IDLE


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

    def take_idle(self, now: float) -> UpstreamConnection | None:
        """A pooled connection ready for one request, or None (then ``acquire`` one)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.state is _IDLE and now - conn.idle_since < self._idle_timeout_s:
                return conn
            conn.close()
        return None

    async def acquire(self, deadline: float) -> UpstreamConnection:
        """A connection ready for one request, by ``deadline`` (event-loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamConnectError(
                    "connection pool closed", backend=self.backend.name, request_sent=False
                )
            conn = self.take_idle(loop.time())
            if conn is not None:
                return conn
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

    def release(self, conn: UpstreamConnection, now: float | None = None) -> None:
        """Give back a connection whose response was read whole; keeps it if reusable.

        ``now`` (event-loop time) dates the start of its idleness; a slightly early time only
        makes the pool drop it a little sooner.
        """
        if conn.body_sender is not None:
            conn.stop_body()
        if self._closed:
            conn.close()
            return
        if conn.state is _IDLE:  # acquired, never used
            conn.idle_since = conn.loop.time() if now is None else now
        elif conn.is_reusable:
            conn.mark_idle(conn.loop.time() if now is None else now)
        else:
            conn.close()
            return
        self._idle.append(conn)
        if self._waiters:
            self._notify()

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection in an unknown state (error, timeout, body left unread)."""
        conn.sink = None
        conn.stop_body()
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
