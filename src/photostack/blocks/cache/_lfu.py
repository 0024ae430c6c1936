"""Constant-time LFU (Shah, Mitra and Matani, "An O(1) algorithm for implementing the LFU cache
eviction scheme", 2010): a doubly linked list of frequency buckets in increasing order, each
holding the keys with that access count.

Tie-break: among the keys with the lowest count, the least recently used one is evicted. Each
bucket keeps its keys in the order they reached its count, which is the order of their last
access, so the bucket's oldest key is the LRU one. An insertion counts as the first access.
Counts never decay (unlike Redis's approximate LFU): a key that was hot long ago stays hard to
evict; that is the classic LFU trade-off, documented in docs/caching.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from photostack.blocks.cache._policy import PolicyName

__all__ = ["LFUPolicy"]

K = TypeVar("K", bound=Hashable)


class _Bucket(Generic[K]):
    __slots__ = ("count", "keys", "next", "prev")

    def __init__(self, count: int) -> None:
        self.count = count
        self.keys: OrderedDict[K, None] = OrderedDict()
        self.prev: _Bucket[K] = self
        self.next: _Bucket[K] = self


class LFUPolicy(Generic[K]):
    """Least frequently used with an LRU tie-break; every operation O(1)."""

    name = PolicyName.LFU

    def __init__(self) -> None:
        self._head: _Bucket[K] = _Bucket(0)  # sentinel: head.next is the lowest count
        self._where: dict[K, _Bucket[K]] = {}

    def __repr__(self) -> str:
        return f"<LFUPolicy keys={len(self._where)}>"

    def __len__(self) -> int:
        return len(self._where)

    def count(self, key: K) -> int:
        """The access count of ``key`` (KeyError when not tracked)."""
        return self._where[key].count

    def on_insert(self, key: K) -> None:
        first = self._head.next
        if first is self._head or first.count != 1:
            first = self._link_after(self._head, 1)
        first.keys[key] = None
        self._where[key] = first

    def on_access(self, key: K) -> None:
        bucket = self._where[key]
        following = bucket.next
        if following is self._head or following.count != bucket.count + 1:
            following = self._link_after(bucket, bucket.count + 1)
        del bucket.keys[key]
        following.keys[key] = None
        self._where[key] = following
        if not bucket.keys:
            self._unlink(bucket)

    def on_remove(self, key: K) -> None:
        bucket = self._where.pop(key)
        del bucket.keys[key]
        if not bucket.keys:
            self._unlink(bucket)

    def evict(self) -> K:
        bucket = self._head.next
        if bucket is self._head:
            raise KeyError("evict from an empty policy")
        key = bucket.keys.popitem(last=False)[0]
        del self._where[key]
        if not bucket.keys:
            self._unlink(bucket)
        return key

    def _link_after(self, at: _Bucket[K], count: int) -> _Bucket[K]:
        bucket: _Bucket[K] = _Bucket(count)
        bucket.prev, bucket.next = at, at.next
        at.next.prev = bucket
        at.next = bucket
        return bucket

    @staticmethod
    def _unlink(bucket: _Bucket[K]) -> None:
        bucket.prev.next = bucket.next
        bucket.next.prev = bucket.prev
