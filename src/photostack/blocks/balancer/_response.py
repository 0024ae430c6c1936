"""A response whose head has arrived, read by a coroutine (``Upstream.open``'s result)."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

from photostack.blocks.balancer._connection import ResponseHead, UpstreamConnection
from photostack.blocks.balancer._connpool import ConnectionPool
from photostack.blocks.balancer._errors import UpstreamError, UpstreamTimeout
from photostack.blocks.balancer._health import Backend

if TYPE_CHECKING:
    from photostack.blocks.balancer._upstream import Upstream

__all__ = ["StreamedResponse"]


class StreamedResponse:
    """A response whose head has arrived; read its body with ``read_chunk`` or ``read_all``.

    Always ``close()`` it (or use ``async with``): that returns the connection to the pool when
    the body was read whole and drops it otherwise.
    """

    __slots__ = ("_backend", "_conn", "_done", "_head", "_pool", "_upstream", "connect_s")

    def __init__(
        self,
        upstream: Upstream,
        backend: Backend,
        pool: ConnectionPool,
        conn: UpstreamConnection,
        head: ResponseHead,
        *,
        connect_s: float | None = None,
    ) -> None:
        self._upstream = upstream
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._head = head
        self._done = False
        # Seconds the answering try took to obtain its connection: an idle pooled one (about
        # 0), a new one (the TCP connect), or one freed by another request (the wait).
        self.connect_s = connect_s

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
        conn = self._conn
        try:
            if conn.body_ready():  # already here: no timeout to arm
                data = await conn.read_body()
            else:
                async with asyncio.timeout(timeout_s):
                    data = await conn.read_body()
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
        loop = self._conn.loop
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
