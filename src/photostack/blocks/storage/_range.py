"""Range partitioning: ordered split points, skew metrics, and split-point suggestions."""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from photostack.blocks.ring import load_skew

__all__ = ["RangePartitioner", "RangeStats", "range_stats", "split_points_for"]


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


class RangePartitioner:
    """Shard ``i`` holds keys ``k`` with ``splits[i-1] <= k < splits[i]`` (bytes order; UTF-8
    text sorts as code points).

    Trade-off: a range scan (``WHERE key BETWEEN a AND b``) reads one shard or a few adjacent
    ones, and a hot range can be split where it is hot; but the spread is only as even as the
    split points, and monotonic keys (timestamps, sequences) send every insert to the last shard.
    Watch :func:`range_stats`; move split points with :func:`split_points_for` or :meth:`split`.
    """

    __slots__ = ("_splits",)

    def __init__(self, split_points: Sequence[str | bytes]) -> None:
        splits = [_as_bytes(p) for p in split_points]
        if any(a >= b for a, b in itertools.pairwise(splits)):
            raise ValueError("split points must be strictly increasing")
        self._splits = splits

    @property
    def shard_count(self) -> int:
        return len(self._splits) + 1

    @property
    def split_points(self) -> tuple[bytes, ...]:
        return tuple(self._splits)

    def shard_for(self, key: str | bytes) -> int:
        return bisect.bisect_right(self._splits, _as_bytes(key))

    def bounds(self, shard: int) -> tuple[bytes | None, bytes | None]:
        """``(low, high)`` of a shard, low inclusive, high exclusive; None is unbounded."""
        if not 0 <= shard < self.shard_count:
            raise IndexError(f"shard {shard} out of range 0..{self.shard_count - 1}")
        low = self._splits[shard - 1] if shard > 0 else None
        high = self._splits[shard] if shard < len(self._splits) else None
        return low, high

    def split(self, shard: int, at: str | bytes) -> RangePartitioner:
        """A copy where ``shard`` is cut in two at ``at`` (the upper half becomes ``shard + 1``
        and every later shard's index grows by one). Raises ValueError if ``at`` is not inside."""
        low, high = self.bounds(shard)
        point = _as_bytes(at)
        if (low is not None and point <= low) or (high is not None and point >= high):
            raise ValueError(f"split point {point!r} is not inside shard {shard}")
        return RangePartitioner([*self._splits[:shard], point, *self._splits[shard:]])

    def __repr__(self) -> str:
        return f"RangePartitioner(split_points={self._splits!r})"


@dataclass(frozen=True)
class RangeStats:
    """How evenly a set of keys (or rows) falls on the ranges."""

    counts: tuple[int, ...]  # keys per shard
    skew: float  # std / mean of counts (0.0 is even)
    hottest: int  # the shard with the most keys
    hottest_share: float  # its fraction of all keys

    @property
    def hottest_over_mean(self) -> float:
        return self.hottest_share * len(self.counts)


def range_stats(partitioner: RangePartitioner, keys: Iterable[str | bytes]) -> RangeStats:
    """Count ``keys`` per range. Raises ValueError for no keys."""
    counter = collections.Counter(partitioner.shard_for(k) for k in keys)
    counts = tuple(counter.get(i, 0) for i in range(partitioner.shard_count))
    total = sum(counts)
    if total == 0:
        raise ValueError("range_stats needs at least one key")
    hottest = max(range(len(counts)), key=counts.__getitem__)
    return RangeStats(counts, load_skew(counts), hottest, counts[hottest] / total)


def split_points_for(sample: Iterable[str | bytes], shard_count: int) -> list[bytes]:
    """Split points that cut a sample of keys into ``shard_count`` ranges of equal count.

    Duplicates collapse, so heavy repeated keys may leave fewer, larger ranges (a value cannot
    be split). Raises ValueError for ``shard_count < 1`` or an empty sample.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    ordered = sorted(_as_bytes(k) for k in sample)
    if not ordered:
        raise ValueError("split_points_for needs a non-empty sample")
    points: list[bytes] = []
    for i in range(1, shard_count):
        point = ordered[i * len(ordered) // shard_count]
        if (not points or point > points[-1]) and point > ordered[0]:
            points.append(point)
    return points
