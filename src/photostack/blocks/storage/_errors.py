"""The storage block's errors: one root, families by cause."""

from __future__ import annotations

__all__ = [
    "StaleShardMapError",
    "StorageError",
    "UnknownGroupError",
    "UnroutableKeyError",
]


class StorageError(Exception):
    """Root of every error raised by the storage block."""


class UnknownGroupError(StorageError, LookupError):
    """A storage group the router was not configured with."""


class UnroutableKeyError(StorageError, LookupError):
    """A partitioner cannot place this key: a list value with no default, a round-robin key
    without its shard tag, a directory entry that does not exist."""


class StaleShardMapError(StorageError, ValueError):
    """A shard map whose version does not move forward."""
