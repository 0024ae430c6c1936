"""What every connection of one proxy server shares: config, upstream, metrics, features."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from time import perf_counter, time
from typing import TYPE_CHECKING

from photostack.blocks.balancer import Exchange, Upstream
from photostack.blocks.proxy._accesslog import AccessLog
from photostack.blocks.proxy._cache import Flights, MicroCache
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._metrics import ProxyMetrics
from photostack.blocks.proxy._relay import RequestEncoder, ResponseEncoder
from photostack.blocks.proxy._stream import small_body_limit

if TYPE_CHECKING:
    from photostack.blocks.proxy._protocol import ClientConnection, Request

__all__ = ["ProxyContext"]

_MAX_TICK_S = 0.5


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
        # The housekeeping tick: often enough for every timeout to fire within a quarter of it.
        upstream_s = [config.upstream.request_timeout_s, config.upstream.try_timeout_s or math.inf]
        self.tick_s = min(
            _MAX_TICK_S, config.header_timeout_s / 4, config.client_timeout_s / 4,
            config.stream_idle_timeout_s / 4, *(t / 4 for t in upstream_s),
        )  # fmt: skip
        self.head_deadline = self.idle_deadline = math.inf
        self._set_deadlines(self.loop.time())
        self.encoder = RequestEncoder(config.headers)
        self.response_encoder = ResponseEncoder(config.headers)
        self.small_body_bytes = small_body_limit(config)
        self.request_timeout_s = config.upstream.request_timeout_s
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
        connect_s: float | None = None,
    ) -> None:
        log = self.access_log
        if log is None:
            return
        started = request.started
        log.add(
            time(),
            request_id,
            conn.client_ip,
            request.method,
            request.target,
            backend,
            status,
            request.bytes_in,
            bytes_out,
            connect_s,
            None if first_byte is None else first_byte - started,
            perf_counter() - started,
            cache,
        )

    def _set_deadlines(self, now: float) -> None:
        # Connections take their deadlines from here instead of reading the clock per request.
        # ``now`` is up to one tick old, so one tick is added: a timeout T fires between T and
        # T + 2 ticks after it started.
        self.head_deadline = now + self.config.header_timeout_s + self.tick_s
        self.idle_deadline = now + self.config.client_timeout_s + self.tick_s

    def tick(self) -> None:
        """Housekeeping, a few times a second: close connections past their deadline, time out
        upstream exchanges past theirs (no timer is armed per request), flush the log."""
        now = self.loop.time()
        self._set_deadlines(now)
        late: list[ClientConnection] = []
        waiting: list[Exchange] = []
        for conn in self.connections:
            if conn.deadline <= now:
                late.append(conn)
            else:
                exchange = conn.exchange
                if exchange is not None and exchange.deadline <= now:
                    waiting.append(exchange)
        for conn in late:
            conn.on_deadline()
        for exchange in waiting:
            exchange.expire(now)
        if self.access_log is not None:
            self.access_log.flush()

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
