"""Eviction policies: which key to drop when a bounded cache must make room.

Every policy tracks keys only (values, sizes and expiry live in :class:`BoundedCache`) and does
each operation in O(1): insertion-ordered linked structures (``OrderedDict`` is a C hash map with
a doubly linked list) for FIFO, LIFO, LRU and MRU; array plus index map with swap-remove for
random; frequency buckets for LFU (in ``_lfu``). No I/O; randomness is injected.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Hashable
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from photostack.blocks.cache._errors import CacheFullError, UnknownPolicyError

__all__ = [
    "FIFOPolicy",
    "LIFOPolicy",
    "LRUPolicy",
    "MRUPolicy",
    "NoEvictionPolicy",
    "Policy",
    "PolicyName",
    "RandomPolicy",
    "RandomSet",
    "parse_policy_name",
]

K = TypeVar("K", bound=Hashable)

RandBelow = Callable[[int], int]  # n -> an int in [0, n)


class PolicyName(StrEnum):
    """Policy names as the cache node's ``maxmemory-policy`` spells them (Redis's where Redis
    has the policy, our own otherwise)."""

    LRU = "allkeys-lru"
    LFU = "allkeys-lfu"
    RANDOM = "allkeys-random"
    FIFO = "fifo"
    LIFO = "lifo"
    MRU = "mru"
    NOEVICTION = "noeviction"

    @property
    def short(self) -> str:
        """``lru``, ``lfu``, ``random``, ``fifo``, ``lifo``, ``mru``, ``noeviction``."""
        return self.value.removeprefix("allkeys-")

    @property
    def redis_supports(self) -> bool:
        """Whether real Redis knows this policy under the same name."""
        return self in {PolicyName.LRU, PolicyName.LFU, PolicyName.RANDOM, PolicyName.NOEVICTION}


def parse_policy_name(name: str) -> PolicyName:
    """``lru`` or ``allkeys-lru`` (any case) → :attr:`PolicyName.LRU`; raises UnknownPolicyError."""
    wanted = name.strip().lower()
    for policy in PolicyName:
        if wanted in (policy.value, policy.short):
            return policy
    known = ", ".join(p.short for p in PolicyName)
    raise UnknownPolicyError(f"unknown eviction policy {name!r} (known: {known})")


class Policy(Protocol[K]):
    """Tracks the keys of one cache and names the next victim.

    The cache calls ``on_insert`` for a new key, ``on_access`` for a read hit or an overwrite,
    ``on_remove`` when it drops a key itself (delete, expiry), and ``evict`` when it needs room:
    ``evict`` forgets the victim and returns it. Each call is O(1). ``evict`` on an empty policy
    raises KeyError; :class:`NoEvictionPolicy` raises CacheFullError instead.
    """

    @property
    def name(self) -> PolicyName: ...

    def on_insert(self, key: K) -> None: ...

    def on_access(self, key: K) -> None: ...

    def on_remove(self, key: K) -> None: ...

    def evict(self) -> K: ...

    def __len__(self) -> int: ...


class _Ordered(Generic[K]):
    """Keys in a linked order; subclasses choose which end to evict and whether access moves."""

    name: PolicyName
    _move_on_access = False
    _evict_newest = False

    def __init__(self) -> None:
        self._keys: OrderedDict[K, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} keys={len(self._keys)}>"

    def __len__(self) -> int:
        return len(self._keys)

    def on_insert(self, key: K) -> None:
        self._keys[key] = None

    def on_access(self, key: K) -> None:
        if self._move_on_access:
            self._keys.move_to_end(key)

    def on_remove(self, key: K) -> None:
        del self._keys[key]

    def evict(self) -> K:
        if not self._keys:
            raise KeyError("evict from an empty policy")
        return self._keys.popitem(last=self._evict_newest)[0]


class FIFOPolicy(_Ordered[K]):
    """First in, first out: evicts the oldest insertion; reads change nothing."""

    name = PolicyName.FIFO


class LIFOPolicy(_Ordered[K]):
    """Last in, first out: evicts the newest insertion; reads change nothing."""

    name = PolicyName.LIFO
    _evict_newest = True


class LRUPolicy(_Ordered[K]):
    """Least recently used: evicts the key whose last insert or access is oldest."""

    name = PolicyName.LRU
    _move_on_access = True


class MRUPolicy(_Ordered[K]):
    """Most recently used: evicts the key touched last (good for cyclic scans larger than the
    cache, where the key just read is the one needed furthest in the future)."""

    name = PolicyName.MRU
    _move_on_access = True
    _evict_newest = True


class NoEvictionPolicy(_Ordered[K]):
    """Never evicts: a write that needs room fails with CacheFullError (Redis ``noeviction``)."""

    name = PolicyName.NOEVICTION

    def evict(self) -> K:
        raise CacheFullError("OOM command not allowed when used memory > 'maxmemory'.")


class RandomSet(Generic[K]):
    """A set with O(1) add, remove and uniform random choice: an array plus an index map, and
    removal by swapping the last element into the hole."""

    def __init__(self, randbelow: RandBelow) -> None:
        self._items: list[K] = []
        self._index: dict[K, int] = {}
        self._randbelow = randbelow

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def add(self, key: K) -> None:
        if key not in self._index:
            self._index[key] = len(self._items)
            self._items.append(key)

    def discard(self, key: K) -> None:
        at = self._index.pop(key, None)
        if at is None:
            return
        last = self._items.pop()
        if at < len(self._items):
            self._items[at] = last
            self._index[last] = at

    def choice(self) -> K:
        """A uniformly random member; KeyError when empty."""
        if not self._items:
            raise KeyError("choice from an empty set")
        return self._items[self._randbelow(len(self._items))]

    def clear(self) -> None:
        self._items.clear()
        self._index.clear()


class RandomPolicy(Generic[K]):
    """Evicts a uniformly random key. ``randbelow`` is injected (tests pass a seeded one)."""

    name = PolicyName.RANDOM

    def __init__(self, randbelow: RandBelow | None = None) -> None:
        self._set: RandomSet[K] = RandomSet(randbelow or random.Random().randrange)

    def __repr__(self) -> str:
        return f"<RandomPolicy keys={len(self._set)}>"

    def __len__(self) -> int:
        return len(self._set)

    def on_insert(self, key: K) -> None:
        self._set.add(key)

    def on_access(self, key: K) -> None:
        pass

    def on_remove(self, key: K) -> None:
        self._set.discard(key)

    def evict(self) -> K:
        victim = self._set.choice()
        self._set.discard(victim)
        return victim
