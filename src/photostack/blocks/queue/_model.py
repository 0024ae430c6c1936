"""Task states, their transition table, and the values the queue contract speaks in.

Nothing here does I/O. Engines store these values; the worker runtime and the API read them.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from photostack.blocks.queue._errors import IllegalTransition, PayloadTooLarge, QueueConfigError

__all__ = [
    "TRANSITIONS",
    "Json",
    "Lease",
    "QueueConfig",
    "QueueStats",
    "RetryPolicy",
    "TaskInfo",
    "TaskState",
    "check_transition",
    "decode_json",
    "encode_payload",
]

#: A JSON value (what payloads and results are).
Json = Any

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class TaskState(enum.Enum):
    """Where a task is. ``FAILED`` means an attempt failed and a retry is scheduled;
    ``DEAD`` means no more attempts: the task sits in the dead-letter queue until replayed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.DEAD)

    @property
    def is_waiting(self) -> bool:
        """Counts toward the queue length: it will run when its time comes."""
        return self in (TaskState.QUEUED, TaskState.FAILED)


# Every legal move. RUNNING -> RUNNING is a redelivery: the lease expired (or the consumer's
# channel closed) and another worker took the task. RUNNING -> QUEUED is a graceful release or
# an expired lease put back. DEAD -> QUEUED is a replay.
TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = MappingProxyType(
    {
        TaskState.QUEUED: frozenset({TaskState.RUNNING}),
        TaskState.RUNNING: frozenset(
            {
                TaskState.SUCCEEDED,
                TaskState.FAILED,
                TaskState.DEAD,
                TaskState.QUEUED,
                TaskState.RUNNING,
            }
        ),
        TaskState.FAILED: frozenset({TaskState.RUNNING}),
        TaskState.SUCCEEDED: frozenset(),
        TaskState.DEAD: frozenset({TaskState.QUEUED}),
    }
)


def check_transition(old: TaskState, new: TaskState) -> None:
    """Raise IllegalTransition unless the table allows ``old -> new``."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"task state {old.value} -> {new.value} is not allowed")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for one task kind: attempt ``n`` failing waits about ``base * 2**(n-1)`` seconds
    (capped at ``max_delay_s``), less up to ``jitter_ratio`` of it at random."""

    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    jitter_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise QueueConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise QueueConfigError("need 0 <= base_delay_s <= max_delay_s")
        if not 0 <= self.jitter_ratio <= 1:
            raise QueueConfigError(f"jitter_ratio must be in [0, 1], got {self.jitter_ratio}")


@dataclass(frozen=True)
class QueueConfig:
    """One named queue: its limits and the retry policy of each task kind."""

    name: str
    max_payload_bytes: int = 64 * 1024
    max_length: int = 100_000
    #: The Retry-After hint of QueueFull: about how long a full queue takes to drain a little.
    full_retry_after_s: float = 5.0
    default_policy: RetryPolicy = RetryPolicy()
    policies: Mapping[str, RetryPolicy] = field(default_factory=dict)
    #: Highest priority accepted (0..max_priority; higher runs first).
    max_priority: int = 9
    #: Longest delay a task may be scheduled out (bounds RabbitMQ's delay tiers too).
    max_delay_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise QueueConfigError(f"queue name {self.name!r}: use [a-z][a-z0-9_]*, max 40")
        if self.max_payload_bytes < 2 or self.max_length < 1:
            raise QueueConfigError("max_payload_bytes and max_length must be positive")
        if not 0 <= self.max_priority <= 255:
            raise QueueConfigError("max_priority must be in 0..255")

    def policy_for(self, kind: str) -> RetryPolicy:
        return self.policies.get(kind, self.default_policy)

    def check_priority(self, priority: int) -> None:
        if not 0 <= priority <= self.max_priority:
            raise QueueConfigError(f"priority {priority} is outside 0..{self.max_priority}")

    def check_delay(self, delay_s: float) -> None:
        if not 0 <= delay_s <= self.max_delay_s:
            raise QueueConfigError(f"delay_s {delay_s} is outside 0..{self.max_delay_s}")


def encode_payload(payload: Json, limit_bytes: int) -> str:
    """The payload as compact JSON text; raises PayloadTooLarge over ``limit_bytes`` (UTF-8)
    and QueueConfigError when it is not JSON-serialisable."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QueueConfigError(f"task payload is not JSON: {exc}") from exc
    size = len(text.encode())
    if size > limit_bytes:
        raise PayloadTooLarge(size, limit_bytes)
    return text


def decode_json(text: str | None) -> Json:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class TaskInfo:
    """A task as ``status(id)`` reports it (what ``GET /v1/tasks/{id}`` shows)."""

    id: str
    kind: str
    state: TaskState
    attempts: int
    max_attempts: int
    priority: int
    redeliveries: int
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    result: Json = None
    last_error: str | None = None

    def __repr__(self) -> str:
        return f"<TaskInfo {self.id} {self.kind} {self.state.value} attempts={self.attempts}>"


@dataclass(frozen=True)
class Lease:
    """A task handed to one worker until ``complete``/``fail``/``release`` or lease expiry.

    ``token`` fences a stale holder: an engine accepts an outcome only with the current token.
    ``redelivered`` says an earlier holder lost the task (crashed, or its lease expired).
    """

    task_id: str
    kind: str
    payload: Json
    attempt: int
    max_attempts: int
    token: str
    redelivered: bool = False

    def __repr__(self) -> str:
        return f"<Lease {self.task_id} {self.kind} attempt={self.attempt}>"


@dataclass(frozen=True)
class QueueStats:
    """What the metrics gauges show: waiting, running and dead tasks, and the oldest wait."""

    waiting: int
    running: int
    dead: int
    oldest_waiting_age_s: float
