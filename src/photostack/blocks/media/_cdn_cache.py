"""What the CDN edge keeps: cached objects, their freshness, and the byte-bounded cache (pure).

A ``CachedObject`` holds one origin response in the form a cache hit sends it: the whole
``200`` response (head and body, ``X-Cache: HIT``) as one bytes object, so the common hit is
one ``transport.write`` of a prebuilt buffer; other answers (304, 206, HEAD, HTTP/1.0) are built
from its fields, the body being a memoryview into the same buffer (held once).

``CdnCache`` is the block cache's ``BoundedCache`` (LRU by default) bounded in bytes, with an
injected clock: an entry is FRESH until its max-age passed, then STALE (served while one
background request revalidates it) for its ``stale-while-revalidate`` window, then EXPIRED
(fetched again; still served on origin failure for its ``stale-if-error`` window).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from photostack.blocks.cache import BoundedCache, PolicyName, make_policy
from photostack.blocks.media._http import response_head
from photostack.blocks.media._rules import Freshness

__all__ = ["CacheState", "CachedObject", "CdnCache", "CdnCacheStats"]

_ENTRY_OVERHEAD_BYTES = 256  # bookkeeping per entry, counted against the byte bound


class CacheState(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # past max-age, inside stale-while-revalidate: serve, refresh in background
    EXPIRED = "expired"  # fetch again; serve only if the origins fail (stale-if-error)


class CachedObject:
    """One cached response; immutable except for its freshness (replaced on revalidation)."""

    __slots__ = (
        "body_offset",
        "cache_control",
        "content_type",
        "etag",
        "fresh_until",
        "hit_response",
        "key",
        "size",
        "stale_if_error_until",
        "swr_until",
    )

    def __init__(
        self,
        key: str,
        *,
        body: bytes,
        content_type: str,
        etag: str,
        cache_control: str,
        freshness: Freshness,
        now: float,
    ) -> None:
        self.key = key
        self.content_type = content_type
        self.etag = etag
        self.cache_control = cache_control
        self.size = len(body)
        head = response_head(
            200,
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("ETag", etag),
                ("Cache-Control", cache_control),
                ("Accept-Ranges", "bytes"),
                ("X-Cache", "HIT"),
                ("X-Cache-Tier", "memory"),
            ],
            keep_alive=True,
        )
        self.hit_response = head + body
        self.body_offset = len(head)
        self.fresh_until = now
        self.swr_until = now
        self.stale_if_error_until = now
        self.refresh(freshness, now)

    def __repr__(self) -> str:
        return f"<CachedObject {self.key[:12]} {self.size}B>"

    @property
    def body(self) -> memoryview:
        return memoryview(self.hit_response)[self.body_offset :]

    @property
    def cost_bytes(self) -> int:
        return len(self.hit_response) + _ENTRY_OVERHEAD_BYTES

    def refresh(self, freshness: Freshness, now: float) -> None:
        """New freshness terms from ``now`` (a 200 or a 304 from an origin)."""
        self.fresh_until = now + freshness.max_age_s
        self.swr_until = self.fresh_until + freshness.stale_while_revalidate_s
        self.stale_if_error_until = self.fresh_until + freshness.stale_if_error_s

    def state(self, now: float) -> CacheState:
        if now < self.fresh_until:
            return CacheState.FRESH
        if now < self.swr_until:
            return CacheState.STALE
        return CacheState.EXPIRED

    def usable_on_error(self, now: float) -> bool:
        return now < max(self.stale_if_error_until, self.swr_until)


@dataclass(slots=True)
class CdnCacheStats:
    entries: int
    bytes_used: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class CdnCache:
    """Objects by key, at most ``max_bytes`` in all (entry cost: the response plus 256 bytes);
    objects over ``max_entry_bytes`` are not kept."""

    def __init__(
        self,
        max_bytes: int,
        *,
        max_entry_bytes: int | None = None,
        policy: PolicyName = PolicyName.LRU,
        clock: Callable[[], float],
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes or max_bytes, max_bytes)
        self.clock = clock
        self._cache: BoundedCache[str, CachedObject] = BoundedCache(
            make_policy(policy),
            max_bytes=max_bytes,
            sizer=lambda _key, obj: obj.cost_bytes,  # type: ignore[attr-defined]
            clock=clock,
        )

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def get(self, key: str) -> CachedObject | None:
        """The object (an access for the eviction policy), or None."""
        return self._cache.get(key)

    def peek(self, key: str) -> CachedObject | None:
        return self._cache.peek(key)

    def fits(self, size: int) -> bool:
        return size + _ENTRY_OVERHEAD_BYTES <= self.max_entry_bytes

    def store(self, obj: CachedObject) -> bool:
        """Keep ``obj`` (evicting least recently used ones); False when it is too large."""
        if obj.cost_bytes > self.max_entry_bytes:
            return False
        self._cache.put(obj.key, obj)
        return True

    def purge(self, key: str) -> bool:
        return self._cache.delete(key)

    def stats(self) -> CdnCacheStats:
        s = self._cache.stats
        return CdnCacheStats(
            entries=len(self._cache),
            bytes_used=self._cache.bytes_used,
            max_bytes=self.max_bytes,
            hits=s.hits,
            misses=s.misses,
            evictions=s.evictions,
        )
