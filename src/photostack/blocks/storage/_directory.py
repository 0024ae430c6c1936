"""Directory-based partitioning: a versioned lookup table, loaded through an injected loader.

The directory service (its own replicated database, served by several nodes) comes later; it
stores and serves exactly :class:`ShardMap`. Until then :class:`InMemoryDirectory` holds one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._errors import StaleShardMapError, UnroutableKeyError
from ._partitioner import Partitioner

__all__ = ["DirectoryPartitioner", "InMemoryDirectory", "ShardMap", "logical_name"]


def logical_name(index: int) -> str:
    """The entry name of logical shard ``index`` in a :class:`ShardMap`."""
    return f"logical-{index}"


@dataclass(frozen=True)
class ShardMap:
    """Version ``version`` of a group's placement: entry (a key, or a logical shard name from
    :func:`logical_name`) -> shard index in ``0..shard_count-1``. Immutable; the next version is
    made with :meth:`with_changes`, and ``to_json``/``from_json`` are what a store keeps."""

    version: int
    entries: Mapping[str, int]
    shard_count: int

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
        if self.shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {self.shard_count}")
        bad = {k: v for k, v in self.entries.items() if not 0 <= v < self.shard_count}
        if bad:
            raise ValueError(f"entries outside 0..{self.shard_count - 1}: {bad}")
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def with_changes(
        self, changes: Mapping[str, int], *, shard_count: int | None = None
    ) -> ShardMap:
        """The next version: ``changes`` applied (a new shard count if given)."""
        return ShardMap(
            self.version + 1,
            {**self.entries, **changes},
            self.shard_count if shard_count is None else shard_count,
        )

    def moved(self, newer: ShardMap) -> dict[str, tuple[int | None, int | None]]:
        """entry -> (shard here, shard in ``newer``) for every entry whose shard differs."""
        names = set(self.entries) | set(newer.entries)
        return {
            n: (self.entries.get(n), newer.entries.get(n))
            for n in sorted(names)
            if self.entries.get(n) != newer.entries.get(n)
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "shard_count": self.shard_count,
            "entries": dict(self.entries),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardMap:
        """Raises ValueError (or KeyError / TypeError) for a malformed document."""
        entries = data["entries"]
        if not isinstance(entries, Mapping):
            raise ValueError("entries must be an object")
        converted = {str(k): int(v) for k, v in entries.items()}
        return cls(int(data["version"]), converted, int(data["shard_count"]))


class InMemoryDirectory:
    """A versioned shard-map store in memory: ``load`` is the loader a partitioner takes."""

    __slots__ = ("_map",)

    def __init__(self, initial: ShardMap) -> None:
        self._map = initial

    def load(self) -> ShardMap:
        return self._map

    def publish(self, new: ShardMap) -> None:
        """Install ``new``. Raises StaleShardMapError unless its version is higher."""
        if new.version <= self._map.version:
            raise StaleShardMapError(
                f"version {new.version} does not follow version {self._map.version}"
            )
        self._map = new


class DirectoryPartitioner:
    """Key -> (logical shard ->) entry -> shard, through a cached :class:`ShardMap`.

    Without ``logical`` the key itself is the entry (a per-key directory: any key can live
    anywhere, e.g. a tenant moved alone). With ``logical`` (say ``HashModPartitioner(1024)``)
    the key hashes to a fixed logical shard and the map places logical shards on physical
    ones: resharding moves whole logical shards by editing the map — the key -> logical step
    never changes.

    Trade-off: the most flexible placement (move anything, any time, by a version bump) at the
    price of a lookup service to keep available and caches to keep fresh. A missing entry makes
    one :meth:`refresh` before UnroutableKeyError; :meth:`note_version` refreshes when a storage
    node reports a newer map (a "wrong shard" answer).
    """

    __slots__ = ("_loader", "_logical", "_map")

    def __init__(
        self, loader: Callable[[], ShardMap], *, logical: Partitioner | None = None
    ) -> None:
        self._loader = loader
        self._logical = logical
        self._map = loader()

    @property
    def shard_map(self) -> ShardMap:
        return self._map

    @property
    def version(self) -> int:
        return self._map.version

    @property
    def shard_count(self) -> int:
        return self._map.shard_count

    def entry_for(self, key: str | bytes) -> str:
        """The map entry ``key`` is looked up under."""
        if self._logical is not None:
            return logical_name(self._logical.shard_for(key))
        return key.decode("utf-8") if isinstance(key, bytes) else key

    def shard_for(self, key: str | bytes) -> int:
        """Raises UnroutableKeyError when the entry is missing even after a refresh."""
        name = self.entry_for(key)
        shard = self._map.entries.get(name)
        if shard is None and self.refresh():
            shard = self._map.entries.get(name)
        if shard is None:
            raise UnroutableKeyError(f"no directory entry for {name!r} (map v{self.version})")
        return shard

    def refresh(self) -> bool:
        """Reload the map; True when a newer version was installed (an older one is ignored)."""
        fresh = self._loader()
        if fresh.version <= self._map.version:
            return False
        self._map = fresh
        return True

    def note_version(self, seen: int) -> bool:
        """A storage node answered with map version ``seen``: refresh if it is newer."""
        return seen > self._map.version and self.refresh()

    def __repr__(self) -> str:
        return f"DirectoryPartitioner(version={self.version}, shards={self.shard_count})"
