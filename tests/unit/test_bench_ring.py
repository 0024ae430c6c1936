from __future__ import annotations

import pytest
from uhashring import HashRing as UHashRing

from photostack.blocks.ring import HashRing
from photostack.ops._bench_ring import (
    ANCHOR,
    lookup_rates,
    moved_fractions,
    skew_table,
    uhashring_shares,
)


def test_uhashring_shares_equal_our_ketama_shares() -> None:
    nodes = [f"node-{i}" for i in range(5)]
    theirs = uhashring_shares(UHashRing(nodes=nodes, hash_fn="ketama"))
    ours = HashRing(dict.fromkeys(nodes, 1.0), hash="ketama").shares()
    assert theirs.keys() == ours.keys()
    for node in nodes:
        assert theirs[node] == pytest.approx(ours[node], abs=1e-12)


def test_measurements_have_the_expected_shape() -> None:
    rates = lookup_rates(node_counts=(3,), key_count=200, rounds=1)
    assert {r.name for r in rates} >= {ANCHOR, "photostack ring (xxh3)"}
    assert next(r for r in rates if r.name == ANCHOR).vs_anchor == 1.0
    assert all(r.per_s > 0 for r in rates)
    skews = skew_table(node_counts=(3,), key_count=3000)
    assert skews[ANCHOR, 3] == skews["photostack ring (ketama mode)", 3]  # same mapping
    moved = moved_fractions(key_count=3000)
    assert moved[ANCHOR] == moved["photostack ring (ketama mode)"]
    assert moved["hash mod n (contrast)"] > 0.8
    assert moved["photostack ring (xxh3)"] == pytest.approx(1 / 11, abs=0.02)
