"""The directory service: the versioned shard map, its nodes, its store and its clients.

- :mod:`._map`: ``ClusterMap`` (pure values: groups -> partitioner, logical -> physical shard
  -> primary/replicas, version) and ``initial_map`` from the topology.
- :mod:`._node`: ``create_directory_app`` (the HTTP node) and ``DirectorySettings``.
- :mod:`._mapstore`: the map's durable table in the directory group's database.
- :mod:`._client`: ``DirectoryClient`` (cached map, failover across nodes, version polling).
- :mod:`._routing` / :mod:`._guard`: the app's map-driven router and the "wrong shard" check.

See docs/directory.md.
"""

from ._client import DirectoryClient, DirectoryClientConfig, HttpTransport, Transport
from ._errors import (
    DirectoryError,
    DirectoryUnavailableError,
    MapFormatError,
    StaleMapError,
    UnknownGroupError,
    WrongShardError,
)
from ._guard import NO_GUARD, MapGuard, NoGuard, OwnershipGuard, claim_ownership
from ._map import (
    LOGICAL_PER_SHARD,
    PARTITIONER_KIND,
    ClusterMap,
    Endpoint,
    GroupPlacement,
    PhysicalShard,
    check_successor,
    initial_map,
    with_addresses_of,
)
from ._mapstore import MapStore, apply_directory_schema
from ._node import DirectorySettings, create_directory_app
from ._routing import MapRouting

__all__ = [
    "LOGICAL_PER_SHARD",
    "NO_GUARD",
    "PARTITIONER_KIND",
    "ClusterMap",
    "DirectoryClient",
    "DirectoryClientConfig",
    "DirectoryError",
    "DirectorySettings",
    "DirectoryUnavailableError",
    "Endpoint",
    "GroupPlacement",
    "HttpTransport",
    "MapFormatError",
    "MapGuard",
    "MapRouting",
    "MapStore",
    "NoGuard",
    "OwnershipGuard",
    "PhysicalShard",
    "StaleMapError",
    "Transport",
    "UnknownGroupError",
    "WrongShardError",
    "apply_directory_schema",
    "check_successor",
    "claim_ownership",
    "create_directory_app",
    "initial_map",
    "with_addresses_of",
]
