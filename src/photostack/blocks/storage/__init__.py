"""Storage building blocks: partitioners and the shard router (pure logic, no drivers).

Every partitioner satisfies :class:`Partitioner` (``shard_count``, ``shard_for(key)``); each
one's docstring states its trade-off, and docs/partitioning.md says when to pick which.
"""

from ._composite import CompositePartitioner, split_on
from ._consistent import ConsistentHashPartitioner
from ._directory import DirectoryPartitioner, InMemoryDirectory, ShardMap, logical_name
from ._errors import StaleShardMapError, StorageError, UnknownGroupError, UnroutableKeyError
from ._gather import GatherResult, ShardFailure, ShardOutcome, scatter_gather
from ._list import ListPartitioner
from ._partitioner import HashModPartitioner, Partitioner, stable_hash64
from ._range import RangePartitioner, RangeStats, range_stats, split_points_for
from ._replicas import (
    PRIMARY,
    Consistency,
    PrimaryView,
    ReadDecision,
    ReadPolicy,
    ReadRefused,
    ReplicationMode,
    ReplicaView,
    choose_read,
    format_lsn,
    format_read_after,
    merge_read_after,
    parse_lsn,
    parse_read_after,
    synchronous_standby_names,
)
from ._roundrobin import RoundRobinPartitioner
from ._router import ShardRouter

__all__ = [
    "PRIMARY",
    "CompositePartitioner",
    "Consistency",
    "ConsistentHashPartitioner",
    "DirectoryPartitioner",
    "GatherResult",
    "HashModPartitioner",
    "InMemoryDirectory",
    "ListPartitioner",
    "Partitioner",
    "PrimaryView",
    "RangePartitioner",
    "RangeStats",
    "ReadDecision",
    "ReadPolicy",
    "ReadRefused",
    "ReplicaView",
    "ReplicationMode",
    "RoundRobinPartitioner",
    "ShardFailure",
    "ShardMap",
    "ShardOutcome",
    "ShardRouter",
    "StaleShardMapError",
    "StorageError",
    "UnknownGroupError",
    "UnroutableKeyError",
    "choose_read",
    "format_lsn",
    "format_read_after",
    "logical_name",
    "merge_read_after",
    "parse_lsn",
    "parse_read_after",
    "range_stats",
    "scatter_gather",
    "split_on",
    "split_points_for",
    "stable_hash64",
    "synchronous_standby_names",
]
