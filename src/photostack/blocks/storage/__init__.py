"""Storage building blocks: partitioners and the shard router (pure logic, no drivers)."""

from ._partitioner import HashModPartitioner, Partitioner, stable_hash64
from ._router import ShardRouter, StorageError, UnknownGroupError

__all__ = [
    "HashModPartitioner",
    "Partitioner",
    "ShardRouter",
    "StorageError",
    "UnknownGroupError",
    "stable_hash64",
]
