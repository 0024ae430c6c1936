"""Strategies: distributions within stated bounds, weights, bounded load, slow start."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    BoundedHash,
    Candidate,
    StrategyName,
    bounded_load_cap,
    make_strategy,
)
from photostack.blocks.balancer._ring import unit_fraction


def cands(count: int, *, weights: list[float] | None = None) -> list[Candidate]:
    ws = weights or [1.0] * count
    return [Candidate(f"b{i}", ws[i], 1.0, 0) for i in range(count)]


def within(observed: int, expected: float, n: int, p: float) -> bool:
    """Within 5 standard deviations of a binomial (false alarms ~1e-6 per check)."""
    return abs(observed - expected) <= 5 * math.sqrt(n * p * (1 - p)) + 1


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([StrategyName.RANDOM, StrategyName.WEIGHTED_RANDOM, StrategyName.POWER_OF_TWO]),
    st.integers(2, 6),
    st.integers(0, 2**32),
)
def test_random_strategies_spread_evenly(name: StrategyName, count: int, seed: int) -> None:
    strategy = make_strategy(name, rng=random.Random(seed))
    n = 3000
    picks = Counter(strategy.choose(cands(count), None) for _ in range(n))
    for i in range(count):
        assert within(picks[f"b{i}"], n / count, n, 1 / count), picks


@given(st.integers(1, 6), st.integers(1, 30))
def test_round_robin_is_exact(count: int, rounds: int) -> None:
    strategy = make_strategy(StrategyName.ROUND_ROBIN)
    picks = Counter(strategy.choose(cands(count), None) for _ in range(count * rounds))
    assert set(picks.values()) == {rounds}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=5), st.integers(0, 2**32))
def test_weights_are_respected(weights: list[int], seed: int) -> None:
    total = sum(weights)
    fweights = [float(w) for w in weights]
    n = 4000
    wr = make_strategy(StrategyName.WEIGHTED_RANDOM, rng=random.Random(seed))
    picks = Counter(wr.choose(cands(len(weights), weights=fweights), None) for _ in range(n))
    for i, w in enumerate(weights):
        assert within(picks[f"b{i}"], n * w / total, n, w / total), picks
    # Smooth weighted round-robin: every full cycle of `total` picks matches the weights exactly.
    rr = make_strategy(StrategyName.ROUND_ROBIN)
    cycle = Counter(rr.choose(cands(len(weights), weights=fweights), None) for _ in range(total))
    assert [cycle[f"b{i}"] for i in range(len(weights))] == weights


def test_least_connections_picks_the_least_loaded_per_weight() -> None:
    strategy = make_strategy(StrategyName.LEAST_CONNECTIONS, rng=random.Random(1))
    loaded = [Candidate("a", 1.0, 1.0, 5), Candidate("b", 1.0, 1.0, 2), Candidate("c", 4.0, 1.0, 4)]
    assert strategy.choose(loaded, None) == "c"  # (4+1)/4 < (2+1)/1
    ties = Counter(strategy.choose(cands(3), None) for _ in range(600))
    assert all(within(ties[f"b{i}"], 200, 600, 1 / 3) for i in range(3))


def test_power_of_two_avoids_the_busiest() -> None:
    strategy = make_strategy(StrategyName.POWER_OF_TWO, rng=random.Random(2))
    loaded = [
        Candidate("busy", 1.0, 1.0, 50),
        Candidate("a", 1.0, 1.0, 0),
        Candidate("b", 1.0, 1.0, 0),
    ]
    assert "busy" not in {strategy.choose(loaded, None) for _ in range(200)}


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 8),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=300),
)
def test_bounded_load_is_never_exceeded(
    count: int, epsilon: float, ops: list[tuple[int, bool]]
) -> None:
    strategy = BoundedHash(epsilon=epsilon)
    names = [f"b{i}" for i in range(count)]
    strategy.members_changed(dict.fromkeys(names, 1.0))
    load = dict.fromkeys(names, 0)
    rng = random.Random(count)
    for key, finish in ops:
        if finish and any(load.values()):
            busy = [n for n in names if load[n]]
            load[rng.choice(busy)] -= 1
            continue
        total = sum(load.values())
        chosen = strategy.choose([Candidate(n, 1.0, 1.0, load[n]) for n in names], b"k%d" % key)
        load[chosen] += 1
        assert load[chosen] <= bounded_load_cap(total, count, epsilon)


def test_hash_affinity_is_stable_and_spreads_keys() -> None:
    strategy = BoundedHash()
    names = [f"b{i}" for i in range(4)]
    strategy.members_changed(dict.fromkeys(names, 1.0))
    idle = cands(4)
    first = {k: strategy.choose(idle, b"user-%d" % k) for k in range(2000)}
    again = {k: strategy.choose(idle, b"user-%d" % k) for k in range(2000)}
    assert first == again
    spread = Counter(first.values())
    assert all(300 <= spread[n] <= 700 for n in names), spread  # 160 vnodes: within ±40 %
    # Removing a member moves only its own keys.
    strategy.members_changed(dict.fromkeys(names[:3], 1.0))
    moved = {k for k in range(2000) if strategy.choose(cands(3), b"user-%d" % k) != first[k]}
    assert moved == {k for k, n in first.items() if n == "b3"}


def test_hash_weights_shift_key_share() -> None:
    strategy = BoundedHash()
    strategy.members_changed({"b0": 3.0, "b1": 1.0})
    picks = Counter(strategy.choose(cands(2), b"%d" % k) for k in range(4000))
    assert 2600 <= picks["b0"] <= 3400, picks


@given(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=12))
def test_hash_slow_start_gate_grows_monotonically(shares: list[float]) -> None:
    """A ramping backend's keys are the ones whose gate fraction is below its share."""
    strategy = BoundedHash()
    strategy.members_changed({"old": 1.0, "new": 1.0})
    keys = [b"key-%d" % k for k in range(300)]
    previous: set[bytes] = set()
    for share in sorted(shares):
        candidates = [Candidate("old", 1.0, 1.0, 0), Candidate("new", share, share, 0)]
        taken = {k for k in keys if strategy.choose(candidates, k) == "new"}
        assert previous <= taken  # keys only ever move towards the new backend
        assert all(unit_fraction(k, "new") < share for k in taken)
        previous = taken


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(list(StrategyName)), st.floats(0.05, 0.9), st.integers(0, 2**32))
def test_slow_start_share_limits_every_strategy(
    name: StrategyName, share: float, seed: int
) -> None:
    """A ramping backend among three full ones gets about share/(3+share) of new requests."""
    strategy = make_strategy(name, rng=random.Random(seed))
    names = ["a", "b", "c", "new"]
    strategy.members_changed(dict.fromkeys(names, 1.0))
    candidates = [Candidate(n, 1.0, 1.0, 0) for n in names[:3]]
    candidates.append(Candidate("new", share, share, 0))
    n = 2000
    picks = Counter(strategy.choose(candidates, b"k%d" % i) for i in range(n))
    expected = share / (3 + share)
    if name in (StrategyName.LEAST_CONNECTIONS, StrategyName.POWER_OF_TWO):
        # With nothing in flight these pick by weight alone: never more than a full share.
        assert picks["new"] <= n * expected + 5 * math.sqrt(n) + 1
    elif name is StrategyName.HASH:
        # The gate admits about `share` of the new backend's own quarter of the keys.
        assert picks["new"] <= n * share / 4 + 5 * math.sqrt(n) + 1
    else:
        assert within(picks["new"], n * expected, n, expected), picks


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="known"):
        make_strategy("fastest")
