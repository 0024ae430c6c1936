from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.cluster.topology import (
    INTERNAL_PORT_OFFSET,
    Role,
    TopologyError,
    bundled_topology,
    layout,
    load_topology,
    parse_topology,
)

MINIMAL = """
[storage.users]
[storage.social]
[storage.photos]
"""


def test_default_topology_is_the_documented_cluster() -> None:
    lay = layout(load_topology(), 8080)
    names = [n.name for n in lay.nodes]
    assert names[:8] == [
        "edge-1",
        "web-1",
        "web-2",
        "app-1",
        "app-2",
        "cache-1",
        "cache-2",
        "cache-3",
    ]
    assert lay.node("edge-1").port == 8080
    assert (lay.static_port, lay.control_port) == (8081, 8090)
    storage = [n for n in lay.nodes if n.role is Role.STORAGE]
    # users 1 shard, social 2, photos 2, directory 1, queue 1; each a primary plus one replica
    assert len(storage) == 14
    assert [n.name for n in lay.by_role(Role.WORKER)] == ["worker-1", "worker-2"]
    assert [n.name for n in lay.by_role(Role.DIRECTORY)] == ["directory-1", "directory-2"]
    primary, replicas = lay.shard_nodes("social", 2)
    assert primary.name == "social-2-primary"
    assert [r.name for r in replicas] == ["social-2-replica-1"]
    assert replicas[0].replica_of == "social-2-primary"


def test_small_topology_loads_from_the_package() -> None:
    topo = load_topology(bundled_topology("small"))
    assert (topo.web_count, topo.app_count) == (1, 2)


def test_every_internal_port_lies_above_the_public_ones_and_is_unique() -> None:
    lay = layout(load_topology(), 9000)
    public = {"edge-1": 9000, "cdn-1": 9001}  # the api and the static host
    assert {n.name: n.port for n in lay.nodes if n.name in public} == public
    internal = [n.port for n in lay.nodes if n.name not in public]
    internal += [n.admin_port for n in lay.nodes if n.admin_port is not None]
    assert min(internal) >= 9000 + INTERNAL_PORT_OFFSET
    assert len(set(internal)) == len(internal)


@given(base=st.integers(1024, 60000))
def test_two_port_bases_100_apart_never_collide(base: int) -> None:
    topo = load_topology()
    a = {n.port for n in layout(topo, base).nodes} | {base + 1, base + 10}
    b = {n.port for n in layout(topo, base + 100).nodes} | {base + 101, base + 110}
    assert not a & b


def test_defaults_fill_a_minimal_file() -> None:
    topo = parse_topology(MINIMAL)
    assert (topo.edge_count, topo.web_count, topo.app_count, topo.cache_count) == (1, 1, 1, 1)
    assert topo.group("photos").replicas == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[web]\ncount = 0\n" + MINIMAL, "count = 0 is outside 1..16"),
        ("[web]\ncont = 2\n" + MINIMAL, "unknown key 'cont'"),
        ("[web]\ncount = 'two'\n" + MINIMAL, "count must be an integer"),
        ("[storage.users]\n[storage.social]\n", "[storage.photos] is missing"),
        (MINIMAL + "[storage.videos]\n", "unknown storage group"),
        ("[cache]\nengine = 'memcached'\n" + MINIMAL, "engine must be 'redis'"),
        ("[web\n", "not valid TOML"),
        (MINIMAL.replace("[storage.users]", "[storage.users]\nshards = 99"), "shards = 99"),
    ],
)
def test_bad_topologies_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(TopologyError, match=None) as info:
        parse_topology(text)
    assert reason in str(info.value)


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "nope.toml")


def test_a_port_base_that_overflows_is_refused() -> None:
    with pytest.raises(TopologyError, match="outside 1024-65535"):
        layout(load_topology(), 65500)
