"""A cache bounded by entry count and bytes, with TTL, over any eviction :class:`Policy`.

Pure: time comes from an injected clock (seconds, monotonic), randomness from an injected
``randbelow``. Expiry is lazy (an expired entry found by a read is dropped then) plus an
incremental active sweep like Redis's: sample keys that carry a TTL, drop the expired ones, and
go on while more than a quarter of a sample was expired.

Room is made *before* a write lands, so the incoming key is never its own victim (a LIFO or MRU
cache would otherwise drop what it is storing). An overwrite counts as an access and keeps the
key's policy state, unless the policy picks that very key to make room, in which case the new
value is stored as a new key.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from photostack.blocks.cache._errors import CacheFullError
from photostack.blocks.cache._lfu import LFUPolicy
from photostack.blocks.cache._policy import (
    FIFOPolicy,
    LIFOPolicy,
    LRUPolicy,
    MRUPolicy,
    NoEvictionPolicy,
    Policy,
    PolicyName,
    RandBelow,
    RandomPolicy,
    RandomSet,
)

__all__ = ["BoundedCache", "CacheStats", "Clock", "default_sizer", "make_policy"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Clock = Callable[[], float]
Sizer = Callable[[object, object], int]

SWEEP_SAMPLE = 20  # Redis's ACTIVE_EXPIRE_CYCLE_KEYS_PER_LOOP
SWEEP_REPEAT_ABOVE = 0.25  # go on while more than this share of a sample had expired
SWEEP_MAX_ROUNDS = 16


def default_sizer(key: object, value: object) -> int:
    """``len`` of bytes and strings, ``sys.getsizeof`` of anything else, key plus value."""
    return _size(key) + _size(value)


def _size(item: object) -> int:
    if isinstance(item, bytes | bytearray | str | memoryview):
        return len(item)
    return sys.getsizeof(item)


def make_policy(name: PolicyName, randbelow: RandBelow | None = None) -> Policy[K]:
    """A fresh, empty policy of the named kind."""
    if name is PolicyName.RANDOM:
        return RandomPolicy(randbelow)
    factories: dict[PolicyName, Callable[[], Policy[K]]] = {
        PolicyName.LRU: LRUPolicy,
        PolicyName.LFU: LFUPolicy,
        PolicyName.FIFO: FIFOPolicy,
        PolicyName.LIFO: LIFOPolicy,
        PolicyName.MRU: MRUPolicy,
        PolicyName.NOEVICTION: NoEvictionPolicy,
    }
    return factories[name]()


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0

    @property
    def hit_ratio(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class _Entry(Generic[V]):
    __slots__ = ("expires_at", "size", "value")

    def __init__(self, value: V, size: int, expires_at: float | None) -> None:
        self.value = value
        self.size = size
        self.expires_at = expires_at


class BoundedCache(Generic[K, V]):
    """Key → value with eviction by ``policy`` once ``max_entries`` or ``max_bytes`` would be
    exceeded (None: unbounded on that axis), and per-entry TTL in seconds."""

    def __init__(
        self,
        policy: Policy[K],
        *,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        sizer: Sizer = default_sizer,
        clock: Clock = time.monotonic,
        randbelow: RandBelow | None = None,
    ) -> None:
        _check_bounds(max_entries, max_bytes)
        self._policy = policy
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._sizer = sizer
        self._clock = clock
        self._entries: dict[K, _Entry[V]] = {}
        self._expiring: RandomSet[K] = RandomSet(randbelow or random.Random().randrange)
        self._bytes = 0
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return (
            f"<BoundedCache {self._policy.name.short} entries={len(self._entries)}"
            f"/{self._max_entries} bytes={self._bytes}/{self._max_bytes}>"
        )

    # -- introspection ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries held, including expired ones no read or sweep has dropped yet."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return self._live(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    @property
    def policy(self) -> Policy[K]:
        return self._policy

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def max_entries(self) -> int | None:
        return self._max_entries

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def expiring_count(self) -> int:
        """Entries that carry a TTL."""
        return len(self._expiring)

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value (an access for the policy, a hit) or ``default`` (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return default
        if entry.expires_at is not None and self._clock() >= entry.expires_at:
            self._forget(key, entry)
            self.stats.expirations += 1
            self.stats.misses += 1
            return default
        self._policy.on_access(key)
        self.stats.hits += 1
        return entry.value

    def peek(self, key: K) -> V | None:
        """The value without touching the policy or the hit counters (expiry still applies)."""
        entry = self._live(key)
        return None if entry is None else entry.value

    def expires_in(self, key: K) -> float | None:
        """Seconds left before ``key`` expires, None when it has no TTL; KeyError if absent."""
        entry = self._live(key)
        if entry is None:
            raise KeyError(key)
        if entry.expires_at is None:
            return None
        return entry.expires_at - self._clock()

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: K, value: V, ttl_s: float | None = None, *, keep_ttl: bool = False) -> None:
        """Store ``value``, evicting as the policy says. ``ttl_s`` (> 0) sets a TTL, None clears
        it unless ``keep_ttl``. Raises CacheFullError when the policy refuses to evict or the
        entry alone exceeds ``max_bytes``; the cache is then unchanged."""
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        size = self._sizer(key, value)
        if self._max_bytes is not None and size > self._max_bytes:
            raise CacheFullError(f"an entry of {size} bytes exceeds max_bytes={self._max_bytes}")
        old = self._live(key)
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        if keep_ttl and old is not None and ttl_s is None:
            expires_at = old.expires_at
        if self._needs_room(key, size):
            self._make_room(key, size)
            old = self._entries.get(key)  # the policy may have chosen this key as a victim
        if old is None:
            self._entries[key] = _Entry(value, size, expires_at)
            self._policy.on_insert(key)
        else:
            self._bytes -= old.size
            old.value, old.size, old.expires_at = value, size, expires_at
            self._policy.on_access(key)
        self._bytes += size
        if expires_at is None:
            self._expiring.discard(key)
        else:
            self._expiring.add(key)

    def delete(self, key: K) -> bool:
        """Drop ``key``; True when it was there (and not expired)."""
        entry = self._live(key)
        if entry is None:
            return False
        self._forget(key, entry)
        return True

    def expire(self, key: K, ttl_s: float | None) -> bool:
        """Set (``ttl_s``) or clear (None) the TTL of ``key``; ``ttl_s`` <= 0 deletes it.
        False when ``key`` is absent."""
        entry = self._live(key)
        if entry is None:
            return False
        if ttl_s is not None and ttl_s <= 0:
            self._forget(key, entry)
            return True
        if ttl_s is None:
            entry.expires_at = None
            self._expiring.discard(key)
        else:
            entry.expires_at = self._clock() + ttl_s
            self._expiring.add(key)
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self._policy.on_remove(key)
        self._entries.clear()
        self._expiring.clear()
        self._bytes = 0

    def sweep(self, sample: int = SWEEP_SAMPLE, max_rounds: int = SWEEP_MAX_ROUNDS) -> int:
        """One active-expiry cycle: sample up to ``sample`` keys with a TTL and drop the expired;
        repeat while more than a quarter of a sample expired, at most ``max_rounds`` times.
        Returns how many keys expired."""
        expired = 0
        now = self._clock()
        for _ in range(max_rounds):
            found = 0
            tries = min(sample, len(self._expiring))
            for _ in range(tries):
                key = self._expiring.choice()
                entry = self._entries[key]
                if entry.expires_at is not None and now >= entry.expires_at:
                    self._forget(key, entry)
                    found += 1
            expired += found
            if tries == 0 or found <= tries * SWEEP_REPEAT_ABOVE:
                break
        self.stats.expirations += expired
        return expired

    # -- configuration ----------------------------------------------------------------------

    def resize(self, *, max_entries: int | None, max_bytes: int | None) -> None:
        """New bounds; evicts down to them (a ``noeviction`` cache keeps what it holds and
        refuses writes until it is under the bound again)."""
        _check_bounds(max_entries, max_bytes)
        self._max_entries, self._max_bytes = max_entries, max_bytes
        try:
            while self._over(0, 0):
                self._evict_one()
        except CacheFullError:
            pass

    def set_policy(self, policy: Policy[K]) -> None:
        """Switch policies; the new one learns the current keys in their storage order."""
        for key in self._entries:
            policy.on_insert(key)
        self._policy = policy

    # -- internals --------------------------------------------------------------------------

    def _live(self, key: K) -> _Entry[V] | None:
        entry = self._entries.get(key)
        expires_at = None if entry is None else entry.expires_at
        if expires_at is not None and self._clock() >= expires_at:
            assert entry is not None
            self._forget(key, entry)
            self.stats.expirations += 1
            return None
        return entry

    def _over(self, new_entries: int, new_bytes: int) -> bool:
        if self._max_entries is not None and len(self._entries) + new_entries > self._max_entries:
            return True
        return self._max_bytes is not None and self._bytes + new_bytes > self._max_bytes

    def _needs_room(self, key: K, size: int) -> bool:
        old = self._entries.get(key)
        if old is None:
            return self._over(1, size)
        return self._over(0, size - old.size)

    def _make_room(self, key: K, size: int) -> None:
        while self._needs_room(key, size):
            self._evict_one()

    def _evict_one(self) -> None:
        victim = self._policy.evict()  # CacheFullError under noeviction: nothing changed yet
        entry = self._entries.pop(victim)
        self._bytes -= entry.size
        self._expiring.discard(victim)
        self.stats.evictions += 1

    def _forget(self, key: K, entry: _Entry[V]) -> None:
        del self._entries[key]
        self._bytes -= entry.size
        self._expiring.discard(key)
        self._policy.on_remove(key)


def _check_bounds(max_entries: int | None, max_bytes: int | None) -> None:
    if max_entries is not None and max_entries < 1:
        raise ValueError(f"max_entries must be at least 1, not {max_entries}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
