"""The cache node's network side: an asyncio server speaking RESP2 over :class:`NodeCore`.

One :class:`~photostack.blocks.cache._resp.RequestParser` per connection; every request found in
one read is executed in order and the replies go out in one write, so pipelined clients cost one
syscall per batch. An active-expiry task runs ``NodeCore.sweep`` every
``active_expire_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from photostack.blocks.cache._node import NodeCore
from photostack.blocks.cache._resp import RequestParser, RespProtocolError, error
from photostack.blocks.cache._session import NodeConfig, Session

__all__ = ["PUBSUB_OUTPUT_LIMIT_BYTES", "CacheServer"]

# A subscriber that stops reading is disconnected past this much queued output (Redis's
# default client-output-buffer-limit for pub/sub clients is 32 MB hard).
PUBSUB_OUTPUT_LIMIT_BYTES = 32 * 1024 * 1024


class _Connection(asyncio.Protocol):
    __slots__ = ("_core", "_live", "_parser", "_session", "_transport")

    def __init__(self, core: NodeCore, live: set[_Connection]) -> None:
        self._core = core
        self._live = live
        self._parser = RequestParser()
        self._transport: asyncio.Transport | None = None
        self._session = Session(self._push)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._live.add(self)
        self._core.connected_clients += 1
        self._core.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._core.connected_clients -= 1
        self._core.disconnect(self._session)
        self._live.discard(self)
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        parser, execute, session = self._parser, self._core.execute, self._session
        parser.feed(data)
        out: list[bytes] = []
        try:
            while (request := parser.next_request()) is not None:
                if request:
                    out.append(execute(session, request))
                    if session.closing:
                        break
        except RespProtocolError as exc:
            out.append(error(f"ERR {exc}"))
            session.closing = True
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if session.closing:
            transport.close()

    def _push(self, frame: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > PUBSUB_OUTPUT_LIMIT_BYTES:
            transport.abort()
            return
        transport.write(frame)


class CacheServer:
    """``await server.start()`` binds and serves; ``await server.aclose()`` stops accepting,
    closes every connection and the expiry task."""

    def __init__(self, config: NodeConfig, core: NodeCore | None = None) -> None:
        self.config = config
        self.core = core if core is not None else NodeCore(config)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: set[_Connection] = set()

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "stopped"
        return f"<CacheServer {self.config.host}:{self.port} {state}>"

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            return self.config.port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self.core, self._connections),
            self.config.host,
            self.config.port,
            reuse_address=True,
        )
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="cache-node expiry")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()
            self._server = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.active_expire_interval_s)
            self.core.sweep()
