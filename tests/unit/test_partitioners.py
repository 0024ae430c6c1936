"""Every partitioner: the shared contract, then each one's own behaviour and trade-off."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.ring import load_skew
from photostack.blocks.storage import (
    CompositePartitioner,
    ConsistentHashPartitioner,
    DirectoryPartitioner,
    HashModPartitioner,
    InMemoryDirectory,
    ListPartitioner,
    Partitioner,
    RangePartitioner,
    RoundRobinPartitioner,
    ShardMap,
    ShardRouter,
    StaleShardMapError,
    StorageError,
    UnroutableKeyError,
    logical_name,
    range_stats,
    split_on,
    split_points_for,
)

USERS = [f"user-{i:06d}" for i in range(12_000)]


def _all_kinds() -> list[tuple[Partitioner, list[str]]]:
    """Each partitioner with keys it can route."""
    directory = InMemoryDirectory(ShardMap(1, {logical_name(i): i % 3 for i in range(64)}, 3))
    rr = RoundRobinPartitioner(3)
    return [
        (HashModPartitioner(3), USERS[:300]),
        (ConsistentHashPartitioner(3, vnodes=64), USERS[:300]),
        (RangePartitioner(["user-004000", "user-008000"]), USERS[::40]),
        (ListPartitioner({"eu": 0, "us": 1}, 3, default=2), ["eu", "us", "ap"]),
        (rr, [rr.key_for(i) for i in range(300)]),
        (
            CompositePartitioner(
                ListPartitioner({"eu": 0, "us": 1}, 2),
                [HashModPartitioner(1), HashModPartitioner(2)],
            ),
            [f"{r}:{u}" for r in ("eu", "us") for u in USERS[:100]],
        ),
        (DirectoryPartitioner(directory.load, logical=HashModPartitioner(64)), USERS[:300]),
    ]


@pytest.mark.parametrize(("p", "keys"), _all_kinds(), ids=lambda v: type(v).__name__)
def test_contract(p: Partitioner, keys: list[str]) -> None:
    assert isinstance(p, Partitioner)
    shards = [p.shard_for(k) for k in keys]
    assert all(0 <= s < p.shard_count for s in shards)
    assert shards == [p.shard_for(k.encode()) for k in keys]  # bytes and text agree
    assert len(set(shards)) > 1  # these keys use more than one shard
    assert repr(p).startswith(type(p).__name__)
    router: ShardRouter[str] = ShardRouter(
        {"g": [f"s{i}" for i in range(p.shard_count)]}, partitioner_factory=lambda n: p
    )
    assert router.shard_for("g", keys[0]) == f"s{shards[0]}"


# -- consistent hash ---------------------------------------------------------------------------


def test_consistent_grow_moves_about_one_over_n_plus_one() -> None:
    p = ConsistentHashPartitioner(4)
    bigger, moved = p.grow()
    assert (p.shard_count, bigger.shard_count) == (4, 5)
    changed = [k for k in USERS if p.shard_for(k) != bigger.shard_for(k)]
    assert len(changed) / len(USERS) == pytest.approx(1 / 5, rel=0.1)
    for k in changed:
        assert bigger.shard_for(k) == 4
        pos = bigger.position(k)
        assert any(m.start <= pos < m.end and m.to_node == "shard-4" for m in moved)


def test_consistent_weights_and_validation() -> None:
    p = ConsistentHashPartitioner(2, weights=[1.0, 3.0])
    counts = collections.Counter(p.shard_for(k) for k in USERS)
    assert counts[1] / len(USERS) == pytest.approx(0.75, abs=0.03)
    assert p.ring.nodes == {"shard-0": 1.0, "shard-1": 3.0}
    with pytest.raises(ValueError, match="weights"):
        ConsistentHashPartitioner(2, weights=[1.0])
    with pytest.raises(ValueError, match="shard_count"):
        ConsistentHashPartitioner(0)


def test_consistent_ketama_mode() -> None:
    p = ConsistentHashPartitioner(3, hash="ketama")
    assert p.ring.hash_name == "ketama"
    assert p.ring.point_count == 480


# -- range -------------------------------------------------------------------------------------


def test_range_bounds_split_and_stats() -> None:
    p = RangePartitioner(["g", "p"])
    assert [p.shard_for(k) for k in ("a", "g", "o", "p", "z")] == [0, 1, 1, 2, 2]
    assert p.bounds(0) == (None, b"g")
    assert p.bounds(2) == (b"p", None)
    with pytest.raises(IndexError):
        p.bounds(3)
    q = p.split(1, "k")
    assert q.split_points == (b"g", b"k", b"p")
    with pytest.raises(ValueError, match="inside"):
        p.split(1, "z")
    with pytest.raises(ValueError, match="increasing"):
        RangePartitioner(["b", "a"])

    stats = range_stats(p, ["a", "b", "h", "q", "r", "s", "t"])
    assert stats.counts == (2, 1, 4)
    assert (stats.hottest, stats.hottest_share) == (2, pytest.approx(4 / 7))
    assert stats.hottest_over_mean == pytest.approx(12 / 7)
    assert stats.skew == pytest.approx(load_skew([2, 1, 4]))
    with pytest.raises(ValueError, match="at least one"):
        range_stats(p, [])


def test_monotonic_keys_make_a_hot_last_range_and_new_splits_fix_it() -> None:
    # ranges set on last month's ids; this month's ids are all larger: one hot shard
    old = [f"2026-01-{i:05d}" for i in range(3000)]
    new = [f"2026-02-{i:05d}" for i in range(3000)]
    p = RangePartitioner(split_points_for(old, 4))
    hot = range_stats(p, new)
    assert hot.counts == (0, 0, 0, 3000)
    assert hot.hottest == 3
    even = range_stats(RangePartitioner(split_points_for(old + new, 4)), old + new)
    assert even.skew < 0.01
    with pytest.raises(ValueError, match="non-empty"):
        split_points_for([], 2)
    assert split_points_for(["a"] * 10, 4) == []  # one value cannot be split


@given(st.lists(st.text(max_size=6), min_size=1, max_size=200), st.integers(1, 8))
def test_split_points_give_valid_partitioners(sample: list[str], n: int) -> None:
    p = RangePartitioner(split_points_for(sample, n))
    assert p.shard_count <= n
    assert all(0 <= p.shard_for(k) < p.shard_count for k in sample)


# -- list, round-robin, composite --------------------------------------------------------------


def test_list_partitioner() -> None:
    p = ListPartitioner({"eu": 0, "us": 1}, 2)
    assert p.shard_for("eu") == 0
    assert p.assignments == {"eu": 0, "us": 1}
    with pytest.raises(UnroutableKeyError):
        p.shard_for("ap")
    assert ListPartitioner({"eu": 0}, 2, default=1).shard_for("ap") == 1
    with pytest.raises(ValueError, match="outside"):
        ListPartitioner({"eu": 2}, 2)
    with pytest.raises(ValueError, match="outside"):
        ListPartitioner({}, 2, default=5)


def test_round_robin_spreads_writes_and_growth_moves_nothing() -> None:
    p = RoundRobinPartitioner(3)
    keys = [p.key_for(i) for i in range(300)]
    assert collections.Counter(p.shard_for(k) for k in keys) == {0: 100, 1: 100, 2: 100}
    assert keys[:4] == ["0.0", "1.1", "2.2", "0.3"]
    grown = RoundRobinPartitioner(4)
    assert [grown.shard_for(k) for k in keys] == [p.shard_for(k) for k in keys]
    for bad in ("user-1", "x.1", "9.1", "", "٣.1"):
        with pytest.raises(UnroutableKeyError):
            p.shard_for(bad)
    with pytest.raises(ValueError, match="sequence"):
        p.assign(-1)


def test_composite_list_then_hash() -> None:
    outer = ListPartitioner({"eu": 0, "us": 1}, 2)
    p = CompositePartitioner(outer, [HashModPartitioner(2), HashModPartitioner(3)])
    assert p.shard_count == 5
    eu = {p.shard_for(f"eu:{u}") for u in USERS[:200]}
    us = {p.shard_for(f"us:{u}") for u in USERS[:200]}
    assert (eu, us) == ({0, 1}, {2, 3, 4})
    assert p.shard_for("us:user-1") == 2 + HashModPartitioner(3).shard_for("user-1")
    assert [p.block_of(s) for s in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(UnroutableKeyError):
        p.shard_for("no-separator")
    with pytest.raises(ValueError, match="inners"):
        CompositePartitioner(outer, [HashModPartitioner(1)])
    slash = CompositePartitioner(outer, [HashModPartitioner(1)] * 2, split_key=split_on("/"))
    assert slash.shard_for(b"us/x") == 1


# -- directory ---------------------------------------------------------------------------------


def test_shard_map_is_immutable_versioned_and_serializable() -> None:
    m = ShardMap(3, {"alice": 0, "bob": 1}, 2)
    with pytest.raises(TypeError):
        m.entries["carol"] = 1  # type: ignore[index]
    n = m.with_changes({"bob": 0, "carol": 2}, shard_count=3)
    assert (n.version, n.shard_count) == (4, 3)
    assert m.moved(n) == {"bob": (1, 0), "carol": (None, 2)}
    assert ShardMap.from_json(n.to_json()) == n
    for bad in ((-1, {}, 1), (0, {"a": 2}, 2), (0, {}, 0)):
        with pytest.raises(ValueError):  # noqa: PT011 - three different messages
            ShardMap(*bad)
    with pytest.raises(ValueError, match="object"):
        ShardMap.from_json({"version": 1, "shard_count": 1, "entries": []})


def test_directory_refreshes_on_miss_and_on_newer_version() -> None:
    store = InMemoryDirectory(ShardMap(1, {"alice": 0}, 2))
    loads = []

    def loader() -> ShardMap:
        loads.append(1)
        return store.load()

    p = DirectoryPartitioner(loader)
    assert (p.shard_for("alice"), p.version, len(loads)) == (0, 1, 1)
    store.publish(store.load().with_changes({"bob": 1}))
    assert p.shard_for("bob") == 1  # a miss reloads once and finds the new entry
    assert (p.version, len(loads)) == (2, 2)
    with pytest.raises(UnroutableKeyError):
        p.shard_for("carol")
    assert len(loads) == 3  # one reload per miss, no loop
    store.publish(store.load().with_changes({"alice": 1}))
    assert p.shard_for("alice") == 0  # cached: the client does not know yet
    assert not p.note_version(2)  # not newer than what it has: no reload
    assert p.note_version(3)  # a storage node says "wrong shard, map v3"
    assert p.shard_for("alice") == 1
    with pytest.raises(StaleShardMapError):
        store.publish(ShardMap(3, {}, 2))
    assert isinstance(StaleShardMapError("x"), StorageError)


def test_directory_with_logical_shards_moves_whole_logical_shards() -> None:
    logical = HashModPartitioner(16)
    v1 = ShardMap(1, {logical_name(i): i % 2 for i in range(16)}, 2)
    store = InMemoryDirectory(v1)
    p = DirectoryPartitioner(store.load, logical=logical)
    before = {k: p.shard_for(k) for k in USERS[:2000]}
    # grow to 3 shards by moving logical shards 0, 5, 10, 15 only
    store.publish(v1.with_changes({logical_name(i): 2 for i in (0, 5, 10, 15)}, shard_count=3))
    assert p.refresh()
    assert not p.refresh()  # same version again: nothing to install
    for k, old in before.items():
        new = p.shard_for(k)
        assert new == old or (new == 2 and logical.shard_for(k) in (0, 5, 10, 15))
    assert p.entry_for("user-1") == logical_name(logical.shard_for("user-1"))
    assert p.shard_count == 3
