"""The CDN edge's disk tier: cached objects as files under the node's data dir, LRU by bytes.

Write-through: every object the edge stores (including those over the memory tier's per-object
limit) is also written here, in a worker thread, off the request path. So an object the memory
tier evicts is already on disk, and a restart finds everything that was cached.

- **Names from a hash.** An object's file is ``ROOT/ab/<sha256(key)>.obj``. The name is the
  hash of the cache key, so no request text ever becomes a path. The key itself is in the
  file's header and is checked on every read.
- **Atomic writes.** A write goes to ``.<name>.<random>.tmp`` in the same directory, then
  ``os.replace``. A reader sees no file or a whole one. A torn file (power loss without fsync)
  fails the read-time checks (header, length, and the body must hash to its content-addressed
  key), and is dropped. Stray ``.tmp`` files are removed at start.
- **Bounded.** :class:`DiskIndex` (pure) keeps the files' sizes in LRU order and names the
  victims once ``max_bytes`` would be passed. Objects over ``max_entry_bytes`` are not kept.
- **Restart.** :meth:`DiskTier.start` re-indexes the directory, oldest modification first,
  without reading any file.
- **Purge.** It takes the key out of the index and unlinks the file before answering. A write
  in flight for that key is undone when it completes.
- **Freshness.** It is stored as wall-clock deadlines and mapped back onto the edge's clock
  when the object is read, so a restart neither extends nor shortens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from photostack.blocks.media._cdn_cache import CachedObject
from photostack.blocks.media._rules import Freshness

__all__ = ["DiskIndex", "DiskStats", "DiskTier", "DiskTierConfig", "file_name"]

_MAGIC = b"PSCDN1\n"
_HEADER_LEN = struct.Struct(">I")
_MAX_HEADER_BYTES = 64 * 1024
_SUFFIX = ".obj"


def file_name(key: str) -> str:
    """The file name of ``key``'s object: the hex sha256 of the key (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class DiskTierConfig:
    """Sizes in bytes. ``max_bytes`` bounds the files' total size."""

    root: Path
    max_bytes: int = 1024 * 1024 * 1024
    max_entry_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_entry_bytes < 1:
            raise ValueError("disk cache bounds must be at least 1 byte")


class DiskIndex:
    """File name → size in least-recently-used order, at most ``max_bytes`` in all (pure)."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return f"<DiskIndex {len(self._sizes)} files {self.bytes_used}/{self.max_bytes}B>"

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def fits(self, size: int) -> bool:
        return size <= self.max_entry_bytes

    def add(self, name: str, size: int) -> list[str]:
        """Record ``name`` as most recently used; returns the names evicted to make room
        (least recently used first). Raises ValueError for a size that never fits."""
        if not self.fits(size):
            raise ValueError(f"{size} bytes exceed max_entry_bytes={self.max_entry_bytes}")
        self.remove(name)
        victims: list[str] = []
        while self._sizes and self.bytes_used + size > self.max_bytes:
            victim, freed = self._sizes.popitem(last=False)
            self.bytes_used -= freed
            self.evictions += 1
            victims.append(victim)
        self._sizes[name] = size
        self.bytes_used += size
        return victims

    def touch(self, name: str) -> bool:
        """A read: ``name`` becomes most recently used. False when absent."""
        if name not in self._sizes:
            return False
        self._sizes.move_to_end(name)
        return True

    def remove(self, name: str) -> bool:
        size = self._sizes.pop(name, None)
        if size is None:
            return False
        self.bytes_used -= size
        return True


@dataclass(slots=True)
class DiskStats:
    entries: int
    bytes_used: int
    max_bytes: int
    evictions: int
    writes: int
    errors: int


class DiskTier:
    """The disk tier of one CDN edge. ``await start()`` re-indexes; ``load``/``save``/``purge``."""

    def __init__(
        self,
        config: DiskTierConfig,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.index = DiskIndex(config.max_bytes, config.max_entry_bytes)
        self._clock = clock
        self._wall = wall
        self._writing: dict[str, bool] = {}  # name -> purged while the write was in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"<DiskTier {self.config.root} {self.index!r}>"

    def __contains__(self, key: str) -> bool:
        return file_name(key) in self.index

    def path_of(self, name: str) -> Path:
        return self.config.root / name[:2] / (name + _SUFFIX)

    def stats(self) -> DiskStats:
        return DiskStats(
            entries=len(self.index),
            bytes_used=self.index.bytes_used,
            max_bytes=self.index.max_bytes,
            evictions=self.index.evictions,
            writes=self.writes,
            errors=self.errors,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory, drop stray temp files, index what is there (oldest first)
        and evict down to the bound. Raises OSError when the directory cannot be made."""
        found = await asyncio.to_thread(self._scan)
        for name, size in found:
            if not self.index.fits(size):
                await asyncio.to_thread(self._unlink, name)
                continue
            victims = self.index.add(name, size)
            if victims:
                await asyncio.to_thread(self._unlink_all, victims)

    async def aclose(self) -> None:
        """Wait for the writes in flight (each is one file: short)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _scan(self) -> list[tuple[str, int]]:
        root = self.config.root
        root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:  # the fan-out prefix
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                name = entry.name.removesuffix(_SUFFIX)
                if not entry.name.endswith(_SUFFIX) or not _is_hex64(name):
                    continue
                stat = entry.stat()
                found.append((stat.st_mtime, name, stat.st_size))
        found.sort()
        return [(name, size) for _, name, size in found]

    # -- reads -------------------------------------------------------------------------------

    async def load(self, key: str) -> CachedObject | None:
        """``key``'s object from disk (an access for the LRU), or None when absent, damaged
        (then dropped) or purged meanwhile."""
        name = file_name(key)
        if name not in self.index:
            return None
        try:
            raw = await asyncio.to_thread(self.path_of(name).read_bytes)
        except OSError:
            self.index.remove(name)
            return None
        if name not in self.index:  # purged while reading
            return None
        obj = self._decode(key, raw)
        if obj is None:
            self.errors += 1
            self.index.remove(name)
            await asyncio.to_thread(self._unlink, name)
            return None
        self.index.touch(name)
        return obj

    def _decode(self, key: str, raw: bytes) -> CachedObject | None:
        start = len(_MAGIC) + _HEADER_LEN.size
        if not raw.startswith(_MAGIC) or len(raw) < start:
            return None
        (length,) = _HEADER_LEN.unpack_from(raw, len(_MAGIC))
        if length > _MAX_HEADER_BYTES or len(raw) < start + length:
            return None
        try:
            header = json.loads(raw[start : start + length])
            body = raw[start + length :]
            if header["key"] != key or len(body) != header["size"]:
                return None
            if hashlib.sha256(body).hexdigest() != key:  # content-addressed: a whole copy
                return None
            now, wall = self._clock(), self._wall()
            obj = CachedObject(
                key,
                body=body,
                content_type=str(header["content_type"]),
                etag=str(header["etag"]),
                cache_control=str(header["cache_control"]),
                freshness=Freshness(storable=True),
                now=now,
            )
            obj.fresh_until = now + (float(header["fresh_until"]) - wall)
            obj.swr_until = now + (float(header["swr_until"]) - wall)
            obj.stale_if_error_until = now + (float(header["stale_if_error_until"]) - wall)
        except (ValueError, KeyError, TypeError):
            return None
        return obj

    # -- writes ------------------------------------------------------------------------------

    def save(self, obj: CachedObject) -> bool:
        """Write ``obj`` in the background (write-through). False when it is too large, or a
        write of the same key is already in flight."""
        name = file_name(obj.key)
        data = self._encode(obj)
        if not self.index.fits(len(data)) or name in self._writing:
            return False
        self._writing[name] = False
        task = asyncio.get_running_loop().create_task(self._write(name, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _write(self, name: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._write_file, name, data)
        except OSError:
            self.errors += 1
            self._writing.pop(name, None)
            return
        purged = self._writing.pop(name, False)
        if purged:
            await asyncio.to_thread(self._unlink, name)
            return
        self.writes += 1
        victims = self.index.add(name, len(data))
        if victims:
            await asyncio.to_thread(self._unlink_all, victims)

    def _encode(self, obj: CachedObject) -> bytes:
        now, wall = self._clock(), self._wall()
        header = json.dumps(
            {
                "key": obj.key,
                "size": obj.size,
                "content_type": obj.content_type,
                "etag": obj.etag,
                "cache_control": obj.cache_control,
                "fresh_until": wall + (obj.fresh_until - now),
                "swr_until": wall + (obj.swr_until - now),
                "stale_if_error_until": wall + (obj.stale_if_error_until - now),
            }
        ).encode()
        return b"".join((_MAGIC, _HEADER_LEN.pack(len(header)), header, obj.body))

    def _write_file(self, name: str, data: bytes) -> None:
        target = self.path_of(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- purge -------------------------------------------------------------------------------

    def purge(self, key: str) -> bool:
        """Forget ``key`` and remove its file now (one unlink); a write in flight is undone
        when it lands. True when it was on disk."""
        name = file_name(key)
        if name in self._writing:
            self._writing[name] = True
        held = self.index.remove(name)
        self._unlink(name)
        return held

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(name))

    def _unlink_all(self, names: list[str]) -> None:
        for name in names:
            self._unlink(name)


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
