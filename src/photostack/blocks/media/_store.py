"""The content-addressed file store of one origin (synchronous file I/O; callers off-load it).

Layout under ``root``: ``ab/cd/<key>`` holds the bytes and ``ab/cd/<key>.type`` the content type
sniffed when they were stored. A write goes to a temporary file in the same directory, is
fsynced, then renamed over the final name (the type file first, the bytes last), so a reader
sees either nothing or the whole object, and a crash leaves at worst a stray ``.tmp`` file that
the next start removes. Writing an existing key again is a no-op: the bytes are the same by
definition of the key.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from photostack.blocks.media._errors import HashMismatch, ObjectTooLarge
from photostack.blocks.media._keys import OCTET_STREAM, key_of, shard_parts, sniff_content_type

__all__ = ["ContentStore", "StoredObject"]

_TYPE_SUFFIX = ".type"
_TMP_SUFFIX = ".tmp"
_SEQ = itertools.count()


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    path: Path
    size: int
    content_type: str


class ContentStore:
    """Objects by key under ``root``; at most ``max_object_bytes`` each."""

    def __init__(self, root: Path, *, max_object_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.max_object_bytes = max_object_bytes

    def __repr__(self) -> str:
        return f"<ContentStore {self.root}>"

    def path_of(self, key: str) -> Path:
        """Where ``key`` lives. Raises InvalidKey (so no other path can ever be built)."""
        first, second, name = shard_parts(key)
        return self.root / first / second / name

    def prepare(self) -> int:
        """Create the root and remove temporary files a crash left. Returns how many."""
        self.root.mkdir(parents=True, exist_ok=True)
        removed = 0
        for tmp in self.root.glob(f"*/*/*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
        return removed

    def put(self, key: str, data: bytes) -> tuple[StoredObject, bool]:
        """Store ``data`` under ``key``; returns the object and whether it was new.

        Raises InvalidKey, HashMismatch, ObjectTooLarge, OSError.
        """
        path = self.path_of(key)
        if len(data) > self.max_object_bytes:
            raise ObjectTooLarge(f"{len(data)} bytes exceed {self.max_object_bytes}")
        if key_of(data) != key:
            raise HashMismatch(f"the body does not hash to {key}")
        existing = self.get(key)
        if existing is not None:
            return existing, False
        content_type = sniff_content_type(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path.with_name(key + _TYPE_SUFFIX), content_type.encode("ascii"))
        _write_atomic(path, data)
        _fsync_dir(path.parent)
        return StoredObject(key, path, len(data), content_type), True

    def get(self, key: str) -> StoredObject | None:
        """The object's path, size and type, or None. Raises InvalidKey."""
        path = self.path_of(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            content_type = path.with_name(key + _TYPE_SUFFIX).read_text("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            content_type = sniff_content_type(_head(path))
        return StoredObject(key, path, size, content_type or OCTET_STREAM)

    def read(self, key: str) -> bytes | None:
        """The whole object, or None."""
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            existed = False
        else:
            existed = True
        with contextlib.suppress(FileNotFoundError):
            path.with_name(key + _TYPE_SUFFIX).unlink()
        return existed

    def count(self) -> int:
        return sum(1 for p in self.root.glob("*/*/*") if len(p.name) == 64)


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(16)
    except FileNotFoundError:
        return b""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_SEQ)}{_TMP_SUFFIX}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
