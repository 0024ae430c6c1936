"""The storage nodes ``add-shard`` creates and ``remove-shard`` retires, and their records.

A new shard has the members a topology shard of its group has: a primary and the group's
``replicas`` streaming replicas (``pg_basebackup -R`` from the new primary), with the same
replication mode — for a synchronous group every member's ``synchronous_standby_names`` names
the new shard's replicas. Both are worked out by the helpers ``plan.build`` uses for topology
shards (:func:`photostack.cluster.plan.standby_names`, ``replication_settings``).

``DATA/reshard-nodes.json`` records each created node (a replica with ``replica_of``) so every
later ``up`` starts it, primaries with the primaries and replicas with the replicas;
``DATA/reshard-retired.json`` names the nodes of emptied shards, which no ``up`` starts again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from photostack.cluster.engines import PostgresConfig, PostgresEngine
from photostack.cluster.state import NodeLifecycle
from photostack.cluster.supervisor import ManagedNode
from photostack.cluster.topology import NodeSpec, Role

__all__ = [
    "NODES_FILE",
    "RETIRED_FILE",
    "GroupReplication",
    "added_storage_nodes",
    "member_names",
    "record_node",
    "record_retired",
    "retired_storage_nodes",
    "storage_member",
    "template_primary",
]

NODES_FILE = "reshard-nodes.json"
RETIRED_FILE = "reshard-retired.json"


@dataclasses.dataclass(frozen=True)
class GroupReplication:
    """A storage group's replication, from the topology: what a new shard's members copy."""

    mode: str = "async"  # async | sync | remote_apply
    replicas: int = 0  # streaming replicas per shard


def template_primary(nodes: Sequence[ManagedNode], group: str) -> ManagedNode | None:
    """The group's first primary: the new shard's Postgres nodes are configured like it."""
    primaries = [
        n
        for n in nodes
        if n.spec.group == group and n.spec.is_primary and isinstance(n.engine, PostgresEngine)
    ]
    return min(primaries, key=lambda n: n.spec.shard or 0) if primaries else None


def member_names(group: str, shard: int, replicas: int) -> tuple[str, list[str]]:
    """A shard's node names, as the topology names them: the primary, then its replicas."""
    primary = f"{group}-{shard}-primary"
    return primary, [f"{group}-{shard}-replica-{r}" for r in range(1, replicas + 1)]


def storage_member(
    template: ManagedNode,
    spec: NodeSpec,
    replicas: Sequence[str],
    mode: str,
    primary_port: int | None = None,
) -> ManagedNode:
    """One member of a new shard, configured like ``template`` (its group's first primary):
    a primary, or (``spec.replica_of`` set) a streaming replica of the primary listening on
    ``primary_port``. ``replicas`` are the shard's replica names (synchronous standbys)."""
    from photostack.cluster import plan  # plan imports this module (added_storage_nodes)

    assert isinstance(template.engine, PostgresEngine)
    base = template.engine.config
    primary = spec.replica_of or spec.name
    config: PostgresConfig = dataclasses.replace(
        base,
        name=spec.name,
        pgdata=base.pgdata.with_name(spec.name),
        port=spec.port,
        log_path=base.log_path.with_name(f"{spec.name}.log"),
        primary=(spec.host, primary_port) if spec.replica_of and primary_port else None,
        synchronous_standby_names=plan.standby_names(mode, primary, replicas),
        settings=plan.replication_settings(mode),
    )
    return ManagedNode(
        spec=spec,
        engine=PostgresEngine(config),
        log_path=config.log_path,
        lifecycle=NodeLifecycle(spec.name),
    )


def _entries(data_root: Path) -> list[dict[str, Any]]:
    path = data_root / NODES_FILE
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return entries


def added_storage_nodes(
    data_root: Path,
    nodes: Sequence[ManagedNode],
    replication: Mapping[str, GroupReplication],
) -> list[ManagedNode]:
    """The storage nodes earlier ``add-shard`` commands created (``DATA/reshard-nodes.json``),
    primaries and replicas, configured like their group's first primary with the group's
    replication mode; plan.build starts them with the topology's primaries and replicas."""
    entries = _entries(data_root)
    ports = {e["name"]: int(e["port"]) for e in entries}
    out = []
    for entry in entries:
        template = template_primary(nodes, entry["group"])
        if template is None:
            continue
        replica_of = entry.get("replica_of")
        primary = str(replica_of or entry["name"])
        spec = NodeSpec(
            entry["name"],
            Role.STORAGE,
            template.spec.host,
            int(entry["port"]),
            entry["group"],
            int(entry["shard"]),
            replica_of=replica_of,
        )
        replicas = [e["name"] for e in entries if e.get("replica_of") == primary]
        mode = replication.get(entry["group"], GroupReplication()).mode
        out.append(storage_member(template, spec, replicas, mode, ports.get(primary)))
    return out


def record_node(data_root: Path, node: ManagedNode) -> None:
    """Add ``node`` to ``DATA/reshard-nodes.json`` (once)."""
    entries = _entries(data_root)
    if all(e["name"] != node.name for e in entries):
        entry: dict[str, Any] = {
            "name": node.name,
            "group": node.spec.group,
            "shard": node.spec.shard,
            "port": node.spec.port,
        }
        if node.spec.replica_of:
            entry["replica_of"] = node.spec.replica_of
        entries.append(entry)
        _write(data_root / NODES_FILE, entries)


def retired_storage_nodes(data_root: Path) -> frozenset[str]:
    """The storage nodes of shards ``remove-shard`` emptied (``DATA/reshard-retired.json``)."""
    path = data_root / RETIRED_FILE
    if not path.exists():
        return frozenset()
    return frozenset(str(n) for n in json.loads(path.read_text(encoding="utf-8")))


def record_retired(data_root: Path, names: Sequence[str]) -> None:
    """Add ``names`` (a removed shard's primary and replicas) to ``DATA/reshard-retired.json``."""
    _write(data_root / RETIRED_FILE, sorted(retired_storage_nodes(data_root) | set(names)))


def _write(path: Path, body: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    tmp.replace(path)
