"""One request through the upstream core by callbacks: the edge proxy's hot path.

``Upstream.exchange(...)`` returns an ``Exchange``; ``start()`` chooses a backend, writes the
already-encoded request on an idle pooled connection in one ``transport.write``, and the
connection's parser callbacks deliver the response to an ``ExchangeSink`` as it arrives. No
coroutine, task, future, timer or ``asyncio.timeout`` is created per request while a pooled
connection is idle; a new connection is opened by a task (once per connection, not per request).

The retry rule is ``Upstream.open``'s, decision for decision (``retry_verdict``): a failure before
the response head is retried on another backend when the phase, method, ``Idempotency-Key``,
deadline and retry budget allow it; once the head has arrived (and the caller may have relayed
it) an error is final.

Deadlines are not timers: ``deadline`` (event-loop time) says when the exchange wants to be looked
at, and the owner's housekeeping tick calls ``expire(now)`` once it has passed. Before the
response head that is the try's deadline (``try_timeout_s``, within ``request_timeout_s``); while
the body flows it bounds silence to ``body_timeout_s`` (measured by progress between ticks).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from photostack.blocks.balancer._connection import ResponseHead, UpstreamConnection
from photostack.blocks.balancer._connpool import ConnectionPool
from photostack.blocks.balancer._errors import NoBackendAvailable, UpstreamError, UpstreamTimeout
from photostack.blocks.balancer._health import Backend
from photostack.blocks.balancer._retry import (
    FailureStage,
    RetryVerdict,
    failure_reason,
    max_tries_for,
    retry_verdict,
)

if TYPE_CHECKING:
    from photostack.blocks.balancer._upstream import Upstream

__all__ = ["Exchange", "ExchangeSink"]

Failure = NoBackendAvailable | UpstreamError


class ExchangeSink(Protocol):
    """Receives one exchange's outcome: a head, body pieces, then the end; or one error.

    ``on_response_error`` may come instead of a head (every try failed: NoBackendAvailable,
    UpstreamTimeout, ...) or after it (the body broke off); it may come from inside ``start()``.
    """

    def on_response_head(self, head: ResponseHead, backend: Backend) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_response_error(self, error: Failure) -> None: ...


class Exchange:
    """One request and its response, driven by connection callbacks (see the module doc)."""

    __slots__ = (
        "_backend",
        "_body_timeout_s",
        "_conn",
        "_conn_pool",
        "_connecting",
        "_done",
        "_head_only",
        "_headers",
        "_held",
        "_key",
        "_last",
        "_loop",
        "_method",
        "_now",
        "_quiet_since",
        "_request",
        "_seen",
        "_sink",
        "_total_deadline",
        "_tried",
        "_up",
        "connect_s",
        "deadline",
        "head",
        "progress",
    )

    def __init__(
        self,
        upstream: Upstream,
        sink: ExchangeSink,
        method: str,
        headers: Sequence[tuple[str, str]],
        request: bytes,
        *,
        key: bytes | None,
        body_timeout_s: float,
    ) -> None:
        self._up = upstream
        self._loop = upstream.loop
        self._sink = sink
        self._method = method
        self._headers = headers
        self._request = request
        self._head_only = method == "HEAD"
        self._key = key
        self._body_timeout_s = body_timeout_s
        self._tried: list[str] = []
        self._backend: Backend | None = None
        self._held = False  # the backend's in-flight count includes this exchange
        self._conn: UpstreamConnection | None = None
        self._conn_pool: ConnectionPool | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._last: UpstreamError | None = None
        self._done = False
        self._now = 0.0  # event-loop time the current try started
        self._total_deadline = math.inf
        self._quiet_since = 0.0
        self._seen = 0
        self.deadline = math.inf
        # Seconds the current try took to obtain its upstream connection: 0.0 for an idle
        # pooled one, the connect (or the wait for a busy pool) otherwise; None before one.
        self.connect_s: float | None = None
        self.head: ResponseHead | None = None
        self.progress = 0  # body pieces relayed; the tick compares it to detect silence

    def __repr__(self) -> str:
        where = self._backend.name if self._backend is not None else "-"
        phase = "done" if self._done else ("body" if self.head is not None else "head")
        return f"<Exchange {self._method} {where} {phase}>"

    @property
    def backend(self) -> str | None:
        return self._backend.name if self._backend is not None else None

    @property
    def done(self) -> bool:
        return self._done

    # -- driving ----------------------------------------------------------------------------

    def start(self, timeout_s: float) -> None:
        """Send the first try; ``timeout_s`` bounds everything up to the response head."""
        now = self._loop.time()
        self._total_deadline = now + timeout_s
        self._up.budget.record_request()
        self._try(now)

    def pause_reading(self) -> None:
        """Backpressure from the sink: stop reading the backend's response for now."""
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def cancel(self) -> None:
        """The requester went away: drop the upstream connection (the backend sees it close)."""
        if self._done:
            return
        self._done = True
        self.deadline = math.inf
        conn, self._conn = self._conn, None
        if conn is not None and self._conn_pool is not None:
            self._conn_pool.discard(conn)
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
        self._unhold()

    def expire(self, now: float) -> None:
        """The owner's tick saw ``deadline`` pass: time the try out, or check body progress."""
        if self._done:
            return
        conn = self._conn
        if conn is None:
            return  # connecting: the connect task has its own deadline
        if self.head is None:
            self._conn = None
            self._discard(conn)
            self._try_failed(
                UpstreamTimeout("no response in time", backend=conn.backend.name, request_sent=True)
            )
            return
        if self.progress != self._seen:
            self._seen = self.progress
            self._quiet_since = now
        quiet_until = self._quiet_since + self._body_timeout_s
        if now < quiet_until:
            self.deadline = min(quiet_until, now + self._body_timeout_s / 4)
            return
        self._conn = None
        self._discard(conn)
        self._body_failed(
            UpstreamTimeout("response body stalled", backend=conn.backend.name, request_sent=True)
        )

    # -- tries ------------------------------------------------------------------------------

    def _try(self, now: float) -> None:
        up = self._up
        try:
            backend = up.pool.choose(exclude=self._tried, key=self._key)
        except NoBackendAvailable as exc:
            error = NoBackendAvailable(f"no backend available (tried {self._tried})")
            error.__cause__ = self._last or exc
            self._fail(error)
            return
        self._tried.append(backend.name)
        up.pool.started(backend)
        self._backend = backend
        self._held = True
        self._now = now
        try_timeout_s = up.config.try_timeout_s
        deadline = self._total_deadline
        if try_timeout_s is not None and now + try_timeout_s < deadline:
            deadline = now + try_timeout_s
        self.deadline = deadline
        conn_pool = self._conn_pool = up.conn_pools[backend.name]
        conn = conn_pool.take_idle(now)
        if conn is None:
            self.connect_s = None
            self._connecting = self._loop.create_task(
                self._connect(conn_pool, deadline, perf_counter())
            )
        else:
            self.connect_s = 0.0
            self._send(conn)

    async def _connect(self, conn_pool: ConnectionPool, deadline: float, asked: float) -> None:
        try:
            conn = await conn_pool.acquire(deadline)
        except UpstreamError as exc:
            self._connecting = None
            if not self._done:
                self._try_failed(exc)
            return
        self._connecting = None
        self.connect_s = perf_counter() - asked
        if self._done:
            conn_pool.release(conn)
        else:
            self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        conn.sink = self
        try:
            conn.send(self._request, head_only=self._head_only)
        except UpstreamError as exc:
            self._discard(conn)
            self._try_failed(exc)
            return
        self._conn = conn

    def _try_failed(self, exc: UpstreamError) -> None:
        backend = self._backend
        assert backend is not None
        up = self._up
        self._unhold()
        if exc.blames_backend:
            up.pool.record_failure(backend)
        self._last = exc
        stage = FailureStage.of(exc)
        reason = failure_reason(exc)
        verdict = retry_verdict(
            method=self._method,
            headers=self._headers,
            stage=stage,
            tries_done=len(self._tried),
            max_tries=max_tries_for(len(up.pool), up.config.max_tries),
            time_left_s=self._total_deadline - self._loop.time(),
            budget_allows=up.budget.try_spend,
        )
        if verdict is RetryVerdict.RETRY:
            up.hooks.on_retry(backend.name, reason)
            self._try(self._loop.time())
            return
        if verdict is RetryVerdict.BUDGET_EXHAUSTED:
            up.hooks.on_budget_exhausted(backend.name, reason)
        if stage is FailureStage.BEFORE_SEND:
            error = NoBackendAvailable(f"no backend reachable (tried {self._tried})")
            error.__cause__ = exc
            self._fail(error)
        else:
            self._fail(exc)

    def _body_failed(self, exc: UpstreamError) -> None:
        backend = self._backend
        self._unhold()
        if backend is not None and exc.blames_backend:
            self._up.pool.record_failure(backend)
        self._fail(exc)

    def _fail(self, error: Failure) -> None:
        self._done = True
        self.deadline = math.inf
        self._sink.on_response_error(error)

    def _discard(self, conn: UpstreamConnection) -> None:
        if self._conn_pool is not None:
            self._conn_pool.discard(conn)
        else:
            conn.close()

    def _unhold(self) -> None:
        if self._held and self._backend is not None:
            self._held = False
            self._up.release(self._backend)

    # -- the connection's callbacks (ConnectionSink) ----------------------------------------

    def on_head(self, head: ResponseHead) -> None:
        backend = self._backend
        assert backend is not None
        self.head = head
        self._up.pool.record_success(backend)
        self._quiet_since = self._now
        self.deadline = self._now + self._body_timeout_s
        self._sink.on_response_head(head, backend)

    def on_body(self, data: bytes) -> None:
        self.progress += 1
        self._sink.on_response_body(data)

    def on_end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._conn_pool is not None:
            self._conn_pool.release(conn)
        self._done = True
        self.deadline = math.inf
        self._unhold()
        self._sink.on_response_end()

    def on_error(self, error: UpstreamError) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._discard(conn)
        if self._done:
            return
        if self.head is None:
            self._try_failed(error)
        else:
            self._body_failed(error)
