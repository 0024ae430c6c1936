from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks import storage
from photostack.blocks.storage import (
    HashModPartitioner,
    Partitioner,
    ShardRouter,
    StorageError,
    UnknownGroupError,
    stable_hash64,
)


def test_exports_import() -> None:
    for name in storage.__all__:
        assert getattr(storage, name) is not None


def test_stable_hash_is_pinned() -> None:
    # blake2b-64 of known keys: a change here would silently re-shard every existing cluster
    assert stable_hash64("") == 0xE4A6A0577479B2B4
    assert stable_hash64("alice") == 0x4DEAEC0CCE54DA89
    assert stable_hash64(b"bob") == 0x74F32B2BB966A492
    assert stable_hash64("carol") == stable_hash64(b"carol")


def test_known_assignments_do_not_drift() -> None:
    p = HashModPartitioner(4)
    assert [p.shard_for(k) for k in ("alice", "bob", "carol")] == [
        0x4DEAEC0CCE54DA89 % 4,
        0x74F32B2BB966A492 % 4,
        0xA95D52AF992D6F61 % 4,
    ]


@given(st.text(), st.integers(min_value=1, max_value=64))
def test_shard_index_in_range_and_deterministic(key: str, n: int) -> None:
    p = HashModPartitioner(n)
    index = p.shard_for(key)
    assert 0 <= index < n
    assert index == HashModPartitioner(n).shard_for(key)


@given(st.binary(max_size=64))
def test_hash_is_64_bit(key: bytes) -> None:
    assert 0 <= stable_hash64(key) < 2**64


def test_distribution_is_even() -> None:
    n = 8
    p = HashModPartitioner(n)
    counts = collections.Counter(p.shard_for(f"user-{i:06d}") for i in range(16_000))
    assert set(counts) == set(range(n))
    expected = 16_000 / n
    assert all(abs(c - expected) < expected * 0.1 for c in counts.values()), counts


def test_partitioner_validates_count_and_satisfies_protocol() -> None:
    with pytest.raises(ValueError, match="shard_count"):
        HashModPartitioner(0)
    p = HashModPartitioner(3)
    assert isinstance(p, Partitioner)
    assert p.shard_count == 3
    assert repr(p) == "HashModPartitioner(shard_count=3)"


def test_router_routes_per_group() -> None:
    router = ShardRouter({"users": ["u0"], "social": ["s0", "s1", "s2"]})
    assert router.groups == ("users", "social")
    assert router.shards("social") == ("s0", "s1", "s2")
    assert router.shard_for("users", "anything") == "u0"
    for key in ("a", "b", "c", "d"):
        index = router.shard_index("social", key)
        assert router.shard_for("social", key) == f"s{index}"
        assert index == HashModPartitioner(3).shard_for(key)


def test_router_unknown_group() -> None:
    router = ShardRouter({"users": ["u0"]})
    with pytest.raises(UnknownGroupError) as info:
        router.shard_for("photos", "k")
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, LookupError)


def test_router_rejects_empty_group_and_bad_partitioner() -> None:
    with pytest.raises(ValueError, match="no shards"):
        ShardRouter({"users": []})
    with pytest.raises(ValueError, match="covers"):
        ShardRouter({"users": ["a", "b"]}, partitioner_factory=lambda n: HashModPartitioner(n + 1))


@given(st.lists(st.text(max_size=8), max_size=40))
def test_split_by_shard_partitions_keys(keys: list[str]) -> None:
    router = ShardRouter({"g": [0, 1, 2, 3]})
    parts = router.split_by_shard("g", keys)
    flat = [k for part in parts.values() for k in part]
    assert sorted(flat) == sorted(set(keys))
    for index, part in parts.items():
        assert all(router.shard_index("g", k) == index for k in part)
