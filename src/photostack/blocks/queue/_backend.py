"""The queue contract every engine implements (Postgres, RabbitMQ, and the in-memory fake).

Producers use ``enqueue``/``status``; operators ``dead_letters``/``replay``/``stats``; the
worker runtime the lease half. Engines are at-least-once: a task whose worker dies runs again,
and an outcome is accepted only from the lease's current holder.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from photostack.blocks.queue._model import (
    Json,
    Lease,
    QueueConfig,
    QueueStats,
    TaskInfo,
    TaskState,
)

__all__ = ["QueueBackend", "ReapResult"]


class ReapResult(tuple[int, int]):
    """``(requeued, dead)``: expired leases put back, and those that used their last attempt."""

    __slots__ = ()

    @property
    def requeued(self) -> int:
        return self[0]

    @property
    def dead(self) -> int:
        return self[1]


@runtime_checkable
class QueueBackend(Protocol):
    config: QueueConfig

    async def start(self) -> None:
        """Connect and create what the engine needs (idempotent). Raises QueueUnavailable."""

    async def aclose(self) -> None: ...

    # -- producers ---------------------------------------------------------------------------
    async def enqueue(
        self,
        kind: str,
        payload: Json,
        *,
        priority: int = 0,
        delay_s: float = 0.0,
        idempotency_key: str | None = None,
    ) -> str:
        """Durably queue a task and return its id. The same ``idempotency_key`` returns the
        first task's id and queues nothing. Raises PayloadTooLarge, QueueFull (nothing
        written), QueueConfigError (bad priority/delay), QueueUnavailable."""

    async def status(self, task_id: str) -> TaskInfo:
        """Raises TaskNotFound for an id that was never queued here."""

    # -- operators ---------------------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[TaskInfo]:
        """Dead tasks, most recently dead first, each with its last error."""

    async def replay(self, task_id: str) -> TaskInfo:
        """Queue a dead task again with its attempts reset. Raises TaskNotFound, or
        IllegalTransition when the task is not dead."""

    async def stats(self) -> QueueStats: ...

    # -- workers -----------------------------------------------------------------------------
    async def start_consuming(self, prefetch: int) -> None:
        """Begin receiving work for up to ``prefetch`` concurrent leases."""

    async def stop_consuming(self) -> None:
        """Receive no new work; leases already handed out stay valid."""

    async def lease(self, max_tasks: int, visibility_timeout_s: float, worker: str) -> list[Lease]:
        """Up to ``max_tasks`` due tasks, highest priority first, FIFO within a priority,
        each leased for ``visibility_timeout_s``. Returns at once (maybe empty)."""

    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when new work may be due (a notification), or after ``timeout_s``."""

    async def heartbeat(self, lease: Lease, visibility_timeout_s: float) -> None:
        """Extend the lease. Raises LeaseLost."""

    async def complete(self, lease: Lease, result: Json) -> None:
        """Store the result; the task succeeded. Raises LeaseLost."""

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> TaskState:
        """Record a failed attempt; returns FAILED (retry after backoff) or DEAD.
        Raises LeaseLost."""

    async def release(self, lease: Lease) -> None:
        """Give the task back unrun; the attempt does not count. Raises LeaseLost."""

    async def reap_expired(self) -> ReapResult:
        """Put back tasks whose lease expired (their worker is gone)."""
