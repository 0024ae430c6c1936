"""One upstream group: choose a backend, send over a pooled connection, retry by the rule.

This is the single core both the smart client (web → app) and the edge proxy use; they differ
only in what they do with the response (buffer it or stream it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence
from time import perf_counter

from photostack.blocks.balancer._budget import RetryBudget
from photostack.blocks.balancer._checker import HealthChecker
from photostack.blocks.balancer._config import ClientConfig, key_function
from photostack.blocks.balancer._connpool import ConnectionPool
from photostack.blocks.balancer._errors import NoBackendAvailable, UpstreamError
from photostack.blocks.balancer._exchange import Exchange, ExchangeSink
from photostack.blocks.balancer._health import Backend, BackendState
from photostack.blocks.balancer._pool import BackendPool, Clock
from photostack.blocks.balancer._response import StreamedResponse
from photostack.blocks.balancer._retry import (
    FailureStage,
    RetryVerdict,
    failure_reason,
    max_tries_for,
    retry_verdict,
)
from photostack.blocks.balancer._strategy import Strategy, StrategyName, make_strategy
from photostack.blocks.balancer._wire import (
    BodySource,
    encode_head,
    encode_request,
    send_body_until_answer,
)

__all__ = [
    "BodySource",
    "ClientConfig",
    "StreamedResponse",
    "Upstream",
    "UpstreamHooks",
    "encode_head",
    "encode_request",
]

log = logging.getLogger("photostack.balancer")


class UpstreamHooks:
    """Observation points with no-op defaults; subclass to count or log."""

    def on_retry(self, backend: str, reason: str) -> None:
        """A try on ``backend`` failed for ``reason`` and the request goes to another one."""

    def on_ejection(self, backend: str) -> None:
        """``backend`` was taken out by passive outlier detection."""

    def on_transition(self, backend: str, before: BackendState, after: BackendState) -> None:
        """``backend`` changed health state."""

    def on_budget_exhausted(self, backend: str, reason: str) -> None:
        """A retry was allowed by the rule but refused by the retry budget."""


class _FanOut(UpstreamHooks):
    def __init__(self, hooks: Sequence[UpstreamHooks]) -> None:
        self._hooks = tuple(hooks)

    def on_retry(self, backend: str, reason: str) -> None:
        for hook in self._hooks:
            hook.on_retry(backend, reason)

    def on_ejection(self, backend: str) -> None:
        for hook in self._hooks:
            hook.on_ejection(backend)

    def on_transition(self, backend: str, before: BackendState, after: BackendState) -> None:
        for hook in self._hooks:
            hook.on_transition(backend, before, after)

    def on_budget_exhausted(self, backend: str, reason: str) -> None:
        for hook in self._hooks:
            hook.on_budget_exhausted(backend, reason)


class Upstream:
    """Backends, their health, checks, connection pools, strategy, retry rule and budget."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: ClientConfig | None = None,
        *,
        hooks: UpstreamHooks | Sequence[UpstreamHooks] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        if hooks is None:
            self.hooks = UpstreamHooks()
        elif isinstance(hooks, UpstreamHooks):
            self.hooks = hooks
        else:
            self.hooks = _FanOut(hooks)
        self._rng = rng or random.Random()
        strategy = self._make_strategy(self.config.strategy)
        clock_fn = clock or time.monotonic
        self.pool = BackendPool(backends, self.config.health, strategy=strategy, clock=clock_fn)
        self.pool.on_transition = self._on_transition
        self.budget = RetryBudget(self.config.retry_budget, clock=clock_fn)
        self._key_fn = key_function(self.config.hash_key)
        self._conn_pools = {b.name: self._conn_pool(b) for b in backends}
        self._checker: HealthChecker | None = None
        self._idle: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<Upstream {self.pool!r}>"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this upstream runs on (the running one, from the first use on)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def loop_time(self) -> float:
        return self.loop.time()

    def conn_pool(self, name: str) -> ConnectionPool:
        """The keep-alive connections to backend ``name`` (KeyError if unknown)."""
        return self._conn_pools[name]

    @property
    def conn_pools(self) -> dict[str, ConnectionPool]:
        """Every backend's keep-alive connections, by name (read-only use)."""
        return self._conn_pools

    def _make_strategy(self, name: StrategyName | str) -> Strategy:
        return make_strategy(name, rng=self._rng, hash_epsilon=self.config.hash_epsilon)

    def _conn_pool(self, backend: Backend) -> ConnectionPool:
        return ConnectionPool(
            backend,
            max_connections=self.config.max_connections_per_backend,
            connect_timeout_s=self.config.connect_timeout_s,
            idle_timeout_s=self.config.idle_timeout_s,
        )

    def _on_transition(self, name: str, before: BackendState, after: BackendState) -> None:
        if after is BackendState.DOWN and before is not BackendState.DRAINING:
            log.warning("%s ejected (passive health)", name)
            self.hooks.on_ejection(name)
        elif after is BackendState.UNHEALTHY:
            log.warning("%s failed its health checks", name)
        elif after is BackendState.UP:
            log.info("%s is up (slow start %.0fs)", name, self.config.health.slow_start.window_s)
        self.hooks.on_transition(name, before, after)

    # -- lifecycle and membership --------------------------------------------------------------

    async def start(self) -> None:
        """Start active health checks if configured (idempotent; needs a running loop)."""
        checks = self.config.health.checks
        if self._checker is not None or not checks.enabled:
            return
        self._checker = HealthChecker(checks, self._report_check, rng=self._rng)
        self.pool.probe_by_checks = True
        for backend in self.pool.backends:
            self._checker.watch(backend)

    def _report_check(self, name: str, passed: bool, weight: float | None) -> None:
        self.pool.record_check(name, passed, weight=weight)

    def add_backend(self, backend: Backend) -> None:
        """Join a backend at run time; it ramps up over the slow-start window.

        Raises ValueError if the name is taken. A drained member of that name is restored
        instead when its address is the same.
        """
        if backend.name in self.pool:
            current = self.pool.health(backend.name).backend
            if (current.host, current.port) != (backend.host, backend.port):
                raise ValueError(f"backend {backend.name!r} is in the pool at another address")
            self.pool.restore(backend.name)
            return
        self.pool.add(backend)
        self._conn_pools[backend.name] = self._conn_pool(backend)
        if self._checker is not None:
            self._checker.watch(backend)

    def drain_backend(self, name: str) -> None:
        """No new requests for ``name`` (KeyError if unknown); in-flight ones finish."""
        self.pool.drain(name)

    def restore_backend(self, name: str) -> None:
        """Undo a drain: ``name`` serves again once a probe passes (KeyError if unknown)."""
        self.pool.restore(name)

    async def remove_backend(self, name: str, *, timeout_s: float = 10.0) -> bool:
        """Drain ``name``, wait up to ``timeout_s`` for its requests, then forget it.

        Returns whether every request finished in time (KeyError if unknown).
        """
        self.pool.drain(name)
        finished = True
        if self.pool.health(name).in_flight > 0:
            event = self._idle.setdefault(name, asyncio.Event())
            try:
                async with asyncio.timeout(timeout_s):
                    await event.wait()
            except TimeoutError:
                finished = False
            finally:
                self._idle.pop(name, None)
        if name in self.pool:
            self.pool.remove(name)
        if self._checker is not None:
            self._checker.unwatch(name)
        conn_pool = self._conn_pools.pop(name, None)
        if conn_pool is not None:
            await conn_pool.aclose()
        return finished

    def set_strategy(self, name: StrategyName | str) -> None:
        """Switch strategy at run time. Raises ValueError for an unknown name."""
        self.pool.strategy = self._make_strategy(name)

    def release(self, backend: Backend) -> None:
        """One request to ``backend`` ended (whatever the outcome)."""
        if self.pool.finished(backend) <= 0:
            event = self._idle.get(backend.name)
            if event is not None:
                event.set()

    # -- requests ------------------------------------------------------------------------------

    def exchange(
        self,
        sink: ExchangeSink,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]],
        request: bytes,
        body_timeout_s: float = 60.0,
    ) -> Exchange:
        """A callback-driven request (see ``Exchange``); call ``start(timeout_s)`` on it.

        ``request`` is the whole request as it goes on the wire (``encode_request``), with a
        Host header; ``headers`` are its headers as given, for the retry rule and the hash key.
        """
        key = (
            self._key_fn(target, headers) if self.pool.strategy.name is StrategyName.HASH else None
        )
        return Exchange(
            self, sink, method, headers, request, key=key, body_timeout_s=body_timeout_s
        )

    async def open(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | BodySource = b"",
        body_length: int | None = None,
        timeout_s: float | None = None,
    ) -> StreamedResponse:
        """Send the request, retrying per the rule, and return once a response head arrived.

        ``body`` is bytes, or an async source of pieces that is read once, as it is sent, with
        bounded memory: it goes out with ``Content-Length: body_length`` when given, else
        chunked, and the source is awaited only while the connection's write buffer is below
        its high-water mark. A streamed body makes a request retriable only until its first
        byte was sent.

        Any HTTP status is a response. Raises NoBackendAvailable when no try reached a backend,
        UpstreamTimeout / UpstreamConnectError / UpstreamProtocolError when the last try failed
        after the request may have been sent. An exception raised by the body source propagates
        as it is (the connection is dropped).
        """
        loop = self.loop
        config = self.config
        deadline = loop.time() + (config.request_timeout_s if timeout_s is None else timeout_s)
        self.budget.record_request()
        key = (
            self._key_fn(target, headers) if self.pool.strategy.name is StrategyName.HASH else None
        )
        replayable = isinstance(body, bytes)
        tried: list[str] = []
        last: UpstreamError | None = None
        while True:
            try:
                backend = self.pool.choose(exclude=tried, key=key)
            except NoBackendAvailable as exc:
                raise NoBackendAvailable(f"no backend available (tried {tried})") from (last or exc)
            tried.append(backend.name)
            self.pool.started(backend)
            try_deadline = deadline
            if config.try_timeout_s is not None:
                try_deadline = min(deadline, loop.time() + config.try_timeout_s)
            try:
                return await self._try_once(
                    backend,
                    method,
                    target,
                    headers=headers,
                    body=body,
                    body_length=body_length,
                    deadline=try_deadline,
                )
            except UpstreamError as exc:
                self.release(backend)
                if exc.blames_backend:
                    self.pool.record_failure(backend)
                last = exc
                stage = FailureStage.of(exc)
                reason = failure_reason(exc)
                verdict = retry_verdict(
                    method=method,
                    headers=headers,
                    stage=stage,
                    tries_done=len(tried),
                    max_tries=max_tries_for(len(self.pool), config.max_tries),
                    time_left_s=deadline - loop.time(),
                    budget_allows=self.budget.try_spend,
                    body_replayable=replayable,
                )
                if verdict is RetryVerdict.RETRY:
                    self.hooks.on_retry(backend.name, reason)
                    continue
                if verdict is RetryVerdict.BUDGET_EXHAUSTED:
                    self.hooks.on_budget_exhausted(backend.name, reason)
                if stage is FailureStage.BEFORE_SEND:
                    raise NoBackendAvailable(f"no backend reachable (tried {tried})") from exc
                raise
            except BaseException:
                self.release(backend)
                raise

    async def _try_once(
        self,
        backend: Backend,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]],
        body: bytes | BodySource,
        body_length: int | None,
        deadline: float,
    ) -> StreamedResponse:
        default_host = f"{backend.host}:{backend.port}"
        if isinstance(body, bytes):
            data = encode_request(method, target, headers, body, default_host=default_host)
        else:
            data = encode_head(
                method,
                target,
                headers,
                default_host=default_host,
                content_length=body_length,
                chunked=body_length is None,
            )
        pool = self._conn_pools[backend.name]
        asked = perf_counter()
        conn = await pool.acquire(deadline)
        connect_s = perf_counter() - asked
        timer: asyncio.TimerHandle | None = None
        try:
            conn.send(data, head_only=method == "HEAD")
            if not isinstance(body, bytes):
                body_started = conn.loop.time()
                early = await send_body_until_answer(
                    conn, body, chunked=body_length is None, length=body_length
                )
                # The client's upload pace is not the backend's: the wait for the head starts now.
                deadline += conn.loop.time() - body_started
                if early:
                    deadline = math.inf  # the head is here already
            # A timer rather than asyncio.timeout: no task lookup, no cancellation dance.
            if deadline != math.inf:
                timer = conn.loop.call_at(deadline, conn.time_out_head)
            head = await conn.read_head()
        except BaseException:
            pool.discard(conn)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self.pool.record_success(backend)
        return StreamedResponse(self, backend, pool, conn, head, connect_s=connect_s)

    def snapshot(self) -> list[dict[str, object]]:
        rows = self.pool.snapshot()
        for row in rows:
            conn_pool = self._conn_pools.get(str(row["name"]))
            row["connections"] = conn_pool.open_connections if conn_pool is not None else 0
        return rows

    async def aclose(self) -> None:
        if self._checker is not None:
            await self._checker.aclose()
        await asyncio.gather(*(p.aclose() for p in self._conn_pools.values()))
