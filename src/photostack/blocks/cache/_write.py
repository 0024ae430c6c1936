"""Write policies: how a write reaches the cache and the system of record.

* write-through: the store first, then the cache; the write returns when both have it.
* write-around: the store, then the cache entry is invalidated; the next read loads it.
* write-back: the cache and a dirty set now, the store later in batches (every
  ``flush_interval_s``, when the dirty set is full, and on ``aclose``).

Ordering per key: writes of one key through one policy object are applied to the cache and to
the store in the order they were issued (a per-key lock serializes them), so the cache never
ends on an older value than the store. Write-back may coalesce: the store sees a subsequence
of a key's values, in order, always ending with the last one; flushes never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from photostack.blocks.cache._errors import DirtySetFullError, WriteBackClosedError

__all__ = [
    "CacheTier",
    "KeyLocks",
    "Store",
    "WhenFull",
    "WriteAround",
    "WriteBack",
    "WriteBackConfig",
    "WriteBackLog",
    "WriteBackStats",
    "WriteThrough",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)
V_contra = TypeVar("V_contra", contravariant=True)


class Store(Protocol[K_contra, V]):
    """The system of record (a database group, or anything slower and durable)."""

    async def read(self, key: K_contra) -> V | None: ...

    async def write(self, key: K_contra, value: V) -> None: ...

    async def write_many(self, items: Sequence[tuple[K_contra, V]]) -> None:
        """All ``items`` or none (a failed batch is retried whole)."""


class CacheTier(Protocol[K_contra, V]):
    """A cache seen by a write policy: local, or a remote node."""

    async def get(self, key: K_contra) -> V | None: ...

    async def set(self, key: K_contra, value: V) -> None: ...

    async def delete(self, key: K_contra) -> None: ...


class WriteBackLog(Protocol[K_contra, V_contra]):
    """Where write-back records writes before acknowledging them (see ``WriteAheadLog``)."""

    def append(self, key: K_contra, value: V_contra) -> None: ...

    def rotate(self) -> int: ...

    def checkpoint(self, upto: int) -> None: ...


class KeyLocks(Generic[K]):
    """One asyncio lock per key, held only while someone uses it."""

    def __init__(self) -> None:
        self._locks: dict[K, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _read(cache: CacheTier[K, V], store: Store[K, V], key: K) -> V | None:
    value = await cache.get(key)
    if value is None:
        value = await store.read(key)
        if value is not None:
            await cache.set(key, value)
    return value


class WriteThrough(Generic[K, V]):
    """Store, then cache. A failed store write leaves the cache untouched; a failed cache write
    after a successful store write invalidates the key so no old value survives."""

    def __init__(self, store: Store[K, V], cache: CacheTier[K, V]) -> None:
        self._store, self._cache = store, cache
        self._locks: KeyLocks[K] = KeyLocks()

    async def write(self, key: K, value: V) -> None:
        async with self._locks.hold(key):
            await self._store.write(key, value)
            try:
                await self._cache.set(key, value)
            except Exception:
                await self._cache.delete(key)
                raise

    async def read(self, key: K) -> V | None:
        return await _read(self._cache, self._store, key)


class WriteAround(Generic[K, V]):
    """Store, then invalidate: writes never fill the cache (good for data written once and read
    rarely). A read that loaded the old value just before the write may refill the cache with
    it after the invalidation; keep TTLs short where that matters."""

    def __init__(self, store: Store[K, V], cache: CacheTier[K, V]) -> None:
        self._store, self._cache = store, cache
        self._locks: KeyLocks[K] = KeyLocks()

    async def write(self, key: K, value: V) -> None:
        async with self._locks.hold(key):
            await self._store.write(key, value)
            await self._cache.delete(key)

    async def read(self, key: K) -> V | None:
        return await _read(self._cache, self._store, key)


class WhenFull(StrEnum):
    FLUSH_NOW = "flush_now"  # a writer that finds the dirty set full starts a flush and waits
    BACKPRESSURE = "backpressure"  # it waits for the next scheduled flush


@dataclass(frozen=True)
class WriteBackConfig:
    flush_interval_s: float = 1.0
    max_dirty: int = 10_000
    when_full: WhenFull = WhenFull.FLUSH_NOW
    full_timeout_s: float = 10.0  # a writer waits this long for room, then DirtySetFullError
    close_timeout_s: float = 30.0  # the final flush on aclose

    def __post_init__(self) -> None:
        if self.flush_interval_s <= 0 or self.max_dirty < 1 or self.full_timeout_s <= 0:
            raise ValueError(f"bad write-back config {self!r}")


@dataclass(slots=True)
class WriteBackStats:
    writes: int = 0
    flushes: int = 0
    flushed_entries: int = 0
    flush_errors: int = 0
    waited_for_room: int = 0
    recovered: int = 0


class WriteBack(Generic[K, V]):
    """Cache now, store later. Writes since the last successful flush are lost if the process
    dies, unless a ``log`` (write-ahead) records them first; ``start`` replays it."""

    def __init__(
        self,
        store: Store[K, V],
        cache: CacheTier[K, V],
        config: WriteBackConfig,
        *,
        log: WriteBackLog[K, V] | None = None,
    ) -> None:
        self._store, self._cache, self._config, self._log = store, cache, config, log
        self._dirty: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._version = 0
        self._locks: KeyLocks[K] = KeyLocks()
        self._flush_lock = asyncio.Lock()
        self._room = asyncio.Condition()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = WriteBackStats()

    def __repr__(self) -> str:
        return f"<WriteBack dirty={len(self._dirty)}/{self._config.max_dirty} {self.stats}>"

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def recover(self, records: Sequence[tuple[K, V]]) -> None:
        """Mark replayed log records dirty again (oldest first), before ``start``."""
        for key, value in records:
            self._mark(key, value)
            self.stats.recovered += 1

    def start(self) -> None:
        """Start the periodic flusher (from inside the event loop)."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="write-back flusher")

    async def write(self, key: K, value: V) -> None:
        """Acknowledged once the cache (and the log, if any) has it; raises DirtySetFullError
        when no room appears within ``full_timeout_s``, WriteBackClosedError after aclose."""
        if self._closed:
            raise WriteBackClosedError("write-back is closed")
        async with self._locks.hold(key):
            if key not in self._dirty and len(self._dirty) >= self._config.max_dirty:
                await self._wait_for_room(key)
            if self._log is not None:
                self._log.append(key, value)
            self._mark(key, value)
            self.stats.writes += 1
            await self._cache.set(key, value)

    async def read(self, key: K) -> V | None:
        """Read-your-writes: the dirty value first (the cache may have evicted it)."""
        pending = self._dirty.get(key)
        if pending is not None:
            return pending[0]
        return await _read(self._cache, self._store, key)

    async def flush(self) -> int:
        """Write every dirty entry to the store in one batch; returns how many. A failed batch
        stays dirty (and in the log) and the error propagates."""
        async with self._flush_lock:
            if not self._dirty:
                return 0
            upto = self._log.rotate() if self._log is not None else 0
            batch = [(key, value, version) for key, (value, version) in self._dirty.items()]
            try:
                await self._store.write_many([(key, value) for key, value, _ in batch])
            except Exception:
                self.stats.flush_errors += 1
                raise
            for key, _, version in batch:
                current = self._dirty.get(key)
                if current is not None and current[1] == version:
                    del self._dirty[key]
            if self._log is not None:
                self._log.checkpoint(upto)
            self.stats.flushes += 1
            self.stats.flushed_entries += len(batch)
        async with self._room:
            self._room.notify_all()
        return len(batch)

    async def aclose(self) -> None:
        """Stop accepting writes, stop the flusher, flush what is dirty (bounded in time)."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        async with asyncio.timeout(self._config.close_timeout_s):
            await self.flush()

    def _mark(self, key: K, value: V) -> None:
        self._version += 1
        self._dirty[key] = (value, self._version)
        self._dirty.move_to_end(key)

    async def _wait_for_room(self, key: K) -> None:
        self.stats.waited_for_room += 1
        if self._config.when_full is WhenFull.FLUSH_NOW:
            self._wake.set()
        try:
            async with asyncio.timeout(self._config.full_timeout_s), self._room:
                await self._room.wait_for(
                    lambda: key in self._dirty or len(self._dirty) < self._config.max_dirty
                )
        except TimeoutError as exc:
            raise DirtySetFullError(
                f"dirty set stayed full ({self._config.max_dirty}) for "
                f"{self._config.full_timeout_s:g}s"
            ) from exc

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            with contextlib.suppress(Exception):
                await self.flush()  # a failed flush stays dirty; the next interval retries
