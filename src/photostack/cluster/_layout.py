"""`layout`: a topology placed on ports, every node named (pure: no sockets, no processes)."""

from __future__ import annotations

from photostack.cluster._topology_model import (
    DIRECTORY_GROUP,
    INTERNAL_PORT_OFFSET,
    PRODUCT_GROUPS,
    QUEUE_GROUP,
    STATIC_PORT_OFFSET,
    ChaosLinkSpec,
    Layout,
    NodeSpec,
    Role,
    Topology,
    TopologyError,
)

__all__ = ["layout"]


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
