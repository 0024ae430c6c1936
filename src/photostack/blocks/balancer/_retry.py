"""When a failed try may be repeated on another backend: a pure rule.

A request that never reached a backend can go elsewhere whatever its method. One that may have
reached it is repeated only when doing it twice is harmless: an idempotent method, or a client
that said so with an ``Idempotency-Key`` header.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from photostack.blocks.balancer._errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

__all__ = [
    "IDEMPOTENT_METHODS",
    "FailureStage",
    "RetryVerdict",
    "failure_reason",
    "is_idempotent",
    "max_tries_for",
    "may_retry",
    "retry_verdict",
]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class FailureStage(enum.Enum):
    BEFORE_SEND = "before_send"  # certain that no byte reached the backend
    AFTER_SEND = "after_send"  # the backend may have seen (and acted on) the request

    @classmethod
    def of(cls, exc: UpstreamError) -> FailureStage:
        return cls.AFTER_SEND if exc.request_sent else cls.BEFORE_SEND


def is_idempotent(method: str, headers: Iterable[tuple[str, str]]) -> bool:
    if method.upper() in IDEMPOTENT_METHODS:
        return True
    return any(name.lower() == "idempotency-key" and value for name, value in headers)


def max_tries_for(backend_count: int, cap: int = 3) -> int:
    """Tries per request: one per backend, at most ``cap``, at least one."""
    return max(1, min(backend_count, cap))


def may_retry(
    *,
    method: str,
    headers: Iterable[tuple[str, str]],
    stage: FailureStage,
    tries_done: int,
    max_tries: int,
) -> bool:
    """Whether another try is allowed after ``tries_done`` tries, the last failing at ``stage``."""
    if tries_done >= max_tries:
        return False
    return stage is FailureStage.BEFORE_SEND or is_idempotent(method, headers)


class RetryVerdict(enum.Enum):
    RETRY = "retry"
    NO_TRIES_LEFT = "no_tries_left"
    MAY_HAVE_BEEN_PROCESSED = "may_have_been_processed"  # sent, and not safe to repeat
    DEADLINE = "deadline"  # the request's total deadline has passed
    BUDGET_EXHAUSTED = "budget_exhausted"
    BODY_NOT_REPLAYABLE = "body_not_replayable"  # a streamed body was (partly) sent: gone


def retry_verdict(
    *,
    method: str,
    headers: Iterable[tuple[str, str]],
    stage: FailureStage,
    tries_done: int,
    max_tries: int,
    time_left_s: float,
    budget_allows: Callable[[], bool],
    body_replayable: bool = True,
) -> RetryVerdict:
    """The whole retry decision, in order: tries, safety, deadline, then the budget.

    ``body_replayable`` is False for a request whose body was streamed from a source that
    cannot be read twice: once it was sent, not even an idempotent request can be repeated.
    ``budget_allows`` is called (and spends one retry) only when everything else allows a retry.
    """
    if tries_done >= max_tries:
        return RetryVerdict.NO_TRIES_LEFT
    if stage is FailureStage.AFTER_SEND:
        if not is_idempotent(method, headers):
            return RetryVerdict.MAY_HAVE_BEEN_PROCESSED
        if not body_replayable:
            return RetryVerdict.BODY_NOT_REPLAYABLE
    if time_left_s <= 0:
        return RetryVerdict.DEADLINE
    if not budget_allows():
        return RetryVerdict.BUDGET_EXHAUSTED
    return RetryVerdict.RETRY


def failure_reason(exc: UpstreamError) -> str:
    """A short label for metrics: connect, reset, timeout, protocol."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    if isinstance(exc, UpstreamConnectError):
        return "reset" if exc.request_sent else "connect"
    return "other"
