"""A write-ahead log for write-back: every acknowledged write is appended to a local file before
the write returns, so a process killed before its flush loses nothing the log holds.

Records are ``crc32 | key length | value length | key | value`` (big-endian u32s), each written
with one ``os.write`` on an ``O_APPEND`` descriptor: a SIGKILL leaves either the whole record in
the OS page cache or none of it. ``fsync_each_write`` adds durability across a power loss at the
price of one fsync per write. A torn record can only be the last one; replay ignores it.

The log is split in segments: a flush rotates to a new segment before it snapshots the dirty set
and deletes the older segments once the store has taken the snapshot.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from photostack.blocks.cache._errors import LogCorruptError

__all__ = ["WriteAheadLog"]

_HEADER = struct.Struct(">III")
_PREFIX = "wal-"
_SUFFIX = ".log"


class WriteAheadLog:
    """Append-only segments under ``directory`` for ``bytes`` keys and values."""

    def __init__(self, directory: Path, *, fsync_each_write: bool = False) -> None:
        self._dir = directory
        self._fsync = fsync_each_write
        directory.mkdir(parents=True, exist_ok=True)
        existing = self._segments()
        self._number = (_number(existing[-1]) if existing else 0) + 1
        self._fd = self._open(self._number)

    def __repr__(self) -> str:
        return f"<WriteAheadLog {self._dir} segment={self._number}>"

    def append(self, key: bytes, value: bytes) -> None:
        body = key + value
        header = _HEADER.pack(zlib.crc32(body), len(key), len(value))
        os.write(self._fd, header + body)
        if self._fsync:
            os.fsync(self._fd)

    def rotate(self) -> int:
        """Start a new segment; returns the number of the last one the caller may checkpoint."""
        os.close(self._fd)
        closed = self._number
        self._number += 1
        self._fd = self._open(self._number)
        return closed

    def checkpoint(self, upto: int) -> None:
        """Delete every segment numbered ``upto`` or lower (their writes reached the store)."""
        for path in self._segments():
            if _number(path) <= upto:
                path.unlink(missing_ok=True)

    def replay(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record of every closed or open segment, oldest first (the current segment too:
        call before writing). Raises LogCorruptError for damage that is not a torn tail."""
        for path in self._segments():
            yield from _records(path)

    def close(self) -> None:
        os.close(self._fd)

    def _open(self, number: int) -> int:
        path = self._dir / f"{_PREFIX}{number:08d}{_SUFFIX}"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _segments(self) -> list[Path]:
        return sorted(self._dir.glob(f"{_PREFIX}*{_SUFFIX}"), key=_number)


def _number(path: Path) -> int:
    return int(path.name[len(_PREFIX) : -len(_SUFFIX)])


def _records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    data = path.read_bytes()
    at = 0
    while at < len(data):
        if at + _HEADER.size > len(data):
            return  # torn tail
        crc, klen, vlen = _HEADER.unpack_from(data, at)
        end = at + _HEADER.size + klen + vlen
        if end > len(data):
            return  # torn tail
        body = data[at + _HEADER.size : end]
        if zlib.crc32(body) != crc:
            if end == len(data):
                return  # torn tail
            raise LogCorruptError(f"{path}: bad record at byte {at}")
        yield body[:klen], body[klen:]
        at = end
