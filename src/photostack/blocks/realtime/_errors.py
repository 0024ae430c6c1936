"""The realtime block's one error root and its families."""

from __future__ import annotations

__all__ = [
    "HubDrainingError",
    "HubFullError",
    "HubUnavailableError",
    "LogUnavailableError",
    "MalformedEventError",
    "NotifierUnavailableError",
    "RealtimeError",
]


class RealtimeError(Exception):
    """Root of every error this block raises."""


class HubUnavailableError(RealtimeError):
    """The hub takes no new connection now: the caller answers 503 with ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HubFullError(HubUnavailableError):
    """The node holds its connection limit."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(f"connection limit {limit} reached", retry_after_s)
        self.limit = limit


class HubDrainingError(HubUnavailableError):
    """The node is stopping: connect elsewhere."""


class LogUnavailableError(RealtimeError):
    """The event log could not be read right now (remote: retry later)."""


class NotifierUnavailableError(RealtimeError):
    """The pub/sub layer could not confirm a subscription in time (remote: retry later)."""


class MalformedEventError(RealtimeError, ValueError):
    """Bytes that are not an event: a JSON object with an int ``seq`` >= 1 and a str ``type``."""
