"""When a failed try may be repeated on another backend: a pure rule.

A request that never reached a backend can go elsewhere whatever its method. One that may have
reached it is repeated only when doing it twice is harmless: an idempotent method, or a client
that said so with an ``Idempotency-Key`` header.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from photostack.blocks.balancer._errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

__all__ = [
    "IDEMPOTENT_METHODS",
    "FailureStage",
    "failure_reason",
    "is_idempotent",
    "max_tries_for",
    "may_retry",
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


def failure_reason(exc: UpstreamError) -> str:
    """A short label for metrics: connect, reset, timeout, protocol."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    if isinstance(exc, UpstreamConnectError):
        return "reset" if exc.request_sent else "connect"
    return "other"
