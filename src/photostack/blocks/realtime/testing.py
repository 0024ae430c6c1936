"""In-memory doubles: an event log and a pub/sub bus, for tests and single-process use."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import LogUnavailableError, NotifierUnavailableError
from ._model import Event, LogRead

__all__ = ["LocalBus", "LocalNotifier", "MemoryEventLog", "make_event"]


def make_event(seq: int, type_: str = "test.event", data: dict[str, Any] | None = None) -> Event:
    body = json.dumps({"seq": seq, "type": type_, "data": data or {}, "at": "t"})
    return Event(seq, type_, body.encode("utf-8"))


class MemoryEventLog:
    """Per-key lists of events; ``available = False`` makes reads raise LogUnavailableError."""

    def __init__(self) -> None:
        self.available = True
        self.reads = 0
        self.fresh_reads = 0
        self._events: dict[str, list[Event]] = {}

    def append(
        self, key: str, type_: str = "test.event", data: dict[str, Any] | None = None
    ) -> Event:
        events = self._events.setdefault(key, [])
        event = make_event(events[-1].seq + 1 if events else 1, type_, data)
        events.append(event)
        return event

    def trim(self, key: str, keep: int) -> None:
        events = self._events.get(key, [])
        del events[: max(0, len(events) - keep)]

    def head(self, key: str) -> int:
        events = self._events.get(key)
        return events[-1].seq if events else 0

    async def read(self, key: str, after: int, *, limit: int, fresh: bool = False) -> LogRead:
        if not self.available:
            raise LogUnavailableError("memory log switched off")
        self.reads += 1
        self.fresh_reads += int(fresh)
        newer = [e for e in self._events.get(key, []) if e.seq > after]
        return LogRead(tuple(newer[:limit]), more=len(newer) > limit)


OnEvents = Callable[[str, Sequence[Event]], None]


class LocalNotifier:
    """One process's subscriptions on a :class:`LocalBus` (a :class:`Notifier`)."""

    def __init__(self, bus: LocalBus, on_events: OnEvents) -> None:
        self._bus = bus
        self._on_events = on_events
        self.keys: set[str] = set()

    async def subscribe(self, key: str) -> None:
        if not self._bus.available:
            raise NotifierUnavailableError("local bus switched off")
        self.keys.add(key)

    def unsubscribe(self, key: str) -> None:
        self.keys.discard(key)


class LocalBus:
    """Pub/sub in one process. ``drop_next`` loses the next N publications (as a lossy network)."""

    def __init__(self) -> None:
        self.available = True
        self.drop_next = 0
        self.published = 0
        self._notifiers: list[LocalNotifier] = []

    def notifier(self, on_events: OnEvents) -> LocalNotifier:
        notifier = LocalNotifier(self, on_events)
        self._notifiers.append(notifier)
        return notifier

    def publish(self, key: str, event: Event) -> None:
        self.published += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        for notifier in self._notifiers:
            if key in notifier.keys:
                notifier._on_events(key, (event,))
