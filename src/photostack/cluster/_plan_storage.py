"""The storage side of a plan: shard DSNs, the first shard map, directory settings and the
Postgres replication settings (``synchronous_standby_names``, WAL) of each storage node."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from photostack.cluster.engines import postgres_dsn
from photostack.cluster.reshard_ops import GroupReplication
from photostack.cluster.topology import (
    DIRECTORY_GROUP,
    PRODUCT_GROUPS,
    QUEUE_GROUP,
    Layout,
    NodeSpec,
    Role,
)
from photostack.service.directory import (
    ClusterMap,
    DirectorySettings,
    Endpoint,
    PhysicalShard,
    claim_ownership,
    initial_map,
)
from photostack.service.settings import ShardDsns

DATABASE = "photostack"


def shard_dsns(lay: Layout) -> dict[str, tuple[ShardDsns, ...]]:
    """Every storage group's shards as libpq URLs, primary first."""
    groups: dict[str, tuple[ShardDsns, ...]] = {}
    for group in lay.topology.storage:
        shards = []
        for index in range(1, group.shards + 1):
            primary, replicas = lay.shard_nodes(group.name, index)
            shards.append(
                ShardDsns(
                    index=index,
                    primary=_storage_dsn(lay, primary),
                    replicas=tuple(_storage_dsn(lay, r) for r in replicas),
                )
            )
        groups[group.name] = tuple(shards)
    return groups


def directory_map(lay: Layout) -> ClusterMap:
    """The first shard map, from the layout: the static hash-mod placement (docs/directory.md)."""
    groups: dict[str, list[PhysicalShard]] = {}
    for group in lay.topology.storage:
        groups[group.name] = []
        for index in range(1, group.shards + 1):
            primary, replicas = lay.shard_nodes(group.name, index)
            groups[group.name].append(
                PhysicalShard(
                    index - 1,
                    Endpoint(primary.name, _storage_dsn(lay, primary)),
                    tuple(Endpoint(r.name, _storage_dsn(lay, r)) for r in replicas),
                )
            )
    return initial_map(groups)


def _storage_dsn(lay: Layout, node: NodeSpec) -> str:
    """How app nodes reach a storage node: directly, or through a [chaos] storage link."""
    host, port = lay.reach(node, "storage")
    return postgres_dsn(host, port, DATABASE)


def directory_settings(lay: Layout, name: str) -> DirectorySettings:
    primary, replicas = lay.shard_nodes(DIRECTORY_GROUP, 1)
    return DirectorySettings(
        name=name,
        primary_dsn=postgres_dsn(primary.host, primary.port, DATABASE),
        replica_dsns=tuple(postgres_dsn(r.host, r.port, DATABASE) for r in replicas),
        initial_map=directory_map(lay).to_json(),
        replication=replication_policies(lay),  # the failover coordinator's per-group rules
        observers=tuple(n.name for n in lay.by_role(Role.DIRECTORY)),
        # the directory database fails over too (docs/replication.md): members and peers
        members=(primary.name, *(r.name for r in replicas)),
        peers={n.name: n.address for n in lay.by_role(Role.DIRECTORY) if n.name != name},
    )


def replication_policies(lay: Layout) -> dict[str, dict[str, object]]:
    """Per product group: replication mode, CAP choice, replica read bound (docs/replication.md)."""
    return {
        g.name: {
            "replication": g.replication,
            "consistency": g.consistency,
            "max_replica_lag_s": g.max_replica_lag_s,
        }
        for g in lay.topology.storage
    }


def _sync_standbys(lay: Layout, node: NodeSpec) -> str:
    """``synchronous_standby_names`` of a storage node: its shard's other members for a
    synchronous group (the same list on every member, so it stays right after a failover)."""
    from photostack.blocks.storage import ReplicationMode, synchronous_standby_names

    if node.group == DIRECTORY_GROUP:  # synchronous: no acknowledged map version is lost
        primary, replicas = lay.shard_nodes(DIRECTORY_GROUP, 1)
        names = [r.name for r in replicas] + [primary.name]
        return synchronous_standby_names(ReplicationMode.SYNC, names) if replicas else ""
    if node.group is None or node.shard is None or node.group not in PRODUCT_GROUPS:
        return ""
    primary, replicas = lay.shard_nodes(node.group, node.shard)
    mode = lay.topology.group(node.group).replication
    return standby_names(mode, primary.name, [r.name for r in replicas])


def standby_names(mode: str, primary: str, replicas: Sequence[str]) -> str:
    """``synchronous_standby_names`` of every member of a product shard (``primary`` and its
    ``replicas``) in replication ``mode``: also what ``reshard add-shard`` gives a new shard."""
    from photostack.blocks.storage import ReplicationMode, synchronous_standby_names

    return synchronous_standby_names(ReplicationMode(mode), [*replicas, primary])


def _replication_settings(lay: Layout, node: NodeSpec) -> dict[str, str]:
    group = node.group
    mode = lay.topology.group(group).replication if group in PRODUCT_GROUPS else "async"
    return replication_settings(mode)


def replication_settings(mode: str) -> dict[str, str]:
    """What pg_rewind (wal_log_hints) and fast failure detection need; remote_apply groups."""
    settings = {"wal_log_hints": "on", "wal_receiver_timeout": "5s", "wal_sender_timeout": "5s"}
    if mode == "remote_apply":
        settings["synchronous_commit"] = "remote_apply"
    return settings


def group_replication(lay: Layout) -> dict[str, GroupReplication]:
    """Per product group: replication mode and replicas per shard, what a shard ``reshard
    add-shard`` creates copies (docs/resharding.md)."""
    return {
        g.name: GroupReplication(g.replication, g.replicas)
        for g in lay.topology.storage
        if g.name in PRODUCT_GROUPS
    }


async def claim_initial_ownership(dsn: str, logical: tuple[int, ...], version: int) -> None:
    """Record on a data shard the logical shards the first map gives it (first `up` only)."""
    conn = await asyncpg.connect(dsn)
    try:
        await claim_ownership(conn, logical, version)
    finally:
        await conn.close()


QUEUE_NAME = "media"  # the uploads' queue (thumbnails, fan-out, cleanup)


def queue_dsn(lay: Layout) -> str:
    primary, _ = lay.shard_nodes(QUEUE_GROUP, 1)
    return postgres_dsn(primary.host, primary.port, DATABASE)
