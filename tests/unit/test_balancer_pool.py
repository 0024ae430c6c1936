"""Round-robin choice with passive health, driven by a manual clock."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    Backend,
    BackendPool,
    BackendState,
    HealthConfig,
    NoBackendAvailable,
)
from photostack.blocks.balancer.testing import ManualClock


def backends(count: int) -> list[Backend]:
    return [Backend(f"app-{i}", "127.0.0.1", 8000 + i) for i in range(count)]


def pool_of(count: int) -> tuple[BackendPool, ManualClock]:
    clock = ManualClock()
    return BackendPool(backends(count), HealthConfig(), clock=clock), clock


@given(st.integers(1, 8), st.integers(1, 20))
def test_round_robin_is_fair_when_all_up(count: int, rounds: int) -> None:
    pool, _ = pool_of(count)
    chosen = Counter(pool.choose().name for _ in range(count * rounds))
    assert set(chosen.values()) == {rounds}


def test_failed_backend_is_skipped_then_retried_after_cooldown() -> None:
    pool, clock = pool_of(3)
    down = pool.backends[1]
    pool.record_failure(down)
    names = [pool.choose().name for _ in range(6)]
    assert "app-1" not in names
    clock.advance(1.0)
    names = [pool.choose().name for _ in range(3)]
    assert names.count("app-1") == 1
    assert pool.health("app-1").state is BackendState.PROBING
    # While the trial is in flight nobody else is sent there.
    assert "app-1" not in [pool.choose().name for _ in range(4)]
    pool.record_success(down)
    assert "app-1" in [pool.choose().name for _ in range(3)]


def test_all_down_tries_the_one_whose_cooldown_ends_first() -> None:
    pool, clock = pool_of(3)
    for backend in pool.backends:
        pool.record_failure(backend)
        clock.advance(0.1)
    assert pool.choose().name == "app-0"
    assert pool.choose(exclude={"app-0"}).name == "app-1"


def test_exclude_is_respected_and_exhaustion_raises() -> None:
    pool, _ = pool_of(2)
    assert pool.choose(exclude={"app-0"}).name == "app-1"
    with pytest.raises(NoBackendAvailable):
        pool.choose(exclude={"app-0", "app-1"})
    with pytest.raises(NoBackendAvailable):
        BackendPool([]).choose()


@given(
    st.integers(1, 6),
    st.lists(st.tuples(st.sampled_from(["fail", "ok", "tick", "choose"]), st.integers(0, 5))),
)
def test_choose_never_refuses_and_prefers_up(count: int, ops: list[tuple[str, int]]) -> None:
    pool, clock = pool_of(count)
    for op, index in ops:
        backend = pool.backends[index % count]
        if op == "fail":
            pool.record_failure(backend)
        elif op == "ok":
            pool.record_success(backend)
        elif op == "tick":
            clock.advance(index * 0.5)
        else:
            any_up = any(pool.health(b.name).state is BackendState.UP for b in pool.backends)
            picked = pool.health(pool.choose().name)
            if any_up:
                assert picked.state is not BackendState.DOWN


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        BackendPool([Backend("a", "h", 1), Backend("a", "h", 2)])


def test_snapshot_and_in_flight() -> None:
    pool, _ = pool_of(2)
    first = pool.choose()
    pool.started(first)
    pool.record_failure(pool.backends[1])
    rows = pool.snapshot()
    assert rows[0]["in_flight"] == 1
    assert rows[1]["state"] == "down"
    assert rows[1]["failures"] == 1
    assert rows[1]["down_for_s"] == 1.0
    pool.finished(first)
    assert pool.snapshot()[0]["in_flight"] == 0
    assert "state=DOWN" in repr(pool)
