"""The pool: candidates by health, ejection cap, trial probes, checks, drain and membership."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    ActiveCheckConfig,
    Backend,
    BackendPool,
    BackendState,
    HealthConfig,
    NoBackendAvailable,
    SlowStart,
)
from photostack.blocks.balancer.testing import ManualClock

CONFIG = HealthConfig(
    max_ejection_percent=100.0,
    checks=ActiveCheckConfig(enabled=True, rise=2, fall=2),
    slow_start=SlowStart(window_s=10.0),
)


def backends(count: int) -> list[Backend]:
    return [Backend(f"app-{i}", "127.0.0.1", 8000 + i) for i in range(count)]


def pool_of(count: int, config: HealthConfig = CONFIG) -> tuple[BackendPool, ManualClock]:
    clock = ManualClock()
    return BackendPool(backends(count), config, clock=clock), clock


@given(st.integers(1, 8), st.integers(1, 20))
def test_round_robin_is_fair_when_all_up(count: int, rounds: int) -> None:
    pool, _ = pool_of(count)
    chosen = Counter(pool.choose().name for _ in range(count * rounds))
    assert set(chosen.values()) == {rounds}


def test_ejected_backend_is_skipped_then_probed_by_one_trial() -> None:
    pool, clock = pool_of(3)
    down = pool.backends[1]
    pool.record_failure(down)
    assert pool.health("app-1").state is BackendState.DOWN
    assert "app-1" not in [pool.choose().name for _ in range(6)]
    clock.advance(1.0)
    names = [pool.choose().name for _ in range(3)]
    assert names.count("app-1") == 1
    assert pool.health("app-1").state is BackendState.PROBING
    assert "app-1" not in [pool.choose().name for _ in range(4)]  # one trial at a time
    pool.record_success(down)
    assert pool.health("app-1").state is BackendState.UP
    clock.advance(10.0)  # past slow start
    assert "app-1" in [pool.choose().name for _ in range(3)]


def test_with_active_checks_the_check_is_the_probe() -> None:
    pool, clock = pool_of(2)
    pool.probe_by_checks = True
    pool.record_failure(pool.backends[0])
    clock.advance(5.0)
    assert {pool.choose().name for _ in range(4)} == {"app-1"}  # no trial request
    pool.record_check("app-0", ok=True)
    assert pool.health("app-0").state is BackendState.UP


def test_ejection_never_exceeds_the_configured_share() -> None:
    config = HealthConfig(max_ejection_percent=50.0)
    pool, _ = pool_of(4, config)
    for backend in pool.backends:
        pool.record_failure(backend)
    states = Counter(pool.health(b.name).state for b in pool.backends)
    assert states[BackendState.DOWN] == 2
    assert states[BackendState.UP] == 2


def test_at_least_one_backend_may_always_be_ejected() -> None:
    pool, _ = pool_of(2, HealthConfig(max_ejection_percent=0.0))
    pool.record_failure(pool.backends[0])
    assert pool.health("app-0").state is BackendState.DOWN


def test_consecutive_failure_threshold() -> None:
    pool, _ = pool_of(2, HealthConfig(eject_after_failures=3))
    target = pool.backends[0]
    pool.record_failure(target)
    pool.record_failure(target)
    pool.record_success(target)  # resets the run
    pool.record_failure(target)
    pool.record_failure(target)
    assert pool.health("app-0").state is BackendState.UP
    pool.record_failure(target)
    assert pool.health("app-0").state is BackendState.DOWN


def test_active_checks_fall_and_rise_with_slow_start() -> None:
    pool, clock = pool_of(2)
    pool.record_check("app-0", ok=False)
    assert pool.health("app-0").state is BackendState.UP
    pool.record_check("app-0", ok=False)
    assert pool.health("app-0").state is BackendState.UNHEALTHY
    assert {pool.choose().name for _ in range(4)} == {"app-1"}
    pool.record_check("app-0", ok=True)
    assert pool.health("app-0").state is BackendState.UNHEALTHY
    pool.record_check("app-0", ok=True)
    assert pool.health("app-0").state is BackendState.UP
    shares: list[float] = []
    for _ in range(5):
        shares.append(pool.health("app-0").share(clock(), CONFIG.slow_start))
        clock.advance(2.5)
    assert shares == sorted(shares)
    assert shares[0] < 0.1
    assert shares[-1] == 1.0


def test_reported_weight_changes_the_weight() -> None:
    pool, _ = pool_of(2)
    pool.record_check("app-0", ok=True, weight=3.0)
    assert pool.health("app-0").weight == 3.0
    assert pool.snapshot()[0]["weight"] == 3.0


def test_all_ejected_tries_the_one_whose_ejection_ends_first() -> None:
    pool, clock = pool_of(3)
    for backend in pool.backends:
        pool.record_failure(backend)
        clock.advance(0.1)
    pool.probe_by_checks = True  # no trial requests: this is panic routing
    assert pool.choose().name == "app-0"
    assert pool.choose(exclude={"app-0"}).name == "app-1"


def test_drain_takes_no_new_requests_and_never_panics_into_it() -> None:
    pool, _ = pool_of(2)
    pool.drain("app-0")
    assert {pool.choose().name for _ in range(4)} == {"app-1"}
    with pytest.raises(NoBackendAvailable):
        pool.choose(exclude={"app-1"})
    pool.restore("app-0")
    assert pool.health("app-0").state is BackendState.DOWN
    assert pool.choose().name == "app-0"  # the probe trial
    pool.record_success(pool.backends[0])
    assert pool.health("app-0").state is BackendState.UP


def test_add_ramps_and_remove_forgets() -> None:
    pool, clock = pool_of(2)
    pool.add(Backend("app-9", "127.0.0.1", 9))
    assert pool.health("app-9").share(clock(), CONFIG.slow_start) == CONFIG.slow_start.floor
    with pytest.raises(ValueError, match="already"):
        pool.add(Backend("app-9", "127.0.0.1", 9))
    clock.advance(10.0)
    assert "app-9" in {pool.choose().name for _ in range(3)}
    pool.remove("app-9")
    assert "app-9" not in pool
    assert {pool.choose().name for _ in range(4)} == {"app-0", "app-1"}
    pool.record_failure(Backend("app-9", "127.0.0.1", 9))  # late outcome: ignored


def test_exclude_is_respected_and_exhaustion_raises() -> None:
    pool, _ = pool_of(2)
    assert pool.choose(exclude={"app-0"}).name == "app-1"
    with pytest.raises(NoBackendAvailable):
        pool.choose(exclude={"app-0", "app-1"})
    with pytest.raises(NoBackendAvailable):
        BackendPool([]).choose()


@given(
    st.integers(1, 6),
    st.lists(
        st.tuples(
            st.sampled_from(["fail", "ok", "tick", "choose", "check_ok", "check_fail", "drain"]),
            st.integers(0, 5),
        )
    ),
)
def test_choose_never_refuses_and_prefers_up(count: int, ops: list[tuple[str, int]]) -> None:
    pool, clock = pool_of(count, HealthConfig(checks=ActiveCheckConfig(enabled=True)))
    for op, index in ops:
        backend = pool.backends[index % count]
        ejected_now = False
        if op == "fail":
            before = pool.health(backend.name).state
            pool.record_failure(backend)
            ejected_now = before is not pool.health(backend.name).state is BackendState.DOWN
        elif op == "ok":
            pool.record_success(backend)
        elif op == "tick":
            clock.advance(index * 0.5)
        elif op == "check_ok":
            pool.record_check(backend.name, ok=True)
        elif op == "check_fail":
            pool.record_check(backend.name, ok=False)
        elif op == "drain" and index == 0:
            pool.drain(backend.name)
        else:
            states = [pool.health(b.name).state for b in pool.backends]
            if all(s is BackendState.DRAINING for s in states):
                with pytest.raises(NoBackendAvailable):
                    pool.choose()
                continue
            picked = pool.health(pool.choose().name)
            assert picked.state is not BackendState.DRAINING
            if BackendState.UP in states:
                assert picked.state in (BackendState.UP, BackendState.PROBING)
        if ejected_now:
            # The cap holds when a backend is ejected (draining others later may shrink the
            # pool under it; that does not bring ejected backends back unprobed).
            members = [pool.health(b.name) for b in pool.backends]
            ejected = sum(h.state in (BackendState.DOWN, BackendState.PROBING) for h in members)
            live = sum(h.state is not BackendState.DRAINING for h in members)
            assert ejected <= max(1, live // 2)


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
    assert rows[1]["ejections"] == rows[1]["markdowns"] == 1
    assert pool.finished(first) == 0
    assert "state=DOWN" in repr(pool)
