"""From a laid-out topology to supervised nodes: which engine each node runs and in what order.

Start order follows the request path backwards: storage primaries (then databases and schema),
their replicas (a base backup needs a running primary), the directory nodes, caches, app, web,
edge. The supervisor shuts down in the reverse order.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from photostack.blocks.cache import PolicyName
from photostack.cluster.datadir import DataDir
from photostack.cluster.engines import (
    CacheNodeConfig,
    CacheNodeEngine,
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
from photostack.cluster.engines.base import Engine, ProcessSpec
from photostack.cluster.nodes import NodeProcessConfig, PhotostackNodeEngine
from photostack.cluster.reshard_ops import (
    GroupReplication,
    added_storage_nodes,
    retired_storage_nodes,
)
from photostack.cluster.state import NodeLifecycle
from photostack.cluster.supervisor import ManagedNode
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
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, Peer, ShardDsns, WebSettings

__all__ = [
    "DATABASE",
    "Phase",
    "admin_socket_path",
    "build",
    "directory_map",
    "directory_settings",
    "group_replication",
    "replication_policies",
    "replication_settings",
    "shard_dsns",
    "standby_names",
]

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


def _edge_proxy_settings(lay: Layout, node: NodeSpec, data: DataDir) -> dict[str, object]:
    """``[edge.proxy]`` with ``tls`` and ``access_log`` turned into paths (docs/proxy.md).

    TLS listens on edge-1 only, on ``port base + TLS_PORT_OFFSET``; the certificate is made at
    the first ``up`` under ``DATA/tls`` and reused after.
    """
    proxy: dict[str, object] = dict(lay.topology.edge_proxy)
    if proxy.pop("access_log", False):
        proxy["access_log"] = str(data.logs / f"{node.name}.access.log")
    if proxy.pop("tls", False) and node.port == lay.api_port:
        cert, key = _edge_certificate(lay, data)
        proxy["tls"] = {"port": lay.tls_port, "cert": str(cert), "key": str(key)}
    return proxy


def _edge_certificate(lay: Layout, data: DataDir) -> tuple[Path, Path]:
    from photostack.blocks.proxy import ensure_self_signed

    cert, key = data.root / "tls" / "edge.crt", data.root / "tls" / "edge.key"
    ensure_self_signed(cert, key, hosts=(lay.topology.host,))
    return cert, key


def _nginx_edge(lay: Layout, node: NodeSpec, data: DataDir, webs: list[Peer]) -> Engine:
    """The same edge, rendered as an nginx config (``[edge] engine = "nginx"``)."""
    from photostack.blocks.balancer import parse_settings
    from photostack.cluster.engines.nginx import NginxBackend, NginxConfig, NginxEngine

    upstream, weights = parse_settings(lay.topology.edge_balancing)
    proxy = _edge_proxy_settings(lay, node, data)
    tls = proxy.get("tls")
    tls_paths = tls if isinstance(tls, dict) else {}
    health = upstream.health

    def strings(key: str) -> tuple[str, ...]:
        value = proxy.get(key, [])
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        value = proxy.get(key, {})
        return tuple((str(k), str(v)) for k, v in value.items()) if isinstance(value, dict) else ()

    def number(key: str, default: float) -> float:
        value = proxy.get(key, default)
        return float(value) if isinstance(value, int | float) else default

    return NginxEngine(
        NginxConfig(
            name=node.name,
            host=node.host,
            port=node.port,
            backends=tuple(
                NginxBackend(w.name, w.host, w.port, max(1, round(weights.get(w.name, 1.0))))
                for w in webs
            ),
            prefix=data.root / "nginx" / node.name,
            log_path=data.log_path(node.name),
            strategy=upstream.strategy.value,
            hash_key=upstream.hash_key,
            max_fails=health.eject_after_failures,
            fail_timeout_s=health.ejection_initial_s,
            max_tries=upstream.max_tries,
            connect_timeout_s=upstream.connect_timeout_s,
            request_timeout_s=upstream.request_timeout_s,
            header_timeout_s=number("header_timeout_s", 10.0),
            client_timeout_s=number("client_timeout_s", 60.0),
            max_body_bytes=int(number("max_body_bytes", 12 * 1024 * 1024)),
            max_header_bytes=int(number("max_header_bytes", 16 * 1024)),
            allow_methods=strings("allow_methods"),
            deny_methods=strings("deny_methods"),
            deny_paths=strings("deny_paths"),
            request_headers_add=pairs("request_headers_add"),
            request_headers_remove=strings("request_headers_remove"),
            response_headers_add=pairs("response_headers_add"),
            response_headers_remove=strings("response_headers_remove"),
            access_log_path=Path(str(proxy["access_log"])) if "access_log" in proxy else None,
            gzip=proxy.get("gzip") is True,
            gzip_min_bytes=int(number("gzip_min_bytes", 256)),
            tls_port=int(tls_paths["port"]) if tls_paths else None,
            tls_cert_path=Path(str(tls_paths["cert"])) if tls_paths else None,
            tls_key_path=Path(str(tls_paths["key"])) if tls_paths else None,
            collapse=proxy.get("collapse") is True,
            cache_ttl_s=number("cache_ttl_s", 0.0),
            stale_if_error_s=number("stale_if_error_s", 0.0),
        )
    )


def admin_socket_path(run_dir: Path, name: str) -> Path:
    """Where node ``name`` serves its balancer admin endpoint (a Unix socket).

    Socket paths are limited to about 100 bytes; a deep data dir falls back to a short path in
    the temp dir, named after the full one so two clusters never share it.
    """
    path = run_dir.resolve() / f"{name}.admin.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"photostack-{digest}.sock"


_MAX_SOCKET_PATH = 100


def _cache_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """Redis (the default) or the photostack cache node, as ``[cache] engine`` says."""
    topo = lay.topology
    if topo.cache_engine == "photostack":
        return CacheNodeEngine(
            CacheNodeConfig(
                name=node.name,
                host=node.host,
                port=node.port,
                log_path=data.log_path(node.name),
                cwd=data.redis_dir(node.name),
                maxmemory_bytes=topo.cache_maxmemory_bytes or 0,
                policy=topo.cache_policy or PolicyName.LRU,
            )
        )
    return RedisEngine(
        RedisConfig(
            name=node.name,
            host=node.host,
            port=node.port,
            data_dir=data.redis_dir(node.name),
            log_path=data.log_path(node.name),
            maxmemory_bytes=topo.cache_maxmemory_bytes,
            maxmemory_policy=topo.cache_policy.value if topo.cache_policy else None,
        )
    )


def _via(lay: Layout, role: Role, kind: str) -> list[Peer]:
    """A role's nodes as their consumers over ``kind`` links reach them ([chaos])."""
    return [Peer(n.name, *lay.reach(n, kind)) for n in lay.by_role(role)]


def _chaos_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """The chaos node: one process listening on every [chaos] link (docs/chaos.md)."""
    links = [
        {
            "name": link.name,
            "listen_host": node.host,
            "listen_port": link.port,
            "upstream_host": lay.node(link.upstream).host,
            "upstream_port": lay.node(link.upstream).port,
        }
        for link in lay.links
    ]
    return PhotostackNodeEngine(_node_config(node, data, {"links": links}))


QUEUE_NAME = "media"  # the uploads' queue (thumbnails, fan-out, cleanup)


def queue_dsn(lay: Layout) -> str:
    primary, _ = lay.shard_nodes(QUEUE_GROUP, 1)
    return postgres_dsn(primary.host, primary.port, DATABASE)


def _media_settings(lay: Layout) -> dict[str, object]:
    """Where uploads and workers store media: the HTTP origins (every put on each) and the
    CDN's purge listener (blocks/media MediaClient via service/_uploads.OriginMediaStore)."""
    base = f"http://{lay.topology.host}:{lay.static_port}"
    origins = [vars(Peer(n.name, n.host, n.port)) for n in lay.by_role(Role.MEDIA)]
    purge = _cdn_purge_peer(lay)
    return {
        "engine": "origins", "base_url": base,
        "origins": origins, "purge": vars(purge) if purge else None,
    }  # fmt: skip


def _cdn_purge_peer(lay: Layout) -> Peer | None:
    cdn = lay.by_role(Role.CDN)
    if not cdn or cdn[0].admin_port is None:
        return None
    return Peer(f"{cdn[0].name}-purge", cdn[0].host, cdn[0].admin_port)


def _media_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """A media origin, or the CDN edge (photostack, or nginx from ``[cdn] engine``)."""
    topo = lay.topology
    origins = [vars(Peer(n.name, n.host, n.port)) for n in lay.by_role(Role.MEDIA)]
    if node.role is Role.CDN and topo.cdn_engine == "nginx":
        from photostack.cluster.engines.nginx_cdn import NginxCdnConfig, NginxCdnEngine

        return NginxCdnEngine(
            NginxCdnConfig(
                name=node.name,
                host=node.host,
                port=node.port,
                purge_port=node.admin_port,
                origins=tuple((str(o["name"]), str(o["host"]), int(o["port"])) for o in origins),
                prefix=data.root / "nginx" / node.name,
                log_path=data.log_path(node.name),
                cache_bytes=topo.cdn_cache_bytes,
                max_entry_bytes=topo.cdn_max_entry_bytes,
            )
        )
    settings: dict[str, object]
    if node.role is Role.MEDIA:
        settings = {
            "root": str(data.root / "media" / node.name),
            "max_object_bytes": topo.media_max_object_bytes,
        }
    else:
        settings = {
            "origins": origins,
            "purge_port": node.admin_port,
            "cache_bytes": topo.cdn_cache_bytes,
            "max_entry_bytes": topo.cdn_max_entry_bytes,
            "max_object_bytes": topo.media_max_object_bytes,
            "disk_root": str(data.root / "cdn" / node.name) if topo.cdn_disk_cache_bytes else None,
            "disk_cache_bytes": topo.cdn_disk_cache_bytes,
            "disk_max_entry_bytes": topo.cdn_disk_max_entry_bytes,
        }
    return PhotostackNodeEngine(_node_config(node, data, settings))


class WorkerEngine(PhotostackNodeEngine):
    """``python -m photostack.blocks.queue.worker`` running the uploads' task registry; its
    collaborators (app nodes, media) in a JSON file named by PHOTOSTACK_TASKS_SETTINGS."""

    def __init__(self, config: NodeProcessConfig, argv: list[str]) -> None:
        super().__init__(config)
        self.argv = argv

    def process_spec(self) -> ProcessSpec:
        from photostack.service.tasks import SETTINGS_ENV

        return ProcessSpec(
            argv=self.argv,
            cwd=self.config.spec_path.parent,
            env={"PYTHONUNBUFFERED": "1", SETTINGS_ENV: str(self.config.spec_path)},
            stop_timeout_s=15.0,
        )


def _worker_engine(lay: Layout, node: NodeSpec, data: DataDir, apps: list[Peer]) -> Engine:
    import sys

    topo = lay.topology
    argv = [
        sys.executable, "-m", "photostack.blocks.queue.worker",
        "--dsn", queue_dsn(lay), "--queue", QUEUE_NAME,
        "--tasks", "photostack.service.tasks:registry",
        "--concurrency", str(topo.worker_concurrency),
        "--visibility-timeout-s", str(topo.worker_visibility_timeout_s),
        "--max-length", str(topo.queue_max_length),
        "--host", node.host, "--port", str(node.port), "--worker-id", node.name,
    ]  # fmt: skip
    settings = {
        "app_nodes": [vars(p) for p in apps],
        "media": _media_settings(lay),
        "balancing": topo.web_balancing,
    }
    return WorkerEngine(
        _node_config(node, data, settings),
        argv,
    )


def _as_dict(settings: WebSettings | AppSettings) -> dict[str, object]:
    import json

    loaded: dict[str, object] = json.loads(settings.to_json())
    return loaded


def _node_config(
    node: NodeSpec, data: DataDir, settings: Mapping[str, object]
) -> NodeProcessConfig:
    """How one of our Python nodes is started: its spec file under run/, its log under logs/."""
    return NodeProcessConfig(
        name=node.name,
        role=node.role.value,
        host=node.host,
        port=node.port,
        spec_path=data.run / f"{node.name}.json",
        log_path=data.log_path(node.name),
        settings=dict(settings),
    )
