from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.ring import (
    DuplicateNodeError,
    EmptyRingError,
    JumpHash,
    NotEnoughNodesError,
    RendezvousHash,
    RingConfigError,
    UnknownNodeError,
    jump_hash,
    load_skew,
)

KEYS = [f"user-{i:06d}" for i in range(20_000)]


def test_jump_reference_vectors() -> None:
    # the values of the reference implementations' test suites
    cases = [(1, 1, 0), (42, 57, 43), (0xDEAD10CC, 1, 0), (0xDEAD10CC, 666, 361), (256, 1024, 520)]
    assert [jump_hash(k, n) for k, n, _ in cases] == [b for _, _, b in cases]
    with pytest.raises(RingConfigError):
        jump_hash(1, 0)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=200))
def test_jump_growth_moves_keys_only_to_the_new_bucket(key: int, n: int) -> None:
    before, after = jump_hash(key, n), jump_hash(key, n + 1)
    assert 0 <= before < n
    assert after in (before, n)


def test_jump_is_even_and_moves_the_ideal_fraction() -> None:
    j = JumpHash(f"n{i}" for i in range(10))
    counts = collections.Counter(j.node_for(k) for k in KEYS)
    assert load_skew(counts.values()) < 0.05  # sampling noise only: sqrt(10 / 20000) ~ 2.2 %
    before = [j.node_for(k) for k in KEYS]
    j.add("n10")
    moved = sum(b != j.node_for(k) for b, k in zip(before, KEYS, strict=True))
    assert moved / len(KEYS) == pytest.approx(1 / 11, rel=0.1)


def test_jump_membership_rules() -> None:
    j = JumpHash(["a", "b"])
    with pytest.raises(RingConfigError, match="last"):
        j.remove("a")
    with pytest.raises(UnknownNodeError):
        j.remove("z")
    with pytest.raises(RingConfigError):
        j.add("a")
    j.remove("b")
    j.remove("a")
    with pytest.raises(EmptyRingError):
        j.node_for("k")
    assert (len(j), j.nodes, repr(j)) == (0, (), "JumpHash(nodes=0)")


@given(st.lists(st.text(min_size=1, max_size=5), min_size=2, max_size=6, unique=True))
def test_rendezvous_add_and_remove_move_only_their_keys(nodes: list[str]) -> None:
    r = RendezvousHash(dict.fromkeys(nodes[1:], 1.0))
    keys = KEYS[:200]
    before = [r.node_for(k) for k in keys]
    r.add(nodes[0])
    after = [r.node_for(k) for k in keys]
    assert all(a in (b, nodes[0]) for a, b in zip(after, before, strict=True))
    r.remove(nodes[0])
    assert [r.node_for(k) for k in keys] == before


def test_rendezvous_weights_and_replicas() -> None:
    r = RendezvousHash({"a": 1.0, "b": 1.0, "c": 2.0})
    counts = collections.Counter(r.node_for(k) for k in KEYS)
    assert counts["c"] / len(KEYS) == pytest.approx(0.5, abs=0.02)
    for k in KEYS[:100]:
        top = r.nodes_for(k, 3)
        assert sorted(top) == ["a", "b", "c"]
        assert top[0] == r.node_for(k)
    with pytest.raises(NotEnoughNodesError):
        r.nodes_for("k", 4)
    with pytest.raises(ValueError, match="n must"):
        r.nodes_for("k", 0)
    with pytest.raises(DuplicateNodeError):
        r.add("a")
    with pytest.raises(RingConfigError):
        r.add("d", 0.0)
    with pytest.raises(UnknownNodeError):
        r.remove("d")
    assert r.nodes == {"a": 1.0, "b": 1.0, "c": 2.0}
    assert (len(r), repr(r)) == (3, "RendezvousHash(nodes=3)")
    with pytest.raises(EmptyRingError):
        RendezvousHash({}).node_for("k")
