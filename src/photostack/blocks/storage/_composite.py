"""Composite partitioning: a first partitioner picks a block of shards, a second one inside it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._errors import UnroutableKeyError
from ._partitioner import Partitioner

__all__ = ["CompositePartitioner", "split_on"]

KeySplitter = Callable[[str | bytes], tuple[str | bytes, str | bytes]]


def split_on(separator: str) -> KeySplitter:
    """A splitter for keys like ``"eu:user-42"``: ``("eu", "user-42")``.

    The splitter raises UnroutableKeyError for a key without the separator.
    """
    raw = separator.encode("utf-8")

    def split(key: str | bytes) -> tuple[str | bytes, str | bytes]:
        parts: tuple[str | bytes, str | bytes, str | bytes] = (
            key.partition(raw) if isinstance(key, bytes) else key.partition(separator)
        )
        if not parts[1]:
            raise UnroutableKeyError(f"{key!r} has no {separator!r} to split on")
        return parts[0], parts[2]

    return split


class CompositePartitioner:
    """``outer`` places the key's first part on one of its blocks; ``inners[block]`` places the
    rest inside that block. Global shard numbers run block after block.

    Example: list then hash — ``outer = ListPartitioner({"eu": 0, "us": 1}, 2)``,
    ``inners = [HashModPartitioner(2), HashModPartitioner(3)]``: "eu:…" keys on shards 0-1,
    "us:…" keys on shards 2-4. Trade-off: each level's strength (locality or law from the list,
    spread from the hash) and each level's weakness, plus a key format both levels depend on.
    """

    __slots__ = ("_inners", "_offsets", "_outer", "_split")

    def __init__(
        self,
        outer: Partitioner,
        inners: Sequence[Partitioner],
        *,
        split_key: KeySplitter | None = None,
    ) -> None:
        if outer.shard_count != len(inners):
            raise ValueError(f"outer has {outer.shard_count} blocks, {len(inners)} inners given")
        self._outer = outer
        self._inners = tuple(inners)
        offsets, total = [], 0
        for inner in self._inners:
            offsets.append(total)
            total += inner.shard_count
        self._offsets = (*offsets, total)
        self._split = split_key or split_on(":")

    @property
    def shard_count(self) -> int:
        return self._offsets[-1]

    def block_of(self, shard: int) -> tuple[int, int]:
        """``(block, shard inside the block)`` of a global shard number."""
        if not 0 <= shard < self.shard_count:
            raise IndexError(f"shard {shard} out of range 0..{self.shard_count - 1}")
        block = max(b for b in range(len(self._inners)) if self._offsets[b] <= shard)
        return block, shard - self._offsets[block]

    def shard_for(self, key: str | bytes) -> int:
        head, tail = self._split(key)
        block = self._outer.shard_for(head)
        return self._offsets[block] + self._inners[block].shard_for(tail)

    def __repr__(self) -> str:
        return f"CompositePartitioner({self._outer!r}, {list(self._inners)!r})"
