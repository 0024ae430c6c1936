"""Partitioners: pure functions from a key to a shard index.

Stable across processes and Python versions (hashlib, never the salted built-in ``hash()``), so
every node of a cluster routes a key to the same shard.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

__all__ = ["HashModPartitioner", "Partitioner", "stable_hash64"]


def stable_hash64(key: str | bytes) -> int:
    """A 64-bit unsigned hash of ``key`` (UTF-8 for text) that never changes between runs."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@runtime_checkable
class Partitioner(Protocol):
    """Maps a key to one of ``shard_count`` shards, numbered 0..shard_count-1."""

    @property
    def shard_count(self) -> int: ...

    def shard_for(self, key: str | bytes) -> int:
        """The index of the shard that owns ``key``."""
        ...


class HashModPartitioner:
    """``hash(key) mod n``: even spread, but changing ``n`` moves almost every key.

    The simplest scheme the seed names; consistent hashing, ranges and a directory come later and
    fit the same :class:`Partitioner` protocol.
    """

    __slots__ = ("_n",)

    def __init__(self, shard_count: int) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {shard_count}")
        self._n = shard_count

    @property
    def shard_count(self) -> int:
        return self._n

    def shard_for(self, key: str | bytes) -> int:
        return stable_hash64(key) % self._n

    def __repr__(self) -> str:
        return f"HashModPartitioner(shard_count={self._n})"
