"""Prometheus metrics of one upstream group: retries by reason, ejections, budget exhaustion.

Registered in a registry the caller owns, under a prefix naming the shape (``photostack_edge``
for the edge proxy, ``photostack_web_appclient`` for a web node's smart client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from photostack.blocks.balancer._health import BackendState
from photostack.blocks.balancer._upstream import UpstreamHooks

__all__ = ["BalancerMetrics"]

Snapshot = Callable[[], list[dict[str, object]]]


class _ShareCollector(Collector):
    def __init__(self, prefix: str, snapshot: Snapshot) -> None:
        self._prefix = prefix
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        share = GaugeMetricFamily(
            f"{self._prefix}_backend_share",
            "Slow-start share of each backend (1 = full weight)",
            labels=["backend"],
        )
        weight = GaugeMetricFamily(
            f"{self._prefix}_backend_weight",
            "Configured or reported weight of each backend",
            labels=["backend"],
        )
        for row in self._snapshot():
            share.add_metric([str(row["name"])], float(str(row["share"])))
            weight.add_metric([str(row["name"])], float(str(row["weight"])))
        yield share
        yield weight


class BalancerMetrics(UpstreamHooks):
    """Counters fed by the upstream's hooks; pass it as (one of) ``Upstream(hooks=...)``."""

    def __init__(self, prefix: str, registry: CollectorRegistry | None = None) -> None:
        self.prefix = prefix
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self._retries = Counter(
            f"{prefix}_retries",
            "Tries repeated on another backend, by why the previous one failed",
            ["reason"],
            registry=self.registry,
        )
        self._ejections = Counter(
            f"{prefix}_ejections",
            "Backends ejected by passive outlier detection",
            ["backend"],
            registry=self.registry,
        )
        self._exhausted = Counter(
            f"{prefix}_retry_budget_exhausted",
            "Retries the rule allowed but the retry budget refused, by failure reason",
            ["reason"],
            registry=self.registry,
        )
        self._transitions = Counter(
            f"{prefix}_backend_transitions",
            "Health state changes, by the state entered",
            ["backend", "state"],
            registry=self.registry,
        )

    def watch(self, snapshot: Snapshot) -> None:
        """Also export each backend's slow-start share and weight, read at scrape time."""
        self.registry.register(_ShareCollector(self.prefix, snapshot))

    def on_retry(self, backend: str, reason: str) -> None:
        self._retries.labels(reason).inc()

    def on_ejection(self, backend: str) -> None:
        self._ejections.labels(backend).inc()

    def on_budget_exhausted(self, backend: str, reason: str) -> None:
        self._exhausted.labels(reason).inc()

    def on_transition(self, backend: str, before: BackendState, after: BackendState) -> None:
        self._transitions.labels(backend, after.value).inc()
