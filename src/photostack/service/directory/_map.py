"""The cluster's versioned shard map: pure values, JSON round trip, no I/O.

For each storage group the map holds the partitioner kind and its parameters (``logical-hash-mod``:
``logical_shards`` fixed logical shards, a key's logical shard is ``stable_hash64(key) mod L``),
the placement of every logical shard on a physical shard (a :class:`ShardMap`), and each physical
shard's primary and replicas (node names and DSNs). One ``version`` covers the whole map; every
group's :class:`ShardMap` carries the same number. Versions only increase.

The first map is built from the topology by :func:`initial_map` with ``L = 64 * n`` logical shards
placed ``logical i -> physical i mod n``. Because ``n`` divides ``L``, ``hash mod L mod n ==
hash mod n``: every key lands on exactly the shard the static hash-mod router picks, so data
written before the directory existed stays readable where it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from photostack.blocks.storage import (
    DirectoryPartitioner,
    HashModPartitioner,
    ShardMap,
    logical_name,
    stable_hash64,
)

from ._errors import MapFormatError, StaleMapError, UnknownGroupError

__all__ = [
    "LOGICAL_PER_SHARD",
    "PARTITIONER_KIND",
    "ClusterMap",
    "Endpoint",
    "GroupPlacement",
    "PhysicalShard",
    "check_successor",
    "initial_map",
    "with_addresses_of",
]

PARTITIONER_KIND = "logical-hash-mod"
LOGICAL_PER_SHARD = 64


@dataclass(frozen=True)
class Endpoint:
    """One Postgres server of a shard: its node name and libpq URL."""

    name: str
    dsn: str


@dataclass(frozen=True)
class PhysicalShard:
    index: int  # 0-based position in its group
    primary: Endpoint
    replicas: tuple[Endpoint, ...] = ()
    # Bumped by every failover (docs/replication.md): a primary of an older epoch is fenced.
    epoch: int = 1

    def failed_over_to(self, name: str) -> PhysicalShard:
        """The shard with replica ``name`` as primary, the old primary listed as a replica
        (it comes back as one), and the next epoch. Raises MapFormatError."""
        chosen = [r for r in self.replicas if r.name == name]
        if not chosen:
            raise MapFormatError(f"{name} is not a replica of shard {self.index}")
        others = tuple(r for r in self.replicas if r.name != name)
        return PhysicalShard(self.index, chosen[0], (*others, self.primary), self.epoch + 1)


@dataclass(frozen=True)
class GroupPlacement:
    """A storage group's partitioner and placement at one map version."""

    name: str
    logical_shards: int
    placement: ShardMap  # logical_name(i) -> physical shard index
    shards: tuple[PhysicalShard, ...]
    kind: str = PARTITIONER_KIND

    def __post_init__(self) -> None:
        if self.kind != PARTITIONER_KIND:
            raise MapFormatError(f"{self.name}: unknown partitioner kind {self.kind!r}")
        if self.logical_shards < 1:
            raise MapFormatError(f"{self.name}: logical_shards must be >= 1")
        if [s.index for s in self.shards] != list(range(len(self.shards))):
            raise MapFormatError(f"{self.name}: shard indexes must be 0..n-1 in order")
        if self.placement.shard_count != len(self.shards):
            raise MapFormatError(f"{self.name}: placement covers another shard count")
        names = {logical_name(i) for i in range(self.logical_shards)}
        if set(self.placement.entries) != names:
            raise MapFormatError(f"{self.name}: every logical shard needs exactly one entry")

    @property
    def version(self) -> int:
        return self.placement.version

    def logical_of(self, key: str | bytes) -> int:
        return stable_hash64(key) % self.logical_shards

    def physical_of(self, key: str | bytes) -> int:
        return self.placement.entries[logical_name(self.logical_of(key))]

    def owned_by(self, index: int) -> tuple[int, ...]:
        """The logical shards physical shard ``index`` owns, ascending."""
        return tuple(
            i
            for i in range(self.logical_shards)
            if self.placement.entries[logical_name(i)] == index
        )

    def partitioner(self, loader: Any = None) -> DirectoryPartitioner:
        """A partitioner over this placement (``loader`` lets it refresh from a live client)."""
        return DirectoryPartitioner(
            loader or (lambda: self.placement), logical=HashModPartitioner(self.logical_shards)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "partitioner": {"kind": self.kind, "logical_shards": self.logical_shards},
            "placement": [
                self.placement.entries[logical_name(i)] for i in range(self.logical_shards)
            ],
            "shards": [
                {
                    "index": s.index,
                    "primary": {"name": s.primary.name, "dsn": s.primary.dsn},
                    "replicas": [{"name": r.name, "dsn": r.dsn} for r in s.replicas],
                    "epoch": s.epoch,
                }
                for s in self.shards
            ],
        }

    @classmethod
    def from_json(cls, name: str, version: int, data: Mapping[str, Any]) -> GroupPlacement:
        part = data["partitioner"]
        placement = [int(x) for x in data["placement"]]
        shards = tuple(
            PhysicalShard(
                int(s["index"]),
                Endpoint(str(s["primary"]["name"]), str(s["primary"]["dsn"])),
                tuple(Endpoint(str(r["name"]), str(r["dsn"])) for r in s.get("replicas", ())),
                int(s.get("epoch", 1)),
            )
            for s in data["shards"]
        )
        if len(placement) != int(part["logical_shards"]):
            raise MapFormatError(f"{name}: placement length differs from logical_shards")
        try:
            shard_map = ShardMap(
                version, {logical_name(i): p for i, p in enumerate(placement)}, max(1, len(shards))
            )
        except ValueError as exc:
            raise MapFormatError(f"{name}: {exc}") from exc
        return cls(name, int(part["logical_shards"]), shard_map, shards, str(part["kind"]))


@dataclass(frozen=True)
class ClusterMap:
    """Version ``version`` of every group's placement."""

    version: int
    groups: Mapping[str, GroupPlacement] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise MapFormatError(f"version must be >= 1, got {self.version}")
        for group in self.groups.values():
            if group.version != self.version:
                raise MapFormatError(f"{group.name}: placement version differs from the map's")
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))

    def group(self, name: str) -> GroupPlacement:
        try:
            return self.groups[name]
        except KeyError:
            raise UnknownGroupError(f"the shard map has no group {name!r}") from None

    def successor(
        self,
        placements: Mapping[str, Mapping[str, int]] | None = None,
        shards: Mapping[str, Sequence[PhysicalShard]] | None = None,
    ) -> ClusterMap:
        """The next version: logical placements changed and/or physical shard lists replaced.

        This is what a reshard publishes at cut-over (item 7): the same map with some logical
        shards pointing elsewhere, under version + 1.
        """
        placements = placements or {}
        shards = shards or {}
        version = self.version + 1
        groups = {}
        for name, group in self.groups.items():
            new_shards = tuple(shards.get(name, group.shards))
            entries = {**group.placement.entries, **placements.get(name, {})}
            groups[name] = GroupPlacement(
                name,
                group.logical_shards,
                ShardMap(version, entries, len(new_shards)),
                new_shards,
                group.kind,
            )
        return ClusterMap(version, groups)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "groups": {name: g.to_json() for name, g in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> ClusterMap:
        """Raises MapFormatError for anything that is not a well-formed map."""
        try:
            version = data["version"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise MapFormatError("version must be an integer")
            groups = {
                str(name): GroupPlacement.from_json(str(name), version, g)
                for name, g in data["groups"].items()
            }
            return cls(version, groups)
        except MapFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapFormatError(f"malformed shard map: {exc!r}") from exc


def initial_map(
    groups: Mapping[str, Sequence[PhysicalShard]], logical_per_shard: int = LOGICAL_PER_SHARD
) -> ClusterMap:
    """Version 1 from the topology: ``L = logical_per_shard * n`` and logical ``i`` on ``i mod n``
    (the static hash-mod placement, key for key)."""
    placements = {}
    for name, shards in groups.items():
        count = len(shards)
        logical = logical_per_shard * count
        entries = {logical_name(i): i % count for i in range(logical)}
        placements[name] = GroupPlacement(name, logical, ShardMap(1, entries, count), tuple(shards))
    return ClusterMap(1, placements)


def check_successor(current: ClusterMap | None, proposed: ClusterMap) -> None:
    """Raises StaleMapError unless ``proposed`` moves the version forward."""
    if current is not None and proposed.version <= current.version:
        raise StaleMapError(
            f"version {proposed.version} does not follow the current version {current.version}"
        )


def with_addresses_of(current: ClusterMap, layout_map: ClusterMap) -> ClusterMap | None:
    """The successor of ``current`` whose endpoints carry ``layout_map``'s DSNs (matched by node
    name), or None when nothing changed. A restart with another ``--port-base`` moves every
    node's address but none of the data: placement is kept, only addresses are updated."""
    dsns = {
        e.name: e.dsn
        for g in layout_map.groups.values()
        for s in g.shards
        for e in (s.primary, *s.replicas)
    }

    def moved(e: Endpoint) -> Endpoint:
        return Endpoint(e.name, dsns.get(e.name, e.dsn))

    shards = {
        name: [
            PhysicalShard(s.index, moved(s.primary), tuple(moved(r) for r in s.replicas), s.epoch)
            for s in g.shards
        ]
        for name, g in current.groups.items()
    }
    if all(list(g.shards) == shards[name] for name, g in current.groups.items()):
        return None
    return current.successor(shards=shards)
