"""The cache block's one error root and its families, split by cause."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheFullError",
    "DirtySetFullError",
    "LogCorruptError",
    "UnknownPolicyError",
    "WriteBackClosedError",
]


class CacheError(Exception):
    """Root of every error raised by the cache block."""


class UnknownPolicyError(CacheError, ValueError):
    """A policy name that no policy answers to (a typo in a topology or a CONFIG SET)."""


class CacheFullError(CacheError):
    """The cache is full and its policy refuses to evict (``noeviction``), or one entry is larger
    than the whole byte bound."""


class DirtySetFullError(CacheError):
    """Write-back: the dirty set stayed full past the writer's deadline (the store is too slow
    or down)."""


class WriteBackClosedError(CacheError):
    """Write-back: a write arrived after ``aclose`` began."""


class LogCorruptError(CacheError):
    """Write-ahead log: a record in the middle of the log is damaged (a torn *tail* is normal
    after a crash and is ignored)."""
