"""From a laid-out topology to supervised nodes: which engine each node runs and in what order.

Start order follows the request path backwards: storage primaries (then databases and schema),
their replicas (a base backup needs a running primary), the directory nodes, caches, app, web,
edge. The supervisor shuts down in the reverse order.

The storage helpers (shard DSNs, shard map, replication settings) live in ``_plan_storage``,
the other roles' engines and node settings in ``_plan_nodes``; both are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from photostack.cluster._plan_nodes import (
    WorkerEngine,
    _as_dict,
    _cache_engine,
    _cdn_purge_peer,
    _chaos_engine,
    _edge_proxy_settings,
    _media_engine,
    _media_settings,
    _nginx_edge,
    _node_config,
    _via,
    _worker_engine,
    admin_socket_path,
)
from photostack.cluster._plan_storage import (
    DATABASE,
    QUEUE_NAME,
    _replication_settings,
    _sync_standbys,
    claim_initial_ownership,
    directory_map,
    directory_settings,
    group_replication,
    queue_dsn,
    replication_policies,
    replication_settings,
    shard_dsns,
    standby_names,
)
from photostack.cluster.datadir import DataDir
from photostack.cluster.engines import (
    PostgresConfig,
    PostgresEngine,
    PostgresInstall,
    discard_postgres_data,
    ensure_database,
    postgres_data_home,
    postgres_dsn,
)
from photostack.cluster.engines.base import Engine
from photostack.cluster.nodes import PhotostackNodeEngine
from photostack.cluster.reshard_ops import added_storage_nodes, retired_storage_nodes
from photostack.cluster.state import NodeLifecycle
from photostack.cluster.supervisor import ManagedNode
from photostack.cluster.topology import DIRECTORY_GROUP, QUEUE_GROUP, Layout, NodeSpec, Role
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, Peer, WebSettings

__all__ = [
    "DATABASE",
    "QUEUE_NAME",
    "Phase",
    "WorkerEngine",
    "admin_socket_path",
    "build",
    "claim_initial_ownership",
    "directory_map",
    "directory_settings",
    "group_replication",
    "queue_dsn",
    "replication_policies",
    "replication_settings",
    "shard_dsns",
    "standby_names",
]


@dataclass(frozen=True)
class Phase:
    label: str
    names: list[str]
    after: Callable[[], Awaitable[None]] | None = None


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

    def engine_for(node: NodeSpec) -> Engine:  # noqa: PLR0911 - one engine per role
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
                    primary=lay.reach(primary, "replication", node.name) if primary else None,
                    synchronous_standby_names=_sync_standbys(lay, node),
                    settings=_replication_settings(lay, node),
                )
            )
        if node.role is Role.CACHE:
            return _cache_engine(lay, node, data)
        if node.role is Role.WORKER:
            return _worker_engine(lay, node, data, peers[Role.APP])
        if node.role is Role.CHAOS:
            return _chaos_engine(lay, node, data)
        if node.role in (Role.MEDIA, Role.CDN):
            return _media_engine(lay, node, data)
        settings: dict[str, object]
        if node.role is Role.EDGE and lay.topology.edge_engine == "nginx":
            return _nginx_edge(lay, node, data, peers[Role.WEB])
        if node.role is Role.EDGE:
            settings = {
                "backends": [vars(p) for p in peers[Role.WEB]],
                "balancing": lay.topology.edge_balancing,
                "admin_socket": str(admin_socket_path(data.run, node.name)),
                "proxy": _edge_proxy_settings(lay, node, data),
            }
        elif node.role is Role.WEB:
            settings = _as_dict(
                WebSettings(
                    name=node.name,
                    app_nodes=tuple(_via(lay, Role.APP, "web-app")),
                    token_secret_path=secret,
                    cache_nodes=tuple(peers[Role.CACHE]),  # pub/sub for real-time events
                    media=_media_settings(lay),  # uploads store originals there
                )
            )
            settings["balancing"] = lay.topology.web_balancing
            settings["admin_socket"] = str(admin_socket_path(data.run, node.name))
        elif node.role is Role.DIRECTORY:
            settings = json.loads(directory_settings(lay, node.name).to_json())
        else:
            settings = _as_dict(
                AppSettings(
                    name=node.name,
                    storage=storage,
                    cache_nodes=tuple(_via(lay, Role.CACHE, "app-cache")),
                    directory_nodes=tuple(peers[Role.DIRECTORY]),  # placement: the shard map
                    static_base_url=f"http://{lay.topology.host}:{lay.static_port}",
                    caching=lay.topology.caching,  # cached reads ([cache]; docs/caching.md)
                    queue_dsn=queue_dsn(lay),  # uploads' tasks (docs/uploads.md)
                    queue_max_length=lay.topology.queue_max_length,
                    feed={"fanout_limit": lay.topology.feed_fanout_limit},
                    replication=replication_policies(lay),  # read split, CAP (replication.md)
                    media_nodes=tuple(peers[Role.MEDIA]),  # every upload on each (media.md)
                    cdn_purge=_cdn_purge_peer(lay),
                )
            )
        return PhotostackNodeEngine(_node_config(node, data, settings))

    nodes = [
        ManagedNode(
            spec=node,
            engine=engine_for(node),
            log_path=data.log_path(node.name),
            lifecycle=NodeLifecycle(node.name),
        )
        for node in lay.nodes
    ]
    # shards `photostack reshard remove-shard` emptied and retired are not started again;
    # shards `photostack reshard add-shard` created (their data and tables exist already) are
    retired = retired_storage_nodes(data.root)
    nodes = [n for n in nodes if n.name not in retired]
    added = [
        n
        for n in added_storage_nodes(data.root, nodes, group_replication(lay))
        if n.name not in retired
    ]
    nodes += added

    primaries = [n for n in lay.nodes if n.is_primary and n.name not in retired]

    first_map = directory_map(lay)

    async def init_storage() -> None:
        for node in primaries:
            await ensure_database(node.host, node.port, DATABASE)
            assert node.group is not None
            if node.group in (DIRECTORY_GROUP, QUEUE_GROUP):
                continue  # the directory nodes / the queue's users create their own tables
            # replicas start after their primary: a synchronous one must not wait for them
            dsn = postgres_dsn(node.host, node.port, DATABASE) + "?synchronous_commit=local"
            await apply_schema(node.group, dsn)
            assert node.shard is not None
            owned = first_map.group(node.group).owned_by(node.shard - 1)
            await claim_initial_ownership(dsn, owned, first_map.version)

    def names(role: Role) -> list[str]:
        return [n.name for n in lay.by_role(role)]

    phases = [
        Phase("chaos", names(Role.CHAOS)),  # links listen before any consumer connects
        Phase(
            "storage primaries",
            [n.name for n in primaries] + [n.name for n in added if n.spec.is_primary],
            init_storage,
        ),
        Phase(
            "storage replicas",
            [n.name for n in lay.nodes if n.replica_of and n.name not in retired]
            + [n.name for n in added if not n.spec.is_primary],
        ),
        Phase("directory", names(Role.DIRECTORY)),
        Phase("media", names(Role.MEDIA)),  # uploads need both origins (docs/media.md)
        Phase("caches", names(Role.CACHE)),
        Phase("app", names(Role.APP)),
        Phase("workers", names(Role.WORKER)),  # they call the app nodes; stopped before them
        Phase("web", names(Role.WEB)),
        Phase("edge", names(Role.EDGE)),
        Phase("cdn", names(Role.CDN)),  # the static host, in front of the media origins
    ]
    return nodes, [p for p in phases if p.names]
