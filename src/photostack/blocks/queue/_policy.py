"""Pure decisions of the queue: backoff, what a failure or a lost lease leads to, the length
gate, and RabbitMQ's delay tiers. Values and a clock in, decisions out; engines apply them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from photostack.blocks.queue._model import RetryPolicy, TaskState

__all__ = [
    "DELAY_TIERS_MS",
    "DepthGate",
    "FailureDecision",
    "backoff_delay_s",
    "decide_failure",
    "decide_lost_lease",
    "delay_tier_ms",
    "heartbeat_interval_s",
]


def backoff_delay_s(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """Seconds to wait before retrying after attempt ``attempt`` (1-based) failed.

    Exponential (``base * 2**(attempt-1)``, capped at ``max_delay_s``) with jitter: ``rand`` in
    [0, 1) takes off up to ``jitter_ratio`` of it, so retries of many tasks that failed together
    spread out instead of hitting the cause again at once.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    exponent = min(attempt - 1, 62)  # 2**62 s is far past any cap; avoids float overflow
    raw = min(policy.max_delay_s, policy.base_delay_s * math.pow(2.0, exponent))
    return raw * (1.0 - policy.jitter_ratio * rand)


@dataclass(frozen=True)
class FailureDecision:
    """After a failed attempt: ``DEAD``, or ``FAILED`` with a retry ``delay_s`` from now."""

    state: TaskState
    delay_s: float = 0.0


def decide_failure(
    policy: RetryPolicy, attempt: int, rand: float, *, permanent: bool = False
) -> FailureDecision:
    """What follows a failed attempt: retry with backoff, or the dead-letter queue when the
    attempts are used up (or the handler said no retry can help)."""
    if permanent or attempt >= policy.max_attempts:
        return FailureDecision(TaskState.DEAD)
    return FailureDecision(TaskState.FAILED, backoff_delay_s(policy, attempt, rand))


def decide_lost_lease(attempts: int, max_attempts: int) -> TaskState:
    """A task whose worker vanished mid-attempt goes back to the queue, unless it has used
    all its attempts: a task that kills every worker that runs it must not loop forever."""
    return TaskState.DEAD if attempts >= max_attempts else TaskState.QUEUED


def heartbeat_interval_s(visibility_timeout_s: float) -> float:
    """Extend a lease three times per visibility timeout: two heartbeats may be late or lost
    before another worker can take the task."""
    return visibility_timeout_s / 3.0


class DepthGate:
    """Decides when an enqueue must count the waiting tasks exactly before admitting one.

    Counting on every enqueue costs O(queue length) per insert. The gate keeps an estimate
    (last exact count plus this producer's enqueues since) and asks for an exact count only
    when the estimate is stale or near the limit, so a producer far from the limit pays
    nothing. Near the limit the engine counts under a lock, so the limit is exact there; far
    from it, other producers can fill the queue unseen for at most ``refresh_s``.
    """

    def __init__(self, limit: int, *, refresh_s: float = 0.5, near_ratio: float = 0.9) -> None:
        self.limit = limit
        self.refresh_s = refresh_s
        self.near = max(0, math.floor(limit * near_ratio) - 1)
        self._estimate = 0
        self._counted_at: float | None = None

    def __repr__(self) -> str:
        return f"<DepthGate estimate={self._estimate}/{self.limit}>"

    def needs_count(self, now: float) -> bool:
        stale = self._counted_at is None or now - self._counted_at >= self.refresh_s
        return stale or self._estimate >= self.near

    def counted(self, waiting: int, now: float) -> None:
        self._estimate = waiting
        self._counted_at = now

    def admits(self) -> bool:
        return self._estimate < self.limit

    def enqueued(self) -> None:
        self._estimate += 1


#: RabbitMQ delay tiers (per-queue TTL, so each tier queue expires strictly in FIFO order):
#: 50 ms doubling up to about 7.8 days. A delay goes to the largest tier not over it; a message
#: that arrives early is delayed again for the remainder, so no task runs before its time.
DELAY_TIERS_MS: tuple[int, ...] = tuple(50 * 2**k for k in range(24))


def delay_tier_ms(remaining_s: float, tiers: tuple[int, ...] = DELAY_TIERS_MS) -> int | None:
    """The tier for a task due in ``remaining_s``; None when it is due now (within the
    smallest tier, which is the scheduling tolerance)."""
    remaining_ms = remaining_s * 1000.0
    if remaining_ms < tiers[0]:
        return None
    chosen = tiers[0]
    for tier in tiers:
        if tier > remaining_ms:
            break
        chosen = tier
    return chosen
