"""The micro-cache and collapsed forwarding: stored responses and requests in flight, by key.

``MicroCache`` is plain data with an injected clock (no I/O). ``Flights`` lets one request per
key go upstream while identical ones wait for its outcome; it only touches asyncio futures.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Buffered", "CacheEntry", "Flight", "Flights", "MicroCache", "request_key"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Buffered:
    """A whole response held in memory (shared by collapsed requests, kept by the cache)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    backend: str


@dataclass(frozen=True, slots=True)
class CacheEntry:
    response: Buffered
    fresh_until: float
    stale_until: float  # serve on upstream failure until then


def request_key(method: str, target: str, headers: Sequence[tuple[str, str]]) -> str:
    """What makes two requests identical for sharing: method, host, target, and the request
    headers a response may depend on (credentials included, so users never share)."""
    host = accept = encoding = auth = cookie = ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "host":
            host = value
        elif lowered == "accept":
            accept = value
        elif lowered == "accept-encoding":
            encoding = value
        elif lowered == "authorization":
            auth = value
        elif lowered == "cookie":
            cookie = value
    return "\n".join((method, host, target, accept, encoding, auth, cookie))


class MicroCache:
    """At most ``max_entries`` responses, least recently used evicted first."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_served = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: str) -> Buffered | None:
        entry = self._entries.get(key)
        if entry is None or entry.fresh_until <= self._clock():
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.response

    def stale(self, key: str) -> Buffered | None:
        """A stored response past freshness but inside its stale-if-error window."""
        entry = self._entries.get(key)
        if entry is None or entry.stale_until <= self._clock():
            return None
        self.stale_served += 1
        return entry.response

    def store(self, key: str, response: Buffered, fresh_s: float, stale_s: float) -> None:
        now = self._clock()
        self._entries[key] = CacheEntry(response, now + fresh_s, now + fresh_s + stale_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class Flight:
    """One upstream request that identical requests wait on."""

    __slots__ = ("followers", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Buffered | None] = loop.create_future()
        self.followers = 0

    def finish(self, response: Buffered | None) -> None:
        """The shared outcome; None tells followers to go upstream themselves."""
        if not self.future.done():
            self.future.set_result(response)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # retrieved: a flight nobody followed must not warn


class Flights:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self.collapsed = 0  # requests answered from another request's upstream response

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def waiting(self) -> int:
        """Followers waiting right now, over all flights."""
        return sum(f.followers for f in self._flights.values())

    def join(self, key: str) -> Flight | None:
        """The flight to follow, or None after registering the caller as the leader of a new one
        (it must then call ``land``)."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.followers += 1
            return flight
        self._flights[key] = Flight(asyncio.get_running_loop())
        return None

    def flight(self, key: str) -> Flight:
        return self._flights[key]

    def land(self, key: str, response: Buffered | None) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.finish(response)

    def crash(self, key: str, exc: BaseException) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.fail(exc)
