"""The queue's one error root and its families, split by cause.

The API decides by family: ``TaskNotFound`` is a 404, ``QueueFull`` a 503 with Retry-After,
``PayloadTooLarge`` a 413, ``QueueUnavailable`` a 503 without a hint (the engine is down).
"""

from __future__ import annotations

__all__ = [
    "IllegalTransition",
    "LeaseLost",
    "PayloadTooLarge",
    "PermanentTaskError",
    "QueueConfigError",
    "QueueError",
    "QueueFull",
    "QueueUnavailable",
    "TaskNotFound",
]


class QueueError(Exception):
    """Root of every error raised by the queue block."""


class QueueConfigError(QueueError, ValueError):
    """Queue settings that cannot work (bad limit, bad name). One line for the user."""


class IllegalTransition(QueueError):
    """A task state change the transition table does not allow (a bug, not bad luck)."""


class TaskNotFound(QueueError, LookupError):
    """No task with this id was ever enqueued (or it was rolled back): the API answers 404."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id!r}")
        self.task_id = task_id


class QueueFull(QueueError):
    """The queue holds its maximum of waiting tasks; nothing was written. Try again later."""

    def __init__(self, queue: str, limit: int, retry_after_s: float) -> None:
        super().__init__(f"queue {queue!r} is full ({limit} waiting tasks)")
        self.queue = queue
        self.limit = limit
        #: A hint for the Retry-After header (seconds, rounded up by the caller).
        self.retry_after_s = retry_after_s


class PayloadTooLarge(QueueError, ValueError):
    """The encoded payload is over the queue's limit; nothing was written."""

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(f"task payload is {size_bytes} bytes, the limit is {limit_bytes}")
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class LeaseLost(QueueError):
    """This worker no longer holds the task's lease (it expired and another worker may run it).

    The worker must not report a result: it stops the handler and moves on.
    """


class QueueUnavailable(QueueError):
    """The engine could not be reached or failed mid-operation (remote, possibly transient)."""


class PermanentTaskError(QueueError):
    """Raised by a task handler for a failure no retry can fix: the task goes dead at once."""
