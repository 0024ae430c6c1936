"""The edge's Prometheus metrics, in a registry of its own (several proxies may share a process).

The request path only increments plain integers; they are read at scrape time by collectors,
so no label lookup or lock is paid per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from photostack.blocks.balancer import BackendState, UpstreamHooks

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext

__all__ = ["ProxyMetrics"]

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
Snapshot = Callable[[], list[dict[str, object]]]


class _BackendCollector(Collector):
    """Reads backend health at scrape time, so the request path pays nothing for it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "photostack_edge_backend_state",
            "1 for the state each backend is in",
            labels=["backend", "state"],
        )
        in_flight = GaugeMetricFamily(
            "photostack_edge_backend_in_flight", "Requests in flight", labels=["backend"]
        )
        markdowns = CounterMetricFamily(
            "photostack_edge_backend_markdowns",
            "Times a backend was marked down by a failed request (passive health)",
            labels=["backend"],
        )
        for row in self._snapshot():
            name = str(row["name"])
            for candidate in BackendState:
                is_current = row["state"] == candidate.value
                state.add_metric([name, candidate.value], 1.0 if is_current else 0.0)
            in_flight.add_metric([name], float(str(row.get("in_flight", 0))))
            markdowns.add_metric([name], float(str(row.get("markdowns", 0))))
        yield state
        yield in_flight
        yield markdowns


class _CounterCollector(Collector):
    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "photostack_edge_requests",
            "Requests answered by the edge, by status class",
            labels=["status_class"],
        )
        for index, name in enumerate(_STATUS_CLASSES):
            requests.add_metric([name], float(m.by_class[index + 1]))
        yield requests
        yield CounterMetricFamily(
            "photostack_edge_client_timeouts",
            "Client connections closed for a slow head or an idle keep-alive",
            value=float(m.timeouts),
        )
        ctx = m.context
        if ctx is not None and ctx.cache is not None:
            cache = CounterMetricFamily(
                "photostack_edge_cache", "Micro-cache lookups by outcome", labels=["outcome"]
            )
            cache.add_metric(["hit"], float(ctx.cache.hits))
            cache.add_metric(["miss"], float(ctx.cache.misses))
            cache.add_metric(["stale"], float(ctx.cache.stale_served))
            yield cache
        if ctx is not None and ctx.flights is not None:
            yield CounterMetricFamily(
                "photostack_edge_collapsed",
                "Requests answered with another identical request's upstream response",
                value=float(ctx.flights.collapsed),
            )


class ProxyMetrics(UpstreamHooks):
    """Request and retry counters; also the upstream's hooks, so retries count themselves."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.by_class = [0] * 7  # index: status // 100 (0 and 6 catch nonsense)
        self.timeouts = 0
        self.context: ProxyContext | None = None
        self.registry.register(_CounterCollector(self))
        self._retries = Counter(
            "photostack_edge_upstream_retries",
            "Tries repeated on another backend, by why the previous one failed",
            ["reason"],
            registry=self.registry,
        )

    def watch(self, snapshot: Snapshot) -> None:
        """Export the backend pool that ``snapshot`` describes."""
        self.registry.register(_BackendCollector(snapshot))

    def watch_features(self, context: ProxyContext) -> None:
        self.context = context

    def count_response(self, status: int) -> None:
        index = status // 100
        if 0 < index < 6:
            self.by_class[index] += 1

    def on_retry(self, backend: str, reason: str) -> None:
        self._retries.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
