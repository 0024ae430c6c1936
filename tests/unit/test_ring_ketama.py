"""The ketama mode maps keys exactly as uhashring 2.5's ketama ring does."""

from __future__ import annotations

import itertools

import pytest
from uhashring import HashRing as UHashRing

from photostack.blocks.ring import HashRing, ketama_key_hash

KEYS = [f"key:{i}" for i in range(3_000)] + [f"photo/{i:08x}" for i in range(2_000)] + ["", "é☃"]

NODE_SETS: list[dict[str, int]] = [
    {"cache-1": 1, "cache-2": 1, "cache-3": 1},
    {f"10.0.0.{i}:11211": 1 for i in range(1, 11)},
    {f"node-{i}": 1 for i in range(50)},
    {"a": 1, "b": 2, "c": 3, "d": 1},  # weighted: uhashring scales digests by w * n / sum(w)
    {"solo": 1},
]


def _ours(nodes: dict[str, int]) -> HashRing:
    return HashRing({n: float(w) for n, w in nodes.items()}, hash="ketama")


@pytest.mark.parametrize("nodes", NODE_SETS, ids=lambda n: f"{len(n)}-nodes")
def test_node_for_equals_uhashring(nodes: dict[str, int]) -> None:
    ours, theirs = _ours(nodes), UHashRing(nodes=nodes, hash_fn="ketama")
    assert ours.point_count == len(theirs.get_points())
    assert [ours.node_for(k) for k in KEYS] == [theirs.get_node(k) for k in KEYS]


@pytest.mark.parametrize("nodes", NODE_SETS[:4], ids=lambda n: f"{len(n)}-nodes")
def test_replica_walk_equals_uhashring(nodes: dict[str, int]) -> None:
    ours, theirs = _ours(nodes), UHashRing(nodes=nodes, hash_fn="ketama")
    for k in KEYS[:500]:
        assert list(ours.walk(k)) == list(theirs.iterate_nodes(k))
        assert ours.nodes_for(k, 2) == list(itertools.islice(theirs.iterate_nodes(k), 2))


def test_add_and_remove_track_uhashring() -> None:
    nodes = {f"node-{i}": 1 for i in range(10)}
    ours, theirs = _ours(nodes), UHashRing(nodes=nodes, hash_fn="ketama")
    ours.add("node-10")
    theirs.add_node("node-10")
    assert [ours.node_for(k) for k in KEYS] == [theirs.get_node(k) for k in KEYS]
    ours.remove("node-3")
    theirs.remove_node("node-3")
    assert [ours.node_for(k) for k in KEYS] == [theirs.get_node(k) for k in KEYS]


def test_key_hash_is_ketamas() -> None:
    theirs = UHashRing(nodes=["a"], hash_fn="ketama")
    for k in KEYS[:100]:
        assert ketama_key_hash(k) == theirs.hashi(k)
    assert ketama_key_hash("alice") == 0xB2E28463
