"""One upstream group: choose a backend, send over a pooled connection, retry by the rule.

This is the single core both the smart client (web → app) and the edge proxy use; they differ
only in what they do with the response (buffer it or stream it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from photostack.blocks.balancer._connection import ConnectionPool, ResponseHead, UpstreamConnection
from photostack.blocks.balancer._errors import NoBackendAvailable, UpstreamError, UpstreamTimeout
from photostack.blocks.balancer._health import Backend, HealthConfig
from photostack.blocks.balancer._pool import BackendPool, Clock
from photostack.blocks.balancer._retry import (
    FailureStage,
    failure_reason,
    max_tries_for,
    may_retry,
)

__all__ = ["ClientConfig", "StreamedResponse", "Upstream", "UpstreamHooks", "encode_request"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing and connection management belong to this hop; callers cannot set them.
_MANAGED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


@dataclass(frozen=True)
class ClientConfig:
    """Tunables of one upstream group (timeouts in seconds of wall time)."""

    request_timeout_s: float = 30.0  # from first try to response head, retries included
    connect_timeout_s: float = 2.0  # per connect attempt, within the request deadline
    idle_timeout_s: float = 4.0  # drop pooled connections idle longer (below uvicorn's 5 s)
    max_connections_per_backend: int = 64
    max_tries: int = 3  # cap on tries per request; also never more than the backend count
    health: HealthConfig = field(default_factory=HealthConfig)


class UpstreamHooks:
    """Observation points with no-op defaults; subclass to count or log."""

    def on_retry(self, backend: str, reason: str) -> None:
        """A try on ``backend`` failed for ``reason`` and the request goes to another one."""


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
        self._upstream.pool.finished(self._backend)
        if failed:
            self._upstream.pool.record_failure(self._backend)


class Upstream:
    """Backends, their health, their connection pools and the retry rule, in one object."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: ClientConfig | None = None,
        *,
        hooks: UpstreamHooks | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.hooks = hooks or UpstreamHooks()
        if clock is None:
            self.pool = BackendPool(backends, self.config.health)
        else:
            self.pool = BackendPool(backends, self.config.health, clock=clock)
        self._conn_pools = {
            b.name: ConnectionPool(
                b,
                max_connections=self.config.max_connections_per_backend,
                connect_timeout_s=self.config.connect_timeout_s,
                idle_timeout_s=self.config.idle_timeout_s,
            )
            for b in backends
        }

    def __repr__(self) -> str:
        return f"<Upstream {self.pool!r}>"

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
        deadline = loop.time() + (self.config.request_timeout_s if timeout_s is None else timeout_s)
        max_tries = max_tries_for(len(self.pool), self.config.max_tries)
        tried: list[str] = []
        last: UpstreamError | None = None
        while True:
            try:
                backend = self.pool.choose(exclude=tried)
            except NoBackendAvailable as exc:
                raise NoBackendAvailable(f"no backend available (tried {tried})") from (
                    last or exc
                )
            tried.append(backend.name)
            self.pool.started(backend)
            try:
                return await self._try_once(
                    backend, method, target, headers=headers, body=body, deadline=deadline
                )
            except UpstreamError as exc:
                self.pool.finished(backend)
                if exc.blames_backend:
                    self.pool.record_failure(backend)
                last = exc
                stage = FailureStage.of(exc)
                retry = loop.time() < deadline and may_retry(
                    method=method,
                    headers=headers,
                    stage=stage,
                    tries_done=len(tried),
                    max_tries=max_tries,
                )
                if retry:
                    self.hooks.on_retry(backend.name, failure_reason(exc))
                    continue
                if stage is FailureStage.BEFORE_SEND:
                    raise NoBackendAvailable(f"no backend reachable (tried {tried})") from exc
                raise
            except BaseException:
                self.pool.finished(backend)
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
            row["connections"] = self._conn_pools[str(row["name"])].open_connections
        return rows

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose() for p in self._conn_pools.values()))
