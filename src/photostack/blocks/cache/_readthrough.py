"""A read-through cache: on a miss it loads from the system of record, with single-flight,
XFetch early refresh and stale-if-error around the load.

The same class is the app's local cache (over a :class:`BoundedCache`) and, given a loader that
reads a remote cache tier first, the front of the global one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from photostack.blocks.cache._bounded import BoundedCache, Clock
from photostack.blocks.cache._errors import CacheFullError
from photostack.blocks.cache._stampede import Freshness, SingleFlight, Stored, classify

__all__ = ["CacheStatus", "Lookup", "ReadThrough", "ReadThroughConfig", "ReadThroughStats"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class ReadThroughConfig:
    """``ttl_s``: how long a loaded value is fresh. ``beta``: XFetch's eagerness (0 turns early
    refresh off; 1 is the paper's optimum for one recomputation). ``stale_if_error_s``: how long
    past its TTL a value may still be served when the loader fails."""

    ttl_s: float
    beta: float = 1.0
    stale_if_error_s: float = 0.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.beta < 0 or self.stale_if_error_s < 0:
            raise ValueError(f"bad read-through config {self!r}")


class CacheStatus(StrEnum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"  # served past its TTL because the loader failed (stale-if-error)


@dataclass(frozen=True, slots=True)
class Lookup(Generic[V]):
    value: V
    status: CacheStatus


@dataclass(slots=True)
class ReadThroughStats:
    hits: int = 0
    misses: int = 0
    early_refreshes: int = 0
    stale_served: int = 0
    load_errors: int = 0


class ReadThrough(Generic[K, V]):
    """``await rt.get(key)``: the cached value, or the loader's (one load per key at a time)."""

    def __init__(
        self,
        cache: BoundedCache[K, Stored[V]],
        loader: Callable[[K], Awaitable[V]],
        config: ReadThroughConfig,
        *,
        clock: Clock = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._cache = cache
        self._loader = loader
        self._config = config
        self._clock = clock
        self._rand = rand
        self._flights: SingleFlight[K, V] = SingleFlight()
        self._tokens: dict[K, object] = {}
        self._background: set[asyncio.Task[V]] = set()
        self.stats = ReadThroughStats()

    def __repr__(self) -> str:
        return f"<ReadThrough {self._cache!r} {self.stats}>"

    @property
    def flights(self) -> SingleFlight[K, V]:
        return self._flights

    async def get(self, key: K) -> V:
        return (await self.lookup(key)).value

    async def lookup(self, key: K) -> Lookup[V]:
        """The value and whether it was a hit. Raises whatever the loader raises when there is
        nothing servable."""
        stored = self._cache.get(key)
        cfg = self._config
        # 1 - random() lies in (0, 1], the domain XFetch's logarithm needs.
        verdict = classify(
            stored,
            now_s=self._clock(),
            beta=cfg.beta,
            rand=1.0 - self._rand(),
            stale_if_error_s=cfg.stale_if_error_s,
        )
        if stored is not None and verdict is Freshness.FRESH:
            self.stats.hits += 1
            return Lookup(stored.value, CacheStatus.HIT)
        if stored is not None and verdict is Freshness.REFRESH_EARLY:
            self.stats.hits += 1
            if not self._flights.in_flight(key):
                self.stats.early_refreshes += 1
                task = self._flights.start(key, lambda: self._load(key))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return Lookup(stored.value, CacheStatus.HIT)
        self.stats.misses += 1
        try:
            value = await self._flights.do(key, lambda: self._load(key))
        except Exception:
            if stored is not None and verdict is Freshness.STALE:
                self.stats.stale_served += 1
                return Lookup(stored.value, CacheStatus.STALE)
            raise
        return Lookup(value, CacheStatus.MISS)

    def invalidate(self, key: K) -> None:
        """Drop ``key``; a load already in flight will not store its (possibly older) value."""
        self._cache.delete(key)
        self._tokens.pop(key, None)
        self._flights.forget(key)

    async def aclose(self) -> None:
        """Cancel background refreshes."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _load(self, key: K) -> V:
        token = object()
        self._tokens[key] = token
        started = self._clock()
        try:
            value = await self._loader(key)
        except Exception:
            self.stats.load_errors += 1
            raise
        finally:
            if self._tokens.get(key) is token:
                del self._tokens[key]
                still_valid = True
            else:
                still_valid = False
        if still_valid:
            now = self._clock()
            stored = Stored(value, now + self._config.ttl_s, max(0.0, now - started))
            # Served but not cached when the cache refuses to evict or the value is too large.
            with contextlib.suppress(CacheFullError):
                self._cache.put(key, stored, self._config.ttl_s + self._config.stale_if_error_s)
        return value
