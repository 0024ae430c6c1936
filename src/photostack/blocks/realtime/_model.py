"""What flows through the block: events with per-key offsets, and the log they are read from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._errors import MalformedEventError

__all__ = ["Event", "EventLog", "LogRead", "last_seq"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of one key's log: its offset, its type, and its JSON encoding as sent to clients.

    ``body`` is a JSON object carrying at least ``seq`` and ``type`` (the block never looks at
    anything else in it).
    """

    seq: int
    type: str
    body: bytes

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        """Parse one event. Raises MalformedEventError."""
        data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedEventError("event is not JSON") from exc
        if not isinstance(obj, dict):
            raise MalformedEventError("event is not a JSON object")
        seq, kind = obj.get("seq"), obj.get("type")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise MalformedEventError("event seq must be an int >= 1")
        if not isinstance(kind, str) or not kind:
            raise MalformedEventError("event type must be a non-empty string")
        return cls(seq, kind, data)


@dataclass(frozen=True, slots=True)
class LogRead:
    """Events after some offset, in seq order; ``more`` when the page was full (read again)."""

    events: tuple[Event, ...]
    more: bool = False


def last_seq(events: Sequence[Event], default: int) -> int:
    """The seq of the last event, or ``default`` for none (the ``next`` a reader passes back)."""
    return events[-1].seq if events else default


class EventLog(Protocol):
    """Where a key's events are kept (the truth; pub/sub only wakes readers)."""

    async def read(self, key: str, after: int, *, limit: int, fresh: bool = False) -> LogRead:
        """Up to ``limit`` events of ``key`` with seq > ``after``, oldest first.

        ``fresh`` asks to bypass any cache in front of the log. Raises LogUnavailableError.
        """
        ...
