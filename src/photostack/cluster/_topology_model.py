"""The topology's data model: roles, storage groups, the parsed topology and its laid-out nodes.

Frozen values only; `photostack.cluster.topology` is the public face (parsing lives in
`_topology_parse`, port layout in `_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from photostack.blocks.cache import PolicyName

__all__ = [
    "CACHE_ENGINES",
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
