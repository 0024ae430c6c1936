"""The global cache in its two forms, over any remote tier (normally a :class:`RingCache`).

* :class:`CacheAside`: the application manages the cache — it reads (``get``), loads from the
  database itself on a miss and fills (``fill``), and invalidates on writes.
* :class:`GlobalReadThrough`: a cache service that loads on a miss — ``lookup(key)`` returns the
  cached value or calls the loader (single-flight per key), refreshes early with XFetch and
  serves a stale value when the loader fails (stale-if-error).

Both store the same envelope, so the two forms can share keys: the payload after a header line
``<fresh_until_s> <delta_s>`` (wall-clock seconds, since several processes read it; the remote
TTL is ``ttl_s + stale_if_error_s``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from photostack.blocks.cache._bounded import Clock
from photostack.blocks.cache._readthrough import CacheStatus, ReadThroughConfig
from photostack.blocks.cache._stampede import Freshness, SingleFlight, Stored, classify

__all__ = [
    "CacheAside",
    "GlobalLookup",
    "GlobalReadThrough",
    "GlobalStats",
    "RemoteTier",
    "decode_envelope",
    "encode_envelope",
]


class RemoteTier(Protocol):
    """What the global forms need of a remote cache (a :class:`RingCache` has it)."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> bool: ...

    async def delete(self, keys: Iterable[str]) -> None: ...


def encode_envelope(stored: Stored[bytes]) -> bytes:
    return b"%.6f %.6f\n%s" % (stored.fresh_until_s, stored.delta_s, stored.value)


def decode_envelope(raw: bytes | None) -> Stored[bytes] | None:
    """None for None or for bytes that are not an envelope (written by someone else)."""
    if raw is None:
        return None
    head, sep, payload = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 2:
        return None
    try:
        return Stored(payload, float(fields[0]), float(fields[1]))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class GlobalLookup:
    """``value`` None: the loader found nothing (not cached)."""

    value: bytes | None
    status: CacheStatus


@dataclass(slots=True)
class GlobalStats:
    hits: int = 0
    misses: int = 0
    stale_served: int = 0
    early_refreshes: int = 0
    loads: int = 0
    load_errors: int = 0


class CacheAside:
    """The application-managed form: ``get`` / ``fill`` / ``invalidate``."""

    def __init__(
        self, tier: RemoteTier, config: ReadThroughConfig, *, clock: Clock = time.time
    ) -> None:
        self._tier = tier
        self._config = config
        self._clock = clock
        self.stats = GlobalStats()

    async def get(self, key: str) -> bytes | None:
        """The value while fresh, else None (the caller loads and fills)."""
        stored = decode_envelope(await self._tier.get(key))
        if stored is not None and self._clock() < stored.fresh_until_s:
            self.stats.hits += 1
            return stored.value
        self.stats.misses += 1
        return None

    async def fill(self, key: str, value: bytes, delta_s: float = 0.0) -> bool:
        cfg = self._config
        stored = Stored(value, self._clock() + cfg.ttl_s, delta_s)
        return await self._tier.set(key, encode_envelope(stored), cfg.ttl_s + cfg.stale_if_error_s)

    async def invalidate(self, keys: Iterable[str]) -> None:
        await self._tier.delete(keys)


class GlobalReadThrough:
    """The loader-backed form: ``await g.lookup(key)``."""

    def __init__(
        self,
        tier: RemoteTier,
        loader: Callable[[str], Awaitable[bytes | None]],
        config: ReadThroughConfig,
        *,
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
        single_flight: bool = True,
    ) -> None:
        self._tier = tier
        self._loader = loader
        self._config = config
        self._clock = clock
        self._rand = rand
        self._single_flight = single_flight
        self._flights: SingleFlight[str, bytes | None] = SingleFlight()
        self._background: set[asyncio.Task[bytes | None]] = set()
        self.stats = GlobalStats()

    @property
    def flights(self) -> SingleFlight[str, bytes | None]:
        return self._flights

    async def lookup(
        self, key: str, loader: Callable[[str], Awaitable[bytes | None]] | None = None
    ) -> GlobalLookup:
        """Raises what the loader raises when nothing servable is cached. ``loader`` replaces
        the default one for this call (a read path that knows how to load this key)."""
        load = loader or self._loader
        stored = decode_envelope(await self._tier.get(key))
        cfg = self._config
        verdict = classify(
            stored,
            now_s=self._clock(),
            beta=cfg.beta,
            rand=1.0 - self._rand(),
            stale_if_error_s=cfg.stale_if_error_s,
        )
        if stored is not None and verdict in (Freshness.FRESH, Freshness.REFRESH_EARLY):
            self.stats.hits += 1
            if verdict is Freshness.REFRESH_EARLY and not self._flights.in_flight(key):
                self.stats.early_refreshes += 1
                task = self._flights.start(key, lambda: self._load(key, load))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return GlobalLookup(stored.value, CacheStatus.HIT)
        self.stats.misses += 1
        try:
            if self._single_flight:
                value = await self._flights.do(key, lambda: self._load(key, load))
            else:
                value = await self._load(key, load)
        except Exception:
            if stored is not None and verdict is Freshness.STALE:
                self.stats.stale_served += 1
                return GlobalLookup(stored.value, CacheStatus.STALE)
            raise
        return GlobalLookup(value, CacheStatus.MISS)

    async def invalidate(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` remotely; loads in flight for them will not be joined any more."""
        keys = list(keys)
        for key in keys:
            self._flights.forget(key)
        await self._tier.delete(keys)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _load(
        self, key: str, loader: Callable[[str], Awaitable[bytes | None]]
    ) -> bytes | None:
        self.stats.loads += 1
        started = self._clock()
        try:
            value = await loader(key)
        except Exception:
            self.stats.load_errors += 1
            raise
        if value is not None:
            now = self._clock()
            cfg = self._config
            stored = Stored(value, now + cfg.ttl_s, max(0.0, now - started))
            await self._tier.set(key, encode_envelope(stored), cfg.ttl_s + cfg.stale_if_error_s)
        return value
