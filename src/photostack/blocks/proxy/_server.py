"""Lifecycle of the edge proxy: listen, serve, drain, close.

Two ways in: ``ProxyServer`` (``start()`` / ``port`` / ``aclose()``) for code that manages the
lifecycle itself, and ``serve_proxy(config)`` for a node runner that runs it until cancelled.
"""

from __future__ import annotations

import asyncio

from photostack.blocks.balancer import Upstream
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._metrics import ProxyMetrics
from photostack.blocks.proxy._protocol import ClientConnection, ProxyContext

__all__ = ["ProxyServer", "serve_proxy"]

_ABORT_GRACE_S = 1.0


class ProxyServer:
    """An HTTP/1.1 reverse proxy over ``config.backends``, sharing the balancer's upstream core."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.upstream = Upstream(config.backends, config.upstream, hooks=self.metrics)
        self.metrics.watch(self.upstream.snapshot)
        self._ctx: ProxyContext | None = None
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<ProxyServer {self.config.name} {self.config.listen_host}:{self.port}>"

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen_port=0``); the configured one before start."""
        if self._server is None or not self._server.sockets:
            return self.config.listen_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError if the address is taken."""
        loop = asyncio.get_running_loop()
        ctx = ProxyContext(self.config, self.upstream, self.metrics)
        self._ctx = ctx
        self._server = await loop.create_server(
            lambda: ClientConnection(ctx),
            self.config.listen_host,
            self.config.listen_port,
            backlog=1024,
        )

    def snapshot(self) -> list[dict[str, object]]:
        return self.upstream.snapshot()

    async def aclose(self) -> None:
        """Stop accepting, let in-flight requests finish (``drain_timeout_s``), then cut."""
        ctx, server = self._ctx, self._server
        if ctx is not None and server is not None and not ctx.draining:
            ctx.draining = True
            server.close()
            for conn in list(ctx.connections):
                if conn.is_idle:
                    conn.close()
            if ctx.connections:
                ctx.all_closed.clear()
                if not await _wait(ctx.all_closed, self.config.drain_timeout_s):
                    for conn in list(ctx.connections):
                        conn.abort()
                    await _wait(ctx.all_closed, _ABORT_GRACE_S)
            await server.wait_closed()
        await self.upstream.aclose()


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def serve_proxy(
    config: ProxyConfig,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run an edge proxy until ``stop`` is set or the task is cancelled, then drain and close.

    ``ready`` is set once the socket listens.
    """
    server = ProxyServer(config)
    await server.start()
    try:
        if ready is not None:
            ready.set()
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await server.aclose()
