"""A request body streamed from the client to the backend with bounded memory.

The client connection's parser ``feed``s body pieces in; the upstream side iterates the stream
(``async for piece in stream``), which is what ``Upstream.open(body=...)`` reads. When more
than ``high_water_bytes`` wait unread, the owner is asked to stop reading the client socket,
and to resume once the upstream has taken them; the upstream in turn only reads the stream
while its own socket buffer is below its high-water mark. So an upload never sits in the
edge's memory beyond about two buffers, however large it is.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Protocol

__all__ = ["BodyOwner", "BodyStream"]

HIGH_WATER_BYTES = 256 * 1024


class BodyOwner(Protocol):
    """Who reads the client: told to pause and resume reading for this body's sake."""

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...


class BodyStream:
    """Pieces of one request body, in order; iterate it once."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_done",
        "_error",
        "_loop",
        "_owner",
        "_paused",
        "_waiter",
        "high_water_bytes",
        "total",
    )

    def __init__(
        self,
        owner: BodyOwner,
        loop: asyncio.AbstractEventLoop,
        first: Iterable[bytes] = (),
        *,
        high_water_bytes: int = HIGH_WATER_BYTES,
    ) -> None:
        self._owner = owner
        self._loop = loop
        self._chunks: deque[bytes] = deque(first)
        self._buffered = sum(len(c) for c in self._chunks)
        self.total = self._buffered  # bytes received from the client so far
        self.high_water_bytes = high_water_bytes
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        if self._buffered >= high_water_bytes:
            self._pause()

    def __repr__(self) -> str:
        state = "done" if self._done else ("failed" if self._error else "open")
        return f"<BodyStream {state} total={self.total} buffered={self._buffered}>"

    @property
    def finished(self) -> bool:
        """The client sent the whole body (the parser saw the message end)."""
        return self._done

    @property
    def buffered(self) -> int:
        """Bytes received from the client and not yet taken by the upstream side."""
        return self._buffered

    # -- the client side ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.total += len(data)
        if self._buffered >= self.high_water_bytes:
            self._pause()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body cannot be completed (too large, client gone): the reader raises ``exc``."""
        if self._error is None and not self._done:
            self._error = exc
        self._wake()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._owner.pause_body()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the upstream side --------------------------------------------------------------------

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._owner.resume_body()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            waiter = self._loop.create_future()
            self._waiter = waiter
            await waiter
