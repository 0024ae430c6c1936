"""One upstream group: choose a backend, send over a pooled connection, retry by the rule.

This is the single core both the smart client (web → app) and the edge proxy use; they differ
only in what they do with the response (buffer it or stream it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from types import TracebackType

from photostack.blocks.balancer._budget import RetryBudget
from photostack.blocks.balancer._checker import HealthChecker
from photostack.blocks.balancer._config import ClientConfig, key_function
from photostack.blocks.balancer._connection import ConnectionPool, ResponseHead, UpstreamConnection
from photostack.blocks.balancer._errors import NoBackendAvailable, UpstreamError, UpstreamTimeout
from photostack.blocks.balancer._health import Backend, BackendState
from photostack.blocks.balancer._pool import BackendPool, Clock
from photostack.blocks.balancer._retry import (
    FailureStage,
    RetryVerdict,
    failure_reason,
    max_tries_for,
    retry_verdict,
)
from photostack.blocks.balancer._strategy import Strategy, StrategyName, make_strategy

__all__ = ["ClientConfig", "StreamedResponse", "Upstream", "UpstreamHooks", "encode_request"]

log = logging.getLogger("photostack.balancer")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing and connection management belong to this hop; callers cannot set them.
_MANAGED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


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


def encode_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    default_host: str,
) -> bytes:
    """Serialize one HTTP/1.1 request with a Content-Length body. Raises ValueError on CR/LF."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _MANAGED_HEADERS:
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"invalid header {name!r}")
        has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"Host: {default_host}\r\n")
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head + body if body else head


class StreamedResponse:
    """A response whose head has arrived; read its body with ``read_chunk`` or ``read_all``.

    Always ``close()`` it (or use ``async with``): that returns the connection to the pool when
    the body was read whole and drops it otherwise.
    """

    __slots__ = ("_backend", "_conn", "_done", "_head", "_pool", "_upstream")

    def __init__(
        self,
        upstream: Upstream,
        backend: Backend,
        pool: ConnectionPool,
        conn: UpstreamConnection,
        head: ResponseHead,
    ) -> None:
        self._upstream = upstream
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._head = head
        self._done = False

    def __repr__(self) -> str:
        return f"<StreamedResponse {self._head.status} from {self._backend.name}>"

    @property
    def status(self) -> int:
        return self._head.status

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._head.headers

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def content_length(self) -> int | None:
        return self._head.content_length

    @property
    def chunked(self) -> bool:
        return self._head.chunked

    async def read_chunk(self, *, timeout_s: float | None = None) -> bytes | None:
        """Body bytes as they arrive, None at the end. Raises UpstreamError subclasses."""
        if self._done:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                data = await self._conn.read_body()
        except TimeoutError as exc:
            self._finish(reusable=False, failed=True)
            raise UpstreamTimeout(
                "response body stalled", backend=self._backend.name, request_sent=True
            ) from exc
        except UpstreamError:
            self._finish(reusable=False, failed=True)
            raise
        except BaseException:
            self._finish(reusable=False, failed=False)
            raise
        if data is None:
            self._finish(reusable=True, failed=False)
        return data

    async def read_all(self, *, deadline: float | None = None) -> bytes:
        """The whole remaining body, by ``deadline`` (event-loop time) if given."""
        parts: list[bytes] = []
        loop = asyncio.get_running_loop()
        while True:
            timeout_s = None if deadline is None else max(0.0, deadline - loop.time())
            data = await self.read_chunk(timeout_s=timeout_s)
            if data is None:
                return b"".join(parts)
            parts.append(data)

    def close(self) -> None:
        """Release the connection; a body left unread makes it unusable, so it is dropped."""
        if not self._done:
            self._finish(reusable=False, failed=False)

    async def __aenter__(self) -> StreamedResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _finish(self, *, reusable: bool, failed: bool) -> None:
        self._done = True
        if reusable:
            self._pool.release(self._conn)
        else:
            self._pool.discard(self._conn)
        self._upstream.release(self._backend)
        if failed:
            self._upstream.pool.record_failure(self._backend)


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

    def __repr__(self) -> str:
        return f"<Upstream {self.pool!r}>"

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

    async def open(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> StreamedResponse:
        """Send the request, retrying per the rule, and return once a response head arrived.

        Any HTTP status is a response. Raises NoBackendAvailable when no try reached a backend,
        UpstreamTimeout / UpstreamConnectError / UpstreamProtocolError when the last try failed
        after the request may have been sent.
        """
        loop = asyncio.get_running_loop()
        config = self.config
        deadline = loop.time() + (config.request_timeout_s if timeout_s is None else timeout_s)
        self.budget.record_request()
        max_tries = max_tries_for(len(self.pool), config.max_tries)
        key = (
            self._key_fn(target, headers) if self.pool.strategy.name is StrategyName.HASH else None
        )
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
                    backend, method, target, headers=headers, body=body, deadline=try_deadline
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
                    max_tries=max_tries,
                    time_left_s=deadline - loop.time(),
                    budget_allows=self.budget.try_spend,
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
        body: bytes,
        deadline: float,
    ) -> StreamedResponse:
        data = encode_request(
            method, target, headers, body, default_host=f"{backend.host}:{backend.port}"
        )
        pool = self._conn_pools[backend.name]
        conn = await pool.acquire(deadline)
        try:
            conn.send(data, head_only=method == "HEAD")
            async with asyncio.timeout_at(deadline):
                head = await conn.read_head()
        except TimeoutError as exc:
            pool.discard(conn)
            raise UpstreamTimeout(
                "no response in time", backend=backend.name, request_sent=True
            ) from exc
        except BaseException:
            pool.discard(conn)
            raise
        self.pool.record_success(backend)
        return StreamedResponse(self, backend, pool, conn, head)

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
