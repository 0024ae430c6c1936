"""``[chaos]`` in a topology: validated, laid out on free ports, and consumers pointed at it."""

from __future__ import annotations

import pytest

from photostack.cluster.topology import (
    CHAOS_LINK_KINDS,
    INTERNAL_PORT_OFFSET,
    Role,
    TopologyError,
    layout,
    parse_topology,
)

BASE = """
[web]
count = 2
[app]
count = 2
[cache]
count = 2
[storage.users]
shards = 1
replicas = 1
[storage.social]
shards = 2
replicas = 0
[storage.photos]
shards = 1
replicas = 2
"""


def _with(chaos: str) -> str:
    return BASE + "\n[chaos]\n" + chaos


def test_no_chaos_table_means_no_chaos_node_and_direct_addresses() -> None:
    lay = layout(parse_topology(BASE), 20000)
    assert lay.links == ()
    assert lay.by_role(Role.CHAOS) == ()
    primary = lay.node("users-1-primary")
    assert lay.reach(primary, "storage") == (primary.host, primary.port)


@pytest.mark.parametrize(
    ("chaos", "message"),
    [
        ('links = ["storage", "dns"]', "unknown link kind 'dns'"),
        ('links = "storage"', "links must be a list"),
        ("enabled = 1", "enabled must be true or false"),
        ('links = ["storage"]\ntoxics = []', "unknown key 'toxics'"),
    ],
)
def test_bad_chaos_tables_are_refused(chaos: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(_with(chaos))


def test_enabled_false_keeps_the_list_but_places_nothing() -> None:
    assert parse_topology(_with('enabled = false\nlinks = ["storage"]')).chaos_links == ()


def test_every_kind_gets_its_links_on_distinct_free_ports() -> None:
    topo = parse_topology(_with(f"links = {list(CHAOS_LINK_KINDS)!r}".replace("'", '"')))
    lay = layout(topo, 20000)
    (chaos,) = lay.by_role(Role.CHAOS)
    names = {link.name for link in lay.links}
    storage_nodes = [n for n in lay.nodes if n.role is Role.STORAGE and n.group != "directory"]
    product = [n for n in storage_nodes if n.group in ("users", "social", "photos")]
    replicas = [n for n in product if n.replica_of]
    assert {f"storage.{n.name}" for n in product} <= names
    assert {f"replication.{n.name}" for n in replicas} <= names
    assert {"web-app.app-1", "web-app.app-2", "app-cache.cache-1", "app-cache.cache-2"} <= names
    assert len(names) == len(product) + len(replicas) + 2 + 2
    ports = [n.port for n in lay.nodes] + [link.port for link in lay.links]
    assert len(ports) == len(set(ports))
    assert min(link.port for link in lay.links) > chaos.port > 20000 + INTERNAL_PORT_OFFSET


def test_consumers_reach_upstreams_through_their_links() -> None:
    lay = layout(parse_topology(_with('links = ["storage", "replication", "web-app"]')), 20000)
    primary = lay.node("photos-1-primary")
    replica = lay.node("photos-1-replica-2")
    storage_link = next(link for link in lay.links if link.name == "storage.photos-1-primary")
    assert lay.reach(primary, "storage") == (primary.host, storage_link.port)
    # each replica streams through its own link; another consumer does not match it
    own = next(link for link in lay.links if link.name == "replication.photos-1-replica-2")
    assert lay.reach(primary, "replication", replica.name) == (primary.host, own.port)
    assert lay.reach(primary, "replication", "nobody") == (primary.host, primary.port)
    cache = lay.node("cache-1")
    assert lay.reach(cache, "app-cache") == (cache.host, cache.port)  # not asked for


def test_adding_chaos_keeps_every_other_nodes_port() -> None:
    plain = layout(parse_topology(BASE), 20000)
    chaotic = layout(parse_topology(_with('links = ["storage"]')), 20000)
    assert chaotic.nodes[: len(plain.nodes)] == plain.nodes


def test_the_port_range_check_counts_the_chaos_ports() -> None:
    topo = parse_topology(_with(f"links = {list(CHAOS_LINK_KINDS)!r}".replace("'", '"')))
    lay = layout(topo, 20000)
    highest = max([n.port for n in lay.nodes] + [link.port for link in lay.links])
    over = 65535 - (highest - 20000) + 1  # its last chaos link would need port 65536
    with pytest.raises(TopologyError, match="outside 1024-65535"):
        layout(topo, over)
    layout(topo, over - 10)
