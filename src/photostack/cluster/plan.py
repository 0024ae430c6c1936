"""From a laid-out topology to supervised nodes: which engine each node runs and in what order.

Start order follows the request path backwards: storage primaries (then databases and schema),
their replicas (a base backup needs a running primary), caches, app, web, edge. The supervisor
shuts down in the reverse order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from photostack.cluster.datadir import DataDir
from photostack.cluster.engines import (
    PostgresConfig,
    PostgresEngine,
    PostgresInstall,
    RedisConfig,
    RedisEngine,
    discard_postgres_data,
    ensure_database,
    postgres_data_home,
    postgres_dsn,
)
from photostack.cluster.engines.base import Engine
from photostack.cluster.nodes import NodeProcessConfig, PhotostackNodeEngine
from photostack.cluster.state import NodeLifecycle
from photostack.cluster.supervisor import ManagedNode
from photostack.cluster.topology import Layout, NodeSpec, Role
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, Peer, ShardDsns, WebSettings

__all__ = ["DATABASE", "Phase", "build", "shard_dsns"]

DATABASE = "photostack"


@dataclass(frozen=True)
class Phase:
    label: str
    names: list[str]
    after: Callable[[], Awaitable[None]] | None = None


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
                    primary=postgres_dsn(primary.host, primary.port, DATABASE),
                    replicas=tuple(postgres_dsn(r.host, r.port, DATABASE) for r in replicas),
                )
            )
        groups[group.name] = tuple(shards)
    return groups


def build(
    lay: Layout, data: DataDir, install: PostgresInstall
) -> tuple[list[ManagedNode], list[Phase]]:
    data.create()
    secret = data.ensure_secret()
    link = data.root / "pg"
    if not link.exists() and not link.is_symlink():
        # As root, Postgres data lives outside the data dir; a data dir deleted by its user must
        # not bring its old databases back.
        discard_postgres_data(data.root)
    pg_home = postgres_data_home(data.root)
    peers = {role: [Peer(n.name, n.host, n.port) for n in lay.by_role(role)] for role in Role}
    storage = shard_dsns(lay)

    def engine_for(node: NodeSpec) -> Engine:
        log_path = data.log_path(node.name)
        if node.role is Role.STORAGE:
            primary = lay.node(node.replica_of) if node.replica_of else None
            return PostgresEngine(
                PostgresConfig(
                    name=node.name,
                    install=install,
                    pgdata=pg_home / node.name,
                    host=node.host,
                    port=node.port,
                    log_path=log_path,
                    primary=(primary.host, primary.port) if primary else None,
                )
            )
        if node.role is Role.CACHE:
            return RedisEngine(
                RedisConfig(
                    name=node.name,
                    host=node.host,
                    port=node.port,
                    data_dir=data.redis_dir(node.name),
                    log_path=log_path,
                )
            )
        settings: dict[str, object]
        if node.role is Role.EDGE:
            settings = {"backends": [vars(p) for p in peers[Role.WEB]]}
        elif node.role is Role.WEB:
            settings = _as_dict(
                WebSettings(
                    name=node.name, app_nodes=tuple(peers[Role.APP]), token_secret_path=secret
                )
            )
        else:
            settings = _as_dict(
                AppSettings(name=node.name, storage=storage, cache_nodes=tuple(peers[Role.CACHE]))
            )
        return PhotostackNodeEngine(
            NodeProcessConfig(
                name=node.name,
                role=node.role.value,
                host=node.host,
                port=node.port,
                spec_path=data.run / f"{node.name}.json",
                log_path=log_path,
                settings=settings,
            )
        )

    nodes = [
        ManagedNode(
            spec=node,
            engine=engine_for(node),
            log_path=data.log_path(node.name),
            lifecycle=NodeLifecycle(node.name),
        )
        for node in lay.nodes
    ]

    primaries = [n for n in lay.nodes if n.is_primary]

    async def init_storage() -> None:
        for node in primaries:
            await ensure_database(node.host, node.port, DATABASE)
            assert node.group is not None
            await apply_schema(node.group, postgres_dsn(node.host, node.port, DATABASE))

    def names(role: Role) -> list[str]:
        return [n.name for n in lay.by_role(role)]

    phases = [
        Phase("storage primaries", [n.name for n in primaries], init_storage),
        Phase("storage replicas", [n.name for n in lay.nodes if n.replica_of]),
        Phase("caches", names(Role.CACHE)),
        Phase("app", names(Role.APP)),
        Phase("web", names(Role.WEB)),
        Phase("edge", names(Role.EDGE)),
    ]
    return nodes, [p for p in phases if p.names]


def _as_dict(settings: WebSettings | AppSettings) -> dict[str, object]:
    import json

    loaded: dict[str, object] = json.loads(settings.to_json())
    return loaded
