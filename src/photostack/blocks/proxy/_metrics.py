"""The edge's Prometheus metrics, in a registry of its own (several proxies may share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from photostack.blocks.balancer import BackendState, UpstreamHooks

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
            in_flight.add_metric([name], float(str(row["in_flight"])))
            markdowns.add_metric([name], float(str(row["markdowns"])))
        yield state
        yield in_flight
        yield markdowns


class ProxyMetrics(UpstreamHooks):
    """Request and retry counters; also the upstream's hooks, so retries count themselves."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        requests = Counter(
            "photostack_edge_requests",
            "Requests answered by the edge, by status class",
            ["status_class"],
            registry=self.registry,
        )
        # Children looked up once: the request path only increments.
        self._by_class = {c: requests.labels(c) for c in _STATUS_CLASSES}
        self._retries = Counter(
            "photostack_edge_upstream_retries",
            "Tries repeated on another backend, by why the previous one failed",
            ["reason"],
            registry=self.registry,
        )

    def watch(self, snapshot: Snapshot) -> None:
        """Export the backend pool that ``snapshot`` describes."""
        self.registry.register(_BackendCollector(snapshot))

    def count_response(self, status: int) -> None:
        child = self._by_class.get(f"{status // 100}xx")
        if child is not None:
            child.inc()

    def on_retry(self, backend: str, reason: str) -> None:
        self._retries.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
