"""What every connection of one proxy server shares: config, upstream, metrics, features."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from photostack.blocks.balancer import Upstream
from photostack.blocks.proxy._accesslog import AccessLog, format_entry
from photostack.blocks.proxy._cache import Flights, MicroCache
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._metrics import ProxyMetrics

if TYPE_CHECKING:
    from photostack.blocks.proxy._protocol import ClientConnection, Request

__all__ = ["ProxyContext"]


class ProxyContext:
    def __init__(
        self,
        config: ProxyConfig,
        upstream: Upstream,
        metrics: ProxyMetrics,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.all_closed = asyncio.Event()
        # Features, each None (or False) when off: the request path tests one attribute.
        self.filter = config.filter
        self.header_rules = config.headers
        self.access_log = AccessLog(config.access_log_path) if config.access_log_path else None
        self.cache = (
            MicroCache(config.cache.max_entries, clock or self.loop.time) if config.cache else None
        )
        self.flights = Flights() if config.collapse else None
        self.shares_responses = self.cache is not None or self.flights is not None
        metrics.watch_features(self)

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.all_closed.set()

    def log(  # noqa: PLR0917 - called positionally on the hot path (no kwargs dict)
        self,
        conn: ClientConnection,
        request: Request,
        request_id: str,
        status: int,
        backend: str | None,
        bytes_out: int,
        first_byte: float | None,
        cache: str | None = None,
    ) -> None:
        log = self.access_log
        if log is None:
            return
        now = time.perf_counter()
        log.write(
            format_entry(
                time_s=time.time(),
                request_id=request_id,
                client=conn.client_ip,
                method=request.method,
                path=request.target,
                backend=backend,
                status=status,
                bytes_in=request.bytes_in,
                bytes_out=bytes_out,
                upstream_connect_s=None,
                upstream_first_byte_s=None if first_byte is None else first_byte - request.started,
                total_s=now - request.started,
                cache=cache,
            )
        )

    def tick(self) -> None:
        """Housekeeping, a few times a second: close connections past their deadline, flush."""
        now = self.loop.time()
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.on_deadline()
        if self.access_log is not None:
            self.access_log.flush()

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
