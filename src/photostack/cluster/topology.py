"""The cluster's shape: one TOML file names every role, its count and its storage groups.

`load_topology` turns the file into frozen values and refuses anything it does not understand
(an unknown key is a typo until proven otherwise); `layout` turns a topology and a port base into
the concrete list of nodes with names and ports. Both are pure: no sockets, no processes.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from photostack.blocks.balancer import SETTINGS_KEYS, BalancerConfigError, parse_settings
from photostack.blocks.cache import PolicyName, UnknownPolicyError, parse_policy_name

__all__ = [
    "CACHE_ENGINES",
    "CDN_ENGINES",
    "CHAOS_LINK_KINDS",
    "CONTROL_PORT_OFFSET",
    "DIRECTORY_GROUP",
    "EDGE_ENGINES",
    "INTERNAL_PORT_OFFSET",
    "PRODUCT_GROUPS",
    "QUEUE_GROUP",
    "STATIC_PORT_OFFSET",
    "TLS_PORT_OFFSET",
    "ChaosLinkSpec",
    "Layout",
    "NodeSpec",
    "Role",
    "StorageGroup",
    "Topology",
    "TopologyError",
    "bundled_topology",
    "layout",
    "load_topology",
    "parse_topology",
]

STATIC_PORT_OFFSET = 1
CONTROL_PORT_OFFSET = 10
TLS_PORT_OFFSET = 3  # edge-1's https port, when [edge.proxy] tls = true
EDGE_ENGINES = ("photostack", "nginx")
INTERNAL_PORT_OFFSET = 20
# The product's vertical split: the service needs exactly these storage groups.
PRODUCT_GROUPS = ("users", "social", "photos")
DIRECTORY_GROUP = "directory"  # the directory service's own storage group
QUEUE_GROUP = "queue"  # the task queue's own database (docs/uploads.md)
_MAX_COUNT = 16
_MAX_SHARDS = 16
_MAX_REPLICAS = 4
_MAX_CACHE_BYTES = 1 << 40
CACHE_ENGINES = ("redis", "photostack")


class TopologyError(Exception):
    """The topology file is missing, unreadable or describes an impossible cluster."""


class Role(StrEnum):
    EDGE = "edge"
    WEB = "web"
    APP = "app"
    CACHE = "cache"
    STORAGE = "storage"
    DIRECTORY = "directory"
    WORKER = "worker"
    CHAOS = "chaos"  # the TCP chaos proxy of drill topologies ([chaos]; docs/chaos.md)
    MEDIA = "media"  # content-addressed media origins ([media]; docs/media.md)
    CDN = "cdn"  # the static host: caching proxy in front of the origins ([cdn]; docs/media.md)


@dataclass(frozen=True)
class StorageGroup:
    name: str
    shards: int
    replicas: int
    # Replication and the CAP choice (docs/replication.md): async | sync | remote_apply;
    # cp | ap; replicas serve reads while their lag is within max_replica_lag_s (0: never).
    replication: str = "async"
    consistency: str = "cp"
    max_replica_lag_s: float = 0.0


@dataclass(frozen=True)
class Topology:
    name: str
    host: str
    edge_count: int
    web_count: int
    app_count: int
    cache_count: int
    cache_engine: str
    storage: tuple[StorageGroup, ...]
    cache_policy: PolicyName | None = None  # None: the engine's default
    cache_maxmemory_bytes: int | None = None  # None: unbounded
    # Balancing settings (docs/balancing.md): [edge] for edge -> web, [web] for web -> app.
    edge_balancing: dict[str, Any] = field(default_factory=dict)
    web_balancing: dict[str, Any] = field(default_factory=dict)
    # The edge's engine and its proxy features ([edge] engine, [edge.proxy]; docs/proxy.md).
    edge_engine: str = "photostack"
    edge_proxy: dict[str, Any] = field(default_factory=dict)
    # The directory service ([directory]; docs/directory.md): its nodes, and its own storage
    # group (one shard, a primary and ``directory_replicas`` streaming replicas).
    directory_count: int = 2
    directory_replicas: int = 1
    # The app nodes' cached reads ([cache] product keys; docs/caching.md), validated.
    caching: dict[str, Any] = field(default_factory=dict)
    # Uploads (docs/uploads.md): [workers] supervised queue workers, [queue] the queue's own
    # storage group (one shard: a primary and ``queue_replicas`` replicas), [feed] fan-out.
    worker_count: int = 2
    worker_concurrency: int = 4
    worker_visibility_timeout_s: float = 30.0
    queue_replicas: int = 1
    queue_max_length: int = 100_000
    feed_fanout_limit: int = 1000
    # Fault injection ([chaos]; docs/chaos.md): the link kinds a chaos proxy node sits on.
    chaos_links: tuple[str, ...] = ()
    # Media (docs/media.md): [media] origins, every upload written to all of them; [cdn] the
    # static host's caching proxy (engine photostack or nginx), its cache bounded in bytes.
    media_count: int = 2
    media_max_object_bytes: int = 64 * 1024 * 1024
    cdn_engine: str = "photostack"
    cdn_cache_bytes: int = 256 * 1024 * 1024
    cdn_max_entry_bytes: int = 16 * 1024 * 1024
    cdn_disk_cache_bytes: int = 1024 * 1024 * 1024  # the photostack CDN's disk tier; 0: none
    cdn_disk_max_entry_bytes: int = 64 * 1024 * 1024

    @property
    def queue_storage(self) -> StorageGroup:
        return StorageGroup(QUEUE_GROUP, 1, self.queue_replicas)

    @property
    def directory_storage(self) -> StorageGroup:
        return StorageGroup(DIRECTORY_GROUP, 1, self.directory_replicas)

    def group(self, name: str) -> StorageGroup:
        for group in self.storage:
            if group.name == name:
                return group
        raise KeyError(name)


@dataclass(frozen=True)
class NodeSpec:
    """One node of a laid-out cluster.

    Storage nodes carry their group and 1-based shard; a replica names the primary it streams from.
    """

    name: str
    role: Role
    host: str
    port: int
    group: str | None = None
    shard: int | None = None
    replica_of: str | None = None
    admin_port: int | None = None  # a second, internal listener (the CDN's purge port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_primary(self) -> bool:
        return self.role is Role.STORAGE and self.replica_of is None


@dataclass(frozen=True)
class ChaosLinkSpec:
    """A link through the chaos node: consumers of ``kind`` reach ``upstream`` on ``port``.

    ``consumer`` names the one node using the link when it is not a whole tier (a replica's
    replication link); empty otherwise.
    """

    name: str
    kind: str
    port: int
    upstream: str
    consumer: str = ""


@dataclass(frozen=True)
class Layout:
    """A topology placed on ports: public ports at the base, internal ones above it."""

    topology: Topology
    port_base: int
    nodes: tuple[NodeSpec, ...]
    links: tuple[ChaosLinkSpec, ...] = ()  # [chaos]: links through the chaos node

    def reach(self, node: NodeSpec, via: str, consumer: str = "") -> tuple[str, int]:
        """The address a consumer of link kind ``via`` uses for ``node``: the chaos node's
        port for it when such a link exists, else the node's own address."""
        for link in self.links:
            ours = link.consumer in ("", consumer)
            if link.kind == via and link.upstream == node.name and ours:
                return node.host, link.port
        return node.host, node.port

    @property
    def api_port(self) -> int:
        return self.port_base

    @property
    def static_port(self) -> int:
        return self.port_base + STATIC_PORT_OFFSET

    @property
    def control_port(self) -> int:
        return self.port_base + CONTROL_PORT_OFFSET

    @property
    def tls_port(self) -> int:
        return self.port_base + TLS_PORT_OFFSET

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def by_role(self, role: Role) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.role is role)

    def shard_nodes(self, group: str, shard: int) -> tuple[NodeSpec, tuple[NodeSpec, ...]]:
        """The primary of one shard and its replicas."""
        members = [n for n in self.nodes if n.group == group and n.shard == shard]
        primary = next(n for n in members if n.is_primary)
        return primary, tuple(n for n in members if not n.is_primary)


def load_topology(path: Path | None = None) -> Topology:
    """Read a topology file, or the default one shipped in the package when ``path`` is None."""
    if path is None:
        text = resources.files("photostack.cluster").joinpath("topologies/default.toml").read_text()
        source = "default topology"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from exc
        source = str(path)
    return parse_topology(text, source=source)


def bundled_topology(name: str) -> Path:
    """Path of a topology shipped in the package (``default`` or ``small``)."""
    ref = resources.files("photostack.cluster").joinpath(f"topologies/{name}.toml")
    return Path(str(ref))


def parse_topology(text: str, *, source: str = "topology") -> Topology:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: not valid TOML: {exc}") from exc
    _only(
        raw,
        {"cluster", "edge", "web", "app", "cache", "storage", "directory", *_UPLOAD_TABLES}
        | {"chaos", "media", "cdn"},
        source,
    )
    uploads = _uploads(raw, source)
    directory = _table(raw, "directory", source)
    _only(directory, {"count", "replicas"}, f"{source} [directory]")
    directory_count = _int(directory, "count", 2, f"{source} [directory]", low=1, high=_MAX_COUNT)
    directory_replicas = _int(
        directory, "replicas", 1, f"{source} [directory]", low=0, high=_MAX_REPLICAS
    )
    cluster = _table(raw, "cluster", source)
    _only(cluster, {"name", "host"}, f"{source} [cluster]")
    name = _str(cluster, "name", "photostack", f"{source} [cluster]")
    host = _str(cluster, "host", "127.0.0.1", f"{source} [cluster]")

    counts: dict[str, int] = {}
    balancing: dict[str, dict[str, Any]] = {}
    for role in ("edge", "web", "app"):
        table = _table(raw, role, source)
        where = f"{source} [{role}]"
        if role == "app":
            _only(table, {"count"}, where)
        elif role == "edge":
            _only(table, {"count", "engine", "proxy", *SETTINGS_KEYS}, where)
            edge_engine, edge_proxy = _edge_proxy(table, where)
            rest = {k: v for k, v in table.items() if k not in ("engine", "proxy")}
            balancing[role] = _balancing(rest, where)
        else:
            _only(table, {"count", *SETTINGS_KEYS}, where)
            balancing[role] = _balancing(table, where)
        counts[role] = _int(table, "count", 1, where, low=1, high=_MAX_COUNT)
    cache = _table(raw, "cache", source)
    _only(
        cache,
        {"count", "engine", "policy", "maxmemory_bytes", *_CACHING_KEYS},
        f"{source} [cache]",
    )
    caching = _caching(cache, f"{source} [cache]")
    cache_count = _int(cache, "count", 1, f"{source} [cache]", low=1, high=_MAX_COUNT)
    cache_engine = _str(cache, "engine", "redis", f"{source} [cache]")
    if cache_engine not in CACHE_ENGINES:
        raise TopologyError(
            f"{source} [cache]: engine must be 'redis' or 'photostack', not {cache_engine!r}"
        )
    cache_policy, cache_maxmemory_bytes = _cache_bounds(cache, cache_engine, f"{source} [cache]")

    storage_raw = _table(raw, "storage", source)
    groups: list[StorageGroup] = []
    for group_name in PRODUCT_GROUPS:
        if group_name not in storage_raw:
            raise TopologyError(
                f"{source}: [storage.{group_name}] is missing (the product needs it)"
            )
    for group_name, value in storage_raw.items():
        where = f"{source} [storage.{group_name}]"
        if group_name not in PRODUCT_GROUPS:
            raise TopologyError(
                f"{where}: unknown storage group (known: {', '.join(PRODUCT_GROUPS)})"
            )
        if not isinstance(value, dict):
            raise TopologyError(f"{where}: must be a table")
        _only(value, {"shards", "replicas", *_REPLICATION_KEYS}, where)
        groups.append(
            StorageGroup(
                name=group_name,
                shards=_int(value, "shards", 1, where, low=1, high=_MAX_SHARDS),
                replicas=_int(value, "replicas", 1, where, low=0, high=_MAX_REPLICAS),
                **_replication(value, where),
            )
        )
    groups.sort(key=lambda g: PRODUCT_GROUPS.index(g.name))
    return Topology(
        name=name,
        host=host,
        edge_count=counts["edge"],
        web_count=counts["web"],
        app_count=counts["app"],
        cache_count=cache_count,
        cache_engine=cache_engine,
        storage=tuple(groups),
        cache_policy=cache_policy,
        cache_maxmemory_bytes=cache_maxmemory_bytes,
        edge_balancing=balancing["edge"],
        web_balancing=balancing["web"],
        edge_engine=edge_engine,
        edge_proxy=edge_proxy,
        directory_count=directory_count,
        directory_replicas=directory_replicas,
        caching=caching,
        **uploads,
        chaos_links=_chaos_links(raw, source),
        **_media_cdn(raw, source),
    )


_UPLOAD_TABLES = ("workers", "queue", "feed")


def _uploads(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``[workers]``, ``[queue]`` and ``[feed]`` (docs/uploads.md), validated."""
    workers = _table(raw, "workers", source)
    where = f"{source} [workers]"
    _only(workers, {"count", "concurrency", "visibility_timeout_s"}, where)
    visibility = workers.get("visibility_timeout_s", 30.0)
    if not isinstance(visibility, int | float) or isinstance(visibility, bool) or not (
        1 <= visibility <= 3600
    ):
        raise TopologyError(f"{where}: visibility_timeout_s must be a number in 1..3600")
    queue = _table(raw, "queue", source)
    _only(queue, {"replicas", "max_length"}, f"{source} [queue]")
    feed = _table(raw, "feed", source)
    _only(feed, {"fanout_limit"}, f"{source} [feed]")
    return {
        "worker_count": _int(workers, "count", 2, where, low=0, high=_MAX_COUNT),
        "worker_concurrency": _int(workers, "concurrency", 4, where, low=1, high=256),
        "worker_visibility_timeout_s": float(visibility),
        "queue_replicas": _int(
            queue, "replicas", 1, f"{source} [queue]", low=0, high=_MAX_REPLICAS
        ),
        "queue_max_length": _int(
            queue, "max_length", 100_000, f"{source} [queue]", low=1, high=100_000_000
        ),
        "feed_fanout_limit": _int(
            feed, "fanout_limit", 1000, f"{source} [feed]", low=0, high=100_000_000
        ),
    }


def _edge_proxy(table: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """``[edge] engine`` and the ``[edge.proxy]`` feature table, validated (docs/proxy.md)."""
    from photostack.blocks.proxy import ProxyConfig, ProxyConfigError, parse_proxy_settings
    from photostack.cluster.engines.nginx import NGINX_STRATEGIES

    engine = _str(table, "engine", "photostack", where)
    if engine not in EDGE_ENGINES:
        raise TopologyError(f"{where}: engine must be one of {', '.join(EDGE_ENGINES)}")
    proxy = table.get("proxy", {})
    if not isinstance(proxy, dict):
        raise TopologyError(f"{where}: [edge.proxy] must be a table")
    for key in ("tls", "access_log"):
        if not isinstance(proxy.get(key, False), bool):
            raise TopologyError(f"{where}: proxy.{key} must be true or false")
    # tls and access_log become a port, a certificate and a file in the data dir at `up`.
    probe = {k: v for k, v in proxy.items() if k not in ("tls", "access_log")}
    try:
        parse_proxy_settings(probe, ProxyConfig(backends=()))
    except ProxyConfigError as exc:
        raise TopologyError(f"{where} proxy: {exc}") from None
    if engine == "nginx" and proxy.get("allow_paths"):
        raise TopologyError(f"{where}: proxy.allow_paths is not rendered for nginx (deny_paths is)")
    strategy = table.get("strategy", "round-robin")
    if engine == "nginx" and strategy not in NGINX_STRATEGIES:
        known = ", ".join(sorted(NGINX_STRATEGIES))
        raise TopologyError(f"{where}: nginx has no {strategy!r} strategy (it has: {known})")
    return engine, dict(proxy)


def _balancing(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The balancing keys of a role's table, validated; active health checks on by default."""
    settings = {"checks": True, **{k: v for k, v in table.items() if k != "count"}}
    try:
        parse_settings(settings)
    except BalancerConfigError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    return settings


def layout(topology: Topology, port_base: int) -> Layout:
    """Name every node and give it a port.

    The first edge listens on the port base (the public API); every internal port lies above
    ``port_base + INTERNAL_PORT_OFFSET``, so two clusters with bases 100 apart never collide.
    """
    highest = port_base + INTERNAL_PORT_OFFSET + _internal_port_count(topology)
    if port_base < 1024 or highest > 65535:
        raise TopologyError(
            f"port base {port_base} puts ports outside 1024-65535 "
            f"(this topology needs ports up to {highest})"
        )
    host = topology.host
    nodes: list[NodeSpec] = [NodeSpec("edge-1", Role.EDGE, host, port_base)]
    next_port = port_base + INTERNAL_PORT_OFFSET

    def take() -> int:
        nonlocal next_port
        port = next_port
        next_port += 1
        return port

    nodes += [
        NodeSpec(f"edge-{i}", Role.EDGE, host, take()) for i in range(2, topology.edge_count + 1)
    ]
    nodes += [
        NodeSpec(f"web-{i}", Role.WEB, host, take()) for i in range(1, topology.web_count + 1)
    ]
    nodes += [
        NodeSpec(f"app-{i}", Role.APP, host, take()) for i in range(1, topology.app_count + 1)
    ]
    nodes += [
        NodeSpec(f"cache-{i}", Role.CACHE, host, take()) for i in range(1, topology.cache_count + 1)
    ]
    for group in topology.storage:
        for shard in range(1, group.shards + 1):
            primary = f"{group.name}-{shard}-primary"
            nodes.append(NodeSpec(primary, Role.STORAGE, host, take(), group.name, shard))
            nodes += [
                NodeSpec(
                    f"{group.name}-{shard}-replica-{r}",
                    Role.STORAGE,
                    host,
                    take(),
                    group.name,
                    shard,
                    replica_of=primary,
                )
                for r in range(1, group.replicas + 1)
            ]
    # The directory last, so adding it kept every other node's port (replicas of an existing
    # data dir stream from the ports recorded at their base backup).
    directory_primary = f"{DIRECTORY_GROUP}-1-primary"
    nodes.append(NodeSpec(directory_primary, Role.STORAGE, host, take(), DIRECTORY_GROUP, 1))
    nodes += [
        NodeSpec(
            f"{DIRECTORY_GROUP}-1-replica-{r}",
            Role.STORAGE,
            host,
            take(),
            DIRECTORY_GROUP,
            1,
            replica_of=directory_primary,
        )
        for r in range(1, topology.directory_replicas + 1)
    ]
    nodes += [
        NodeSpec(f"directory-{i}", Role.DIRECTORY, host, take())
        for i in range(1, topology.directory_count + 1)
    ]
    # The queue's database and the workers after everything else, for the same reason.
    queue_primary = f"{QUEUE_GROUP}-1-primary"
    nodes.append(NodeSpec(queue_primary, Role.STORAGE, host, take(), QUEUE_GROUP, 1))
    nodes += [
        NodeSpec(
            f"{QUEUE_GROUP}-1-replica-{r}",
            Role.STORAGE,
            host,
            take(),
            QUEUE_GROUP,
            1,
            replica_of=queue_primary,
        )
        for r in range(1, topology.queue_replicas + 1)
    ]
    nodes += [
        NodeSpec(f"worker-{i}", Role.WORKER, host, take())
        for i in range(1, topology.worker_count + 1)
    ]
    # Media origins, then the CDN on the static port with its internal purge listener.
    nodes += [
        NodeSpec(f"media-{i}", Role.MEDIA, host, take()) for i in range(1, topology.media_count + 1)
    ]
    nodes.append(
        NodeSpec("cdn-1", Role.CDN, host, port_base + STATIC_PORT_OFFSET, admin_port=take())
    )
    links: list[ChaosLinkSpec] = []
    if topology.chaos_links:  # last: adding [chaos] keeps every other node's port
        nodes.append(NodeSpec("chaos-1", Role.CHAOS, host, take()))
        links = [
            ChaosLinkSpec(f"{kind}.{consumer or upstream}", kind, take(), upstream, consumer)
            for kind, upstream, consumer in _chaos_link_ends(topology.chaos_links, nodes)
        ]
    return Layout(topology=topology, port_base=port_base, nodes=tuple(nodes), links=tuple(links))


def _internal_port_count(topology: Topology) -> int:
    storage = sum(g.shards * (1 + g.replicas) for g in topology.storage)
    return (
        topology.edge_count
        - 1
        + topology.web_count
        + topology.app_count
        + topology.cache_count
        + storage
        + 1
        + topology.directory_replicas
        + topology.directory_count
        + 1
        + topology.queue_replicas
        + topology.worker_count
        + topology.media_count
        + 1  # the CDN's purge listener
        + _chaos_port_count(topology)
    )


# [chaos] links (docs/chaos.md): which consumers reach which nodes through the chaos node.
CHAOS_LINK_KINDS = {
    "storage": "app nodes -> every product storage node (primaries and replicas)",
    "replication": "each product replica -> its primary (streaming and base backup)",
    "web-app": "web nodes -> each app node",
    "app-cache": "app nodes -> each cache node",
}


def _chaos_links(raw: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """``[chaos] links = [...]`` (kinds of CHAOS_LINK_KINDS) unless ``enabled = false``."""
    chaos = _table(raw, "chaos", source)
    where = f"{source} [chaos]"
    _only(chaos, {"enabled", "links"}, where)
    enabled = chaos.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TopologyError(f"{where}: enabled must be true or false")
    kinds = chaos.get("links", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise TopologyError(f"{where}: links must be a list of link kinds")
    for kind in kinds:
        if kind not in CHAOS_LINK_KINDS:
            known = ", ".join(CHAOS_LINK_KINDS)
            raise TopologyError(f"{where}: unknown link kind {kind!r} (known: {known})")
    return tuple(dict.fromkeys(kinds)) if enabled else ()


def _chaos_link_ends(kinds: tuple[str, ...], nodes: list[NodeSpec]) -> list[tuple[str, str, str]]:
    """(kind, upstream node, consumer node or "") of every link the kinds put on the layout.

    A replica's link is named after the replica (several replicas share one primary)."""
    product = [n for n in nodes if n.role is Role.STORAGE and n.group in PRODUCT_GROUPS]
    ends: list[tuple[str, str, str]] = []
    for kind in kinds:
        if kind == "storage":
            ends += [(kind, n.name, "") for n in product]
        elif kind == "replication":
            ends += [(kind, n.replica_of, n.name) for n in product if n.replica_of is not None]
        elif kind == "web-app":
            ends += [(kind, n.name, "") for n in nodes if n.role is Role.APP]
        elif kind == "app-cache":
            ends += [(kind, n.name, "") for n in nodes if n.role is Role.CACHE]
    return ends


def _chaos_port_count(topology: Topology) -> int:
    if not topology.chaos_links:
        return 0
    count = 1  # the chaos node's own admin port
    storage = [(g.shards, g.replicas) for g in topology.storage]
    for kind in topology.chaos_links:
        if kind == "storage":
            count += sum(shards * (1 + replicas) for shards, replicas in storage)
        elif kind == "replication":
            count += sum(shards * replicas for shards, replicas in storage)
        elif kind == "web-app":
            count += topology.app_count
        elif kind == "app-cache":
            count += topology.cache_count
    return count


_CACHING_KEYS = (
    "enabled",
    "local_policy",
    "local_max_entries",
    "failure_mode",
    "node_failure_modes",
    "redelete_after_s",
    "types",
)


def _caching(cache: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The product caching keys of ``[cache]``, validated by the app's own parser."""
    from photostack.service._caching import CachingConfig

    raw = {k: v for k, v in cache.items() if k in _CACHING_KEYS}
    try:
        CachingConfig.from_dict(raw)
    except ValueError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    return raw


def _cache_bounds(
    cache: Mapping[str, Any], engine: str, where: str
) -> tuple[PolicyName | None, int | None]:
    """``policy`` and ``maxmemory_bytes`` of ``[cache]``; a policy Redis lacks needs our node."""
    policy = None
    if "policy" in cache:
        try:
            policy = parse_policy_name(_str(cache, "policy", "", where))
        except UnknownPolicyError as exc:
            raise TopologyError(f"{where}: {exc}") from exc
        if engine == "redis" and not policy.redis_supports:
            raise TopologyError(
                f"{where}: policy {policy.short!r} needs engine = 'photostack' (Redis lacks it)"
            )
    memory = None
    if "maxmemory_bytes" in cache:
        memory = _int(cache, "maxmemory_bytes", 0, where, low=1, high=_MAX_CACHE_BYTES)
    return policy, memory


_REPLICATION_KEYS = ("replication", "consistency", "max_replica_lag_s")
CDN_ENGINES = ("photostack", "nginx")
_MAX_MEDIA_BYTES = 1 << 34


def _media_cdn(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``[media]`` and ``[cdn]`` (docs/media.md), validated."""
    media = _table(raw, "media", source)
    where = f"{source} [media]"
    _only(media, {"count", "max_object_bytes"}, where)
    cdn = _table(raw, "cdn", source)
    cdn_where = f"{source} [cdn]"
    _only(
        cdn,
        {"count", "engine", "cache_bytes", "max_entry_bytes", "disk_cache_bytes",
         "disk_max_entry_bytes"},
        cdn_where,
    )  # fmt: skip
    _int(cdn, "count", 1, cdn_where, low=1, high=1)  # one static host
    engine = _str(cdn, "engine", "photostack", cdn_where)
    if engine not in CDN_ENGINES:
        raise TopologyError(f"{cdn_where}: engine must be one of {', '.join(CDN_ENGINES)}")
    cache_bytes = _int(
        cdn, "cache_bytes", 256 * 1024 * 1024, cdn_where, low=1 << 20, high=_MAX_CACHE_BYTES
    )
    default_entry = min(16 * 1024 * 1024, cache_bytes)
    max_entry = _int(cdn, "max_entry_bytes", default_entry, cdn_where, low=1024, high=cache_bytes)
    disk_bytes = _int(
        cdn, "disk_cache_bytes", 1024 * 1024 * 1024, cdn_where, low=0, high=_MAX_CACHE_BYTES
    )
    disk_entry = _int(
        cdn, "disk_max_entry_bytes", min(64 * 1024 * 1024, max(disk_bytes, 1024)), cdn_where,
        low=1024, high=max(disk_bytes, 1024),
    )  # fmt: skip
    return {
        "media_count": _int(media, "count", 2, where, low=1, high=_MAX_COUNT),
        "media_max_object_bytes": _int(
            media, "max_object_bytes", 64 * 1024 * 1024, where, low=1024, high=_MAX_MEDIA_BYTES
        ),
        "cdn_engine": engine,
        "cdn_cache_bytes": cache_bytes,
        "cdn_max_entry_bytes": max_entry,
        "cdn_disk_cache_bytes": disk_bytes,
        "cdn_disk_max_entry_bytes": disk_entry,
    }


def _replication(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``replication``, ``consistency`` and ``max_replica_lag_s`` of a storage group."""
    mode = _str(value, "replication", "async", where)
    if mode not in ("async", "sync", "remote_apply"):
        raise TopologyError(f"{where}: replication must be async, sync or remote_apply")
    if mode != "async" and value.get("replicas", 1) == 0:
        raise TopologyError(f"{where}: replication = {mode!r} needs replicas >= 1")
    consistency = _str(value, "consistency", "cp", where)
    if consistency not in ("cp", "ap"):
        raise TopologyError(f"{where}: consistency must be cp or ap")
    lag = value.get("max_replica_lag_s", 0.0)
    if not isinstance(lag, int | float) or isinstance(lag, bool) or not 0 <= lag <= 3600:
        raise TopologyError(f"{where}: max_replica_lag_s must be a number in 0..3600")
    return {"replication": mode, "consistency": consistency, "max_replica_lag_s": float(lag)}


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TopologyError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: [{key}] must be a table")
    return value


def _int(
    table: Mapping[str, Any], key: str, default: int, where: str, *, low: int, high: int
) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"{where}: {key} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise TopologyError(f"{where}: {key} = {value} is outside {low}..{high}")
    return value


def _str(table: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise TopologyError(f"{where}: {key} must be a non-empty string")
    return value
