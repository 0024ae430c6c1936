"""The members ``reshard add-shard`` gives a new shard (cluster/_reshard_nodes.py): configured
like the group's topology shards by the same plan.py helpers, recorded so ``up`` starts them."""

from __future__ import annotations

from pathlib import Path

import pytest

from photostack.cluster._reshard_nodes import (
    GroupReplication,
    added_storage_nodes,
    member_names,
    record_node,
    storage_member,
)
from photostack.cluster.engines import PostgresConfig, PostgresEngine, PostgresInstall
from photostack.cluster.state import NodeLifecycle
from photostack.cluster.supervisor import ManagedNode
from photostack.cluster.topology import NodeSpec, Role

INSTALL = PostgresInstall(bin_dir=Path("/opt/pg/bin"), lib_dir=Path("/opt/pg/lib"))


def _template(tmp_path: Path, group: str = "users") -> ManagedNode:
    name = f"{group}-1-primary"
    config = PostgresConfig(
        name=name,
        install=INSTALL,
        pgdata=tmp_path / "pg" / name,
        port=7001,
        log_path=tmp_path / "logs" / f"{name}.log",
        synchronous_standby_names='FIRST 1 ("users-1-replica-1", "users-1-primary")',
        settings={"wal_log_hints": "on"},
    )
    return ManagedNode(
        spec=NodeSpec(name, Role.STORAGE, "127.0.0.1", 7001, group, 1),
        engine=PostgresEngine(config),
        log_path=config.log_path,
        lifecycle=NodeLifecycle(name),
    )


def _config(node: ManagedNode) -> PostgresConfig:
    assert isinstance(node.engine, PostgresEngine)
    return node.engine.config


def test_member_names_follow_the_topology() -> None:
    assert member_names("photos", 3, 2) == (
        "photos-3-primary",
        ["photos-3-replica-1", "photos-3-replica-2"],
    )
    assert member_names("social", 4, 0) == ("social-4-primary", [])


@pytest.mark.parametrize(
    ("mode", "standbys", "commit"),
    [
        ("async", "", None),
        ("sync", 'FIRST 1 ("users-2-replica-1", "users-2-primary")', None),
        ("remote_apply", 'FIRST 1 ("users-2-replica-1", "users-2-primary")', "remote_apply"),
    ],
)
def test_a_new_shard_is_replicated_like_its_group(
    tmp_path: Path, mode: str, standbys: str, commit: str | None
) -> None:
    template = _template(tmp_path)
    primary = storage_member(
        template,
        NodeSpec("users-2-primary", Role.STORAGE, "127.0.0.1", 7010, "users", 2),
        ["users-2-replica-1"],
        mode,
    )
    replica = storage_member(
        template,
        NodeSpec(
            "users-2-replica-1", Role.STORAGE, "127.0.0.1", 7011, "users", 2, "users-2-primary"
        ),
        ["users-2-replica-1"],
        mode,
        7010,
    )
    first, second = _config(primary), _config(replica)
    assert first.primary is None
    assert second.primary == ("127.0.0.1", 7010)  # pg_basebackup -R from the new primary
    assert first.pgdata == tmp_path / "pg" / "users-2-primary"
    assert second.log_path == tmp_path / "logs" / "users-2-replica-1.log"
    for config in (first, second):
        assert config.synchronous_standby_names == standbys
        assert config.settings.get("synchronous_commit") == commit
        assert config.settings["wal_log_hints"] == "on"  # pg_rewind after a failover


def test_recorded_members_come_back_with_their_roles(tmp_path: Path) -> None:
    template = _template(tmp_path)
    for spec in (
        NodeSpec("users-2-primary", Role.STORAGE, "127.0.0.1", 7010, "users", 2),
        NodeSpec(
            "users-2-replica-1", Role.STORAGE, "127.0.0.1", 7011, "users", 2, "users-2-primary"
        ),
    ):
        node = storage_member(template, spec, [], "async", 7010 if spec.replica_of else None)
        record_node(tmp_path, node)
        record_node(tmp_path, node)  # once only
    nodes = added_storage_nodes(tmp_path, [template], {"users": GroupReplication("sync", 1)})
    assert [(n.name, n.spec.replica_of, n.spec.port) for n in nodes] == [
        ("users-2-primary", None, 7010),
        ("users-2-replica-1", "users-2-primary", 7011),
    ]
    assert _config(nodes[1]).primary == ("127.0.0.1", 7010)
    names = 'FIRST 1 ("users-2-replica-1", "users-2-primary")'
    assert [_config(n).synchronous_standby_names for n in nodes] == [names, names]
    # a group without a primary to copy (none in this cluster) brings nothing back
    assert added_storage_nodes(tmp_path, [_template(tmp_path, "photos")], {}) == []
