"""Stampede protection: single-flight loads, probabilistic early refresh (XFetch), stale-if-error.

The decisions are pure (:func:`xfetch_refresh_due`, :func:`classify`); asyncio only drives them
(:class:`SingleFlight`, and :class:`ReadThrough` in ``_readthrough``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = [
    "Freshness",
    "SingleFlight",
    "Stored",
    "classify",
    "xfetch_refresh_due",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """At most one load per key in flight; concurrent callers for the same key share it.

    * N concurrent misses → 1 call of ``load``; all N get its value.
    * An error of the load reaches every caller that waits for it.
    * Cancelling one caller never cancels the load: the others still get the value (and when
      every caller gave up, the load still finishes, so its result can fill a cache).
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}
        self.loads = 0  # loads started
        self.joined = 0  # callers that shared a load already in flight

    def __repr__(self) -> str:
        return f"<SingleFlight in_flight={len(self._flights)} loads={self.loads}>"

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    async def do(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The result of ``load()``, or of the load for ``key`` already in flight."""
        task = self._flights.get(key)
        if task is None:
            task = self.start(key, load)
        else:
            self.joined += 1
        return await asyncio.shield(task)

    def start(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """Start (or join) the load for ``key`` without waiting: a background refresh."""
        task = self._flights.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            self._flights[key] = task
            self.loads += 1
            task.add_done_callback(lambda done: self._landed(key, done))
        return task

    def forget(self, key: K) -> None:
        """The next call for ``key`` starts a new load (the one in flight, if any, still
        finishes for its own waiters). Used when ``key`` is invalidated mid-load."""
        self._flights.pop(key, None)

    def _landed(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here: waiters that gave up must not leave it unseen


def xfetch_refresh_due(
    *, now_s: float, expires_at_s: float, delta_s: float, beta: float, rand: float
) -> bool:
    """XFetch (Vattani, Chierichetti and Lowenstein, "Optimal probabilistic cache stampede
    prevention", VLDB 2015): refresh early when ``now - delta·beta·ln(rand) >= expiry``.

    ``delta_s`` is how long the last recomputation took, ``beta`` > 1 favours earlier
    refreshes, ``rand`` is uniform in (0, 1]. The chance rises as expiry nears and is 1 at it.
    """
    if rand <= 0.0:
        rand = math.ulp(0.0)  # ln(0) is -inf: the earliest possible refresh, never an error
    return now_s - delta_s * beta * math.log(rand) >= expires_at_s


class Freshness(StrEnum):
    FRESH = "fresh"  # serve it
    REFRESH_EARLY = "refresh_early"  # serve it, and refresh it in the background
    STALE = "stale"  # past its TTL, but still servable if the loader fails (stale-if-error)
    MISSING = "missing"  # nothing servable


@dataclass(frozen=True, slots=True)
class Stored(Generic[V]):
    """A value as a read-through cache keeps it: when it stops being fresh, and how long its
    computation took (XFetch's delta)."""

    value: V
    fresh_until_s: float
    delta_s: float


def classify(
    stored: Stored[V] | None,
    *,
    now_s: float,
    beta: float,
    rand: float,
    stale_if_error_s: float,
) -> Freshness:
    """What a read-through cache should do with what it found (pure)."""
    if stored is None:
        return Freshness.MISSING
    if now_s < stored.fresh_until_s:
        if beta > 0 and xfetch_refresh_due(
            now_s=now_s,
            expires_at_s=stored.fresh_until_s,
            delta_s=stored.delta_s,
            beta=beta,
            rand=rand,
        ):
            return Freshness.REFRESH_EARLY
        return Freshness.FRESH
    if now_s < stored.fresh_until_s + stale_if_error_s:
        return Freshness.STALE
    return Freshness.MISSING
