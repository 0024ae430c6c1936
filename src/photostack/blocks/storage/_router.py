"""The shard router: storage group -> partitioner + shards, and key -> shard.

Generic over what a shard is (a DSN, a connection pool, a fake), so the policy stays free of I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from ._errors import StorageError, UnknownGroupError
from ._partitioner import HashModPartitioner, Partitioner

__all__ = ["ShardRouter", "StorageError", "UnknownGroupError"]

ShardT = TypeVar("ShardT")


class _Group(Generic[ShardT]):
    __slots__ = ("partitioner", "shards")

    def __init__(self, partitioner: Partitioner, shards: tuple[ShardT, ...]) -> None:
        self.partitioner = partitioner
        self.shards = shards


class ShardRouter(Generic[ShardT]):
    """Routes keys of each storage group to one of that group's shards.

    ``partitioner_factory`` builds a group's partitioner from its shard count; the default is
    :class:`HashModPartitioner`. ``partitioners`` names a group's partitioner outright (e.g. a
    :class:`DirectoryPartitioner` per group); :meth:`replace` swaps a group's shards and
    partitioner at once when a new shard map arrives.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[ShardT]],
        partitioner_factory: Callable[[int], Partitioner] = HashModPartitioner,
        *,
        partitioners: Mapping[str, Partitioner] | None = None,
    ) -> None:
        self._groups: dict[str, _Group[ShardT]] = {}
        chosen = partitioners or {}
        for name, shards in groups.items():
            partitioner = chosen.get(name) or partitioner_factory(max(1, len(shards)))
            self.replace(name, shards, partitioner)

    def replace(self, group: str, shards: Sequence[ShardT], partitioner: Partitioner) -> None:
        """Install (or swap in one step) ``group``'s shards and partitioner.

        Raises ValueError when there are no shards or the partitioner covers another count.
        """
        if not shards:
            raise ValueError(f"storage group {group!r} has no shards")
        if partitioner.shard_count != len(shards):
            raise ValueError(
                f"partitioner for {group!r} covers {partitioner.shard_count} shards, "
                f"group has {len(shards)}"
            )
        self._groups[group] = _Group(partitioner, tuple(shards))

    def partitioner(self, group: str) -> Partitioner:
        """``group``'s partitioner. Raises UnknownGroupError."""
        return self._group(group).partitioner

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def shards(self, group: str) -> tuple[ShardT, ...]:
        """Every shard of ``group``, in index order. Raises UnknownGroupError."""
        return self._group(group).shards

    def shard_index(self, group: str, key: str | bytes) -> int:
        """The index of the shard of ``group`` that owns ``key``. Raises UnknownGroupError."""
        return self._group(group).partitioner.shard_for(key)

    def shard_for(self, group: str, key: str | bytes) -> ShardT:
        """The shard of ``group`` that owns ``key``. Raises UnknownGroupError."""
        entry = self._group(group)
        return entry.shards[entry.partitioner.shard_for(key)]

    def split_by_shard(self, group: str, keys: Iterable[str]) -> dict[int, list[str]]:
        """Group ``keys`` by owning shard index (first-seen order kept, duplicates dropped)."""
        entry = self._group(group)
        out: dict[int, list[str]] = {}
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                continue
            seen.add(key)
            out.setdefault(entry.partitioner.shard_for(key), []).append(key)
        return out

    def _group(self, group: str) -> _Group[ShardT]:
        try:
            return self._groups[group]
        except KeyError:
            raise UnknownGroupError(f"unknown storage group {group!r}") from None

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={len(g.shards)}" for n, g in self._groups.items())
        return f"ShardRouter({inner})"
