"""Prometheus metrics of a worker process: the queue's depth, age of the oldest waiting task
and dead letters (from the engine, refreshed before each scrape), and what this worker saw
(successes, retries, redeliveries, tasks sent to the dead-letter queue, lost leases)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from photostack.blocks.queue._backend import QueueBackend, ReapResult
from photostack.blocks.queue._errors import QueueError
from photostack.blocks.queue._model import Lease, TaskState
from photostack.blocks.queue._worker import WorkerHooks

__all__ = ["QueueMetrics"]


class QueueMetrics(WorkerHooks):
    """Worker hooks that count into their own registry (one per process, or per test)."""

    def __init__(self, queue: str, registry: CollectorRegistry | None = None) -> None:
        self.queue = queue
        self.registry = registry or CollectorRegistry()
        r, q = self.registry, ["queue"]
        self.depth = Gauge("photostack_queue_depth", "Tasks waiting to run.", q, registry=r)
        self.running = Gauge("photostack_queue_running", "Tasks leased now.", q, registry=r)
        self.oldest_age = Gauge(
            "photostack_queue_oldest_age_seconds",
            "How long the oldest due task has waited.",
            q,
            registry=r,
        )
        self.dead_letters = Gauge(
            "photostack_queue_dead_letters", "Tasks in the dead-letter queue.", q, registry=r
        )
        qk = ["queue", "kind"]
        self.succeeded = Counter(
            "photostack_queue_succeeded", "Tasks this worker completed.", qk, registry=r
        )
        self.retries = Counter(
            "photostack_queue_retries", "Failed attempts scheduled for a retry.", qk, registry=r
        )
        self.dead = Counter(
            "photostack_queue_dead",
            "Tasks this worker moved to the dead-letter queue.",
            qk,
            registry=r,
        )
        self.redeliveries = Counter(
            "photostack_queue_redeliveries",
            "Tasks delivered again because their previous worker was lost.",
            qk,
            registry=r,
        )
        self.leases_lost = Counter(
            "photostack_queue_leases_lost", "Leases this worker lost mid-task.", qk, registry=r
        )
        self.released = Counter(
            "photostack_queue_released", "Leases given back unrun at shutdown.", qk, registry=r
        )
        self.reaped = Counter(
            "photostack_queue_expired_leases",
            "Expired leases this worker put back (or sent dead).",
            q,
            registry=r,
        )
        self.engine_errors = Counter(
            "photostack_queue_engine_errors", "Engine calls that failed.", q, registry=r
        )
        self.duration = Histogram(
            "photostack_queue_task_seconds", "Handler run time.", qk, registry=r
        )
        self.busy = Gauge(
            "photostack_worker_busy", "Handlers running in this worker.", q, registry=r
        )

    async def refresh(self, backend: QueueBackend, busy: int | None = None) -> None:
        """Update the gauges: queue-wide ones from the engine, ``busy`` from the worker."""
        if busy is not None:
            self.busy.labels(self.queue).set(busy)
        try:
            stats = await backend.stats()
        except QueueError:
            self.engine_errors.labels(self.queue).inc()
            return
        self.depth.labels(self.queue).set(stats.waiting)
        self.running.labels(self.queue).set(stats.running)
        self.oldest_age.labels(self.queue).set(stats.oldest_waiting_age_s)
        self.dead_letters.labels(self.queue).set(stats.dead)

    def on_leased(self, lease: Lease) -> None:
        if lease.redelivered:
            self.redeliveries.labels(self.queue, lease.kind).inc()

    def on_succeeded(self, lease: Lease, duration_s: float) -> None:
        self.succeeded.labels(self.queue, lease.kind).inc()
        self.duration.labels(self.queue, lease.kind).observe(duration_s)

    def on_failed(self, lease: Lease, outcome: TaskState, duration_s: float) -> None:
        counter = self.dead if outcome is TaskState.DEAD else self.retries
        counter.labels(self.queue, lease.kind).inc()
        self.duration.labels(self.queue, lease.kind).observe(duration_s)

    def on_lease_lost(self, lease: Lease) -> None:
        self.leases_lost.labels(self.queue, lease.kind).inc()

    def on_released(self, lease: Lease) -> None:
        self.released.labels(self.queue, lease.kind).inc()

    def on_reaped(self, result: ReapResult) -> None:
        self.reaped.labels(self.queue).inc(result.requeued + result.dead)

    def on_backend_error(self, error: QueueError) -> None:
        self.engine_errors.labels(self.queue).inc()
