"""Stable hash functions and vnode point generators (never the salted built-in ``hash()``).

Two families:

* ``xxh3``: XXH3-64 of the key's UTF-8 bytes — fast (tens of ns), stable across processes,
  platforms and versions of the pinned ``xxhash`` wheel, well distributed. A node's vnode points
  are XXH3 of its name under seeds 0, 1, 2...: they depend on its name alone, so adding a node
  can only take keys, never shuffle them between the others.
* ``ketama``: libketama's scheme as uhashring implements it — MD5, four 32-bit little-endian
  points per digest of ``"{node}-{i}"``, keys hashed to the first four digest bytes.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable

import xxhash

__all__ = [
    "KETAMA_SPACE",
    "XXH3_SPACE",
    "as_bytes",
    "ketama_key_hash",
    "ketama_points",
    "load_skew",
    "xxh3_key_hash",
    "xxh3_points",
]

XXH3_SPACE = 1 << 64
KETAMA_SPACE = 1 << 32

_xxh3 = xxhash.xxh3_64_intdigest


def as_bytes(key: str | bytes) -> bytes:
    """The bytes a key hashes as: UTF-8 for text, the bytes themselves otherwise."""
    return key.encode("utf-8") if isinstance(key, str) else key


def xxh3_key_hash(key: str | bytes) -> int:
    """The key's position on the 64-bit circle."""
    return _xxh3(key.encode("utf-8") if isinstance(key, str) else key)


def xxh3_points(name: str, count: int) -> list[int]:
    """``count`` 64-bit points of node ``name``: XXH3 of its name under seeds ``0..count-1``.

    Independent uniform points, on purpose: stratified points (one per ``1/count`` of the
    circle) even out equal-weight rings a little more but bias weighted ones — a node's share
    then depends on how regular its neighbours' points are, not only on its point count.
    """
    data = name.encode("utf-8")
    return [_xxh3(data, seed=i) for i in range(count)]


def ketama_key_hash(key: str | bytes) -> int:
    """Ketama's 32-bit key hash: the first four bytes of MD5, little-endian.

    Text is hashed as UTF-8 exactly like uhashring's ``str(key)``; bytes are hashed as they are
    (as libketama does; uhashring would hash ``str(b"...")``, the repr).
    """
    digest = hashlib.md5(as_bytes(key), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "little")


def ketama_points(name: str, digests: int) -> list[int]:
    """Ketama points of ``name``: four little-endian 32-bit words of MD5(``"{name}-{i}"``)."""
    out: list[int] = []
    for i in range(digests):
        digest = hashlib.md5(f"{name}-{i}".encode(), usedforsecurity=False).digest()
        out.extend(int.from_bytes(digest[j : j + 4], "little") for j in (0, 4, 8, 12))
    return out


def load_skew(loads: Iterable[float]) -> float:
    """Population standard deviation over mean of per-node loads (0.0 is perfectly even).

    Raises ValueError for no loads or a zero mean.
    """
    values = list(loads)
    if not values:
        raise ValueError("load_skew needs at least one load")
    mean = statistics.fmean(values)
    if mean == 0 or not math.isfinite(mean):
        raise ValueError(f"load_skew needs a positive finite mean, got {mean}")
    return statistics.pstdev(values) / mean
