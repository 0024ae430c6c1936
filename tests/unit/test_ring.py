from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photostack.blocks import ring
from photostack.blocks.ring import (
    DEFAULT_VNODES,
    DuplicateNodeError,
    EmptyRingError,
    HashRing,
    MovedRange,
    NotEnoughNodesError,
    RingConfigError,
    RingError,
    UnknownNodeError,
    load_skew,
    xxh3_key_hash,
)

KEYS = [f"user-{i:06d}" for i in range(20_000)]
# small vnode counts keep property tests fast; the invariants do not depend on the count
names = st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6, unique=True)
keys = st.lists(st.one_of(st.text(max_size=12), st.binary(max_size=12)), min_size=1, max_size=60)


def _ring(nodes: list[str], vnodes: int = 32, hash: ring.HashName = "xxh3") -> HashRing:
    return HashRing(dict.fromkeys(nodes, 1.0), vnodes=vnodes, hash=hash)


def _in_ranges(position: int, ranges: list[MovedRange]) -> MovedRange | None:
    return next((r for r in ranges if r.start <= position < r.end), None)


def test_exports_import() -> None:
    for name in ring.__all__:
        assert getattr(ring, name) is not None


def test_hash_and_assignments_are_pinned() -> None:
    # XXH3-64 reference values: a change here would silently move every key of every cluster
    assert xxh3_key_hash(b"") == 0x2D06800538D394C2
    assert xxh3_key_hash("alice") == 0x4DA10DD61A0116B0 == xxh3_key_hash(b"alice")
    r = HashRing({"a": 1.0, "b": 1.0, "c": 1.0})
    assert [r.node_for(k) for k in ("alice", "bob", "carol", "dave", "erin", "frank")] == [
        "b", "c", "c", "a", "b", "c",
    ]  # fmt: skip
    assert r.nodes_for("alice", 3) == ["b", "a", "c"]


def test_same_answers_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from photostack.blocks.ring import HashRing\n"
        "r = HashRing({f'n{i}': 1.0 for i in range(7)}, vnodes=64)\n"
        "print(','.join(r.node_for(f'k{i}') for i in range(300)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    r = HashRing({f"n{i}": 1.0 for i in range(7)}, vnodes=64)
    assert out.split(",") == [r.node_for(f"k{i}") for i in range(300)]


@given(names, keys)
def test_insertion_order_does_not_matter(nodes: list[str], ks: list[str | bytes]) -> None:
    a, b = _ring(nodes), _ring(list(reversed(nodes)))
    assert [a.node_for(k) for k in ks] == [b.node_for(k) for k in ks]


@given(names, st.text(min_size=1, max_size=6), keys)
def test_add_moves_keys_only_to_the_new_node(
    nodes: list[str], new: str, ks: list[str | bytes]
) -> None:
    if new in nodes:
        return
    r = _ring(nodes)
    before = {k: r.node_for(k) for k in ks}
    moved = r.add(new)
    for k in ks:
        after = r.node_for(k)
        hit = _in_ranges(r.position(k), moved)
        if after != before[k]:
            assert after == new
            assert hit == MovedRange(hit.start, hit.end, before[k], new) if hit else False
        else:
            assert hit is None
    assert all(m.to_node == new and m.from_node in nodes for m in moved)


@given(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=6, unique=True), keys)
def test_remove_moves_keys_only_from_the_removed_node(
    nodes: list[str], ks: list[str | bytes]
) -> None:
    r = _ring(nodes)
    gone = nodes[0]
    before = {k: r.node_for(k) for k in ks}
    moved = r.remove(gone)
    for k in ks:
        after = r.node_for(k)
        hit = _in_ranges(r.position(k), moved)
        if before[k] == gone:
            assert after != gone
            assert hit is not None
            assert (hit.from_node, hit.to_node) == (gone, after)
        else:
            assert after == before[k]
            assert hit is None


@settings(max_examples=30)
@given(names, keys, st.integers(min_value=1, max_value=6))
def test_nodes_for_gives_distinct_nodes_starting_with_the_owner(
    nodes: list[str], ks: list[str | bytes], n: int
) -> None:
    r = _ring(nodes)
    for k in ks:
        walked = list(r.walk(k))
        assert sorted(walked) == sorted(nodes)
        assert walked[0] == r.node_for(k)
        if n <= len(nodes):
            assert r.nodes_for(k, n) == walked[:n]
        else:
            with pytest.raises(NotEnoughNodesError):
                r.nodes_for(k, n)


def test_ranges_never_wrap_and_cover_the_new_share() -> None:
    r = HashRing({f"node-{i}": 1.0 for i in range(10)})
    moved = r.add("node-10")
    assert all(0 <= m.start < m.end <= r.space for m in moved)
    covered = sum(m.end - m.start for m in moved) / r.space
    assert covered == pytest.approx(r.shares()["node-10"], rel=1e-9)
    assert covered == pytest.approx(1 / 11, rel=0.1)
    back = r.remove("node-10")
    assert sorted((m.start, m.end) for m in back) == sorted((m.start, m.end) for m in moved)
    assert {(m.from_node, m.to_node) for m in back} == {(m.to_node, m.from_node) for m in moved}


@pytest.mark.parametrize(("nodes", "limit"), [(3, 0.03), (10, 0.02), (50, 0.02)])
def test_default_ring_is_even(nodes: int, limit: float) -> None:
    # the goal is <= 2 % at 10 nodes, here on the exact arc shares (expected ~1.1 %)
    r = HashRing({f"node-{i}": 1.0 for i in range(nodes)})
    assert r.point_count == nodes * DEFAULT_VNODES
    shares = r.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert load_skew(shares.values()) <= limit


def test_keys_moved_10_to_11_close_to_ideal() -> None:
    r = HashRing({f"node-{i}": 1.0 for i in range(10)})
    before = [r.node_for(k) for k in KEYS]
    r.add("node-10")
    moved = sum(a != r.node_for(k) for a, k in zip(before, KEYS, strict=True))
    assert moved / len(KEYS) == pytest.approx(1 / 11, rel=0.1)


def test_weights_scale_shares() -> None:
    r = HashRing({"small": 1.0, "big": 2.0, "half": 0.5})
    assert r.point_count == 4096 + 8192 + 2048
    shares = r.shares()
    assert shares["big"] / shares["small"] == pytest.approx(2.0, rel=0.06)
    assert shares["half"] / shares["small"] == pytest.approx(0.5, rel=0.06)
    counts = collections.Counter(r.node_for(k) for k in KEYS)
    assert counts["big"] / len(KEYS) == pytest.approx(2 / 3.5, rel=0.05)


def test_one_node_owns_everything_and_bytes_equal_text() -> None:
    r = HashRing({"only": 1.0}, vnodes=1)
    assert {r.node_for(k) for k in KEYS[:200]} == {"only"}
    assert r.node_for("é") == r.node_for("é".encode())
    assert r.shares() == {"only": 1.0}


def test_empty_ring_and_first_node() -> None:
    r = HashRing({})
    with pytest.raises(EmptyRingError):
        r.node_for("k")
    with pytest.raises(EmptyRingError):
        r.walk("k")
    moved = r.add("a")
    assert moved == [MovedRange(0, r.space, None, "a")]
    assert r.node_for("k") == "a"
    assert r.remove("a") == []
    with pytest.raises(LookupError):
        r.node_for("k")


def test_errors_share_one_root() -> None:
    r = HashRing({"a": 1.0})
    with pytest.raises(DuplicateNodeError):
        r.add("a")
    with pytest.raises(UnknownNodeError):
        r.remove("b")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RingConfigError):
            r.add("c", bad)
    assert "c" not in r
    with pytest.raises(RingConfigError):
        HashRing({"a": 1.0}, vnodes=0)
    with pytest.raises(RingConfigError):
        HashRing({"a": 1.0}, vnodes=6, hash="ketama")
    with pytest.raises(RingConfigError):
        HashRing({"a": 1.0}, hash="sha1")  # type: ignore[arg-type]
    with pytest.raises(RingConfigError):
        HashRing({"": 1.0})
    with pytest.raises(ValueError, match="n must be"):
        r.nodes_for("k", 0)
    for exc in (DuplicateNodeError, UnknownNodeError, RingConfigError, EmptyRingError):
        assert issubclass(exc, RingError)


def test_introspection() -> None:
    r = HashRing({"a": 1.0, "b": 2.0}, vnodes=10)
    assert len(r) == 2
    assert "a" in r
    assert r.nodes == {"a": 1.0, "b": 2.0}
    assert (r.vnodes, r.hash_name, r.space, r.point_count) == (10, "xxh3", 2**64, 30)
    assert repr(r) == "HashRing(nodes=2, vnodes=10, hash='xxh3', points=30)"


def test_load_skew() -> None:
    assert load_skew([5, 5, 5]) == 0.0
    assert load_skew([1, 3]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        load_skew([])
    with pytest.raises(ValueError, match="positive"):
        load_skew([0, 0])
