"""Backend health state machine: the table, ejection times, illegal edges, slow start."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    TRANSITIONS,
    Backend,
    BackendHealth,
    BackendState,
    HealthConfig,
    HealthEvent,
    IllegalTransition,
    SlowStart,
)

CONFIG = HealthConfig(ejection_initial_s=1.0, ejection_max_s=10.0, ejection_factor=2.0)


def fresh() -> BackendHealth:
    return BackendHealth(Backend("app-1", "127.0.0.1", 1))


def test_eject_marks_down_for_initial_time() -> None:
    health = fresh()
    health.up_since = -100.0  # long stable: the streak starts over
    assert health.apply(HealthEvent.EJECT, now=5.0, config=CONFIG) is BackendState.DOWN
    assert health.ejected_until == 6.0
    assert not health.ejection_over(5.9)
    assert health.ejection_over(6.0)
    assert health.ejections == 1


def test_repeated_ejections_grow_up_to_the_cap() -> None:
    health = fresh()
    durations = []
    now = 0.0
    for _ in range(6):
        health.apply(HealthEvent.EJECT, now=now, config=CONFIG)
        durations.append(health.ejected_until - now)
        now = health.ejected_until
        health.apply(HealthEvent.PROBE, now=now, config=CONFIG)
        health.apply(HealthEvent.SUCCESS, now=now, config=CONFIG)  # up again, briefly
    assert durations == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_stable_backend_starts_its_ejection_streak_over() -> None:
    health = fresh()
    health.apply(HealthEvent.EJECT, now=0.0, config=CONFIG)
    health.apply(HealthEvent.PROBE, now=1.0, config=CONFIG)
    health.apply(HealthEvent.SUCCESS, now=1.0, config=CONFIG)
    health.apply(HealthEvent.EJECT, now=100.0, config=CONFIG)  # up for 99 s > ejection_max_s
    assert health.ejected_until == 101.0


def test_probe_failure_ejects_again_longer() -> None:
    health = fresh()
    health.apply(HealthEvent.EJECT, now=0.0, config=CONFIG)
    assert health.apply(HealthEvent.PROBE, now=1.0, config=CONFIG) is BackendState.PROBING
    assert health.apply(HealthEvent.FAILURE, now=1.0, config=CONFIG) is BackendState.DOWN
    assert health.ejected_until == 3.0


def test_recovery_starts_slow_start() -> None:
    health = fresh()
    slow = SlowStart(window_s=10.0)
    assert health.share(0.0, slow) == 1.0  # an initial member has its full share
    health.apply(HealthEvent.FALL, now=0.0, config=CONFIG)
    assert health.state is BackendState.UNHEALTHY
    health.apply(HealthEvent.RISE, now=20.0, config=CONFIG)
    assert health.share(20.0, slow) == slow.floor
    assert health.share(25.0, slow) == pytest.approx(0.5)
    assert health.share(30.0, slow) == 1.0


def test_drain_and_restore_go_through_a_probe() -> None:
    health = fresh()
    assert health.apply(HealthEvent.DRAIN, now=0.0, config=CONFIG) is BackendState.DRAINING
    for event in (HealthEvent.SUCCESS, HealthEvent.FAILURE, HealthEvent.RISE, HealthEvent.FALL):
        assert health.apply(event, now=0.0, config=CONFIG) is BackendState.DRAINING
    assert health.apply(HealthEvent.RESTORE, now=3.0, config=CONFIG) is BackendState.DOWN
    assert health.ejection_over(3.0)
    assert health.ejections == 0  # a drain is not an ejection


def test_illegal_transitions_raise() -> None:
    health = fresh()
    with pytest.raises(IllegalTransition):
        health.apply(HealthEvent.PROBE, now=0.0, config=CONFIG)
    with pytest.raises(IllegalTransition):
        health.apply(HealthEvent.RESTORE, now=0.0, config=CONFIG)


def test_every_state_can_be_drained_and_reaches_up_again() -> None:
    for state in BackendState:
        if state is not BackendState.DRAINING:
            assert TRANSITIONS[(state, HealthEvent.DRAIN)] is BackendState.DRAINING
    targets = {target for target in TRANSITIONS.values()}
    assert targets == set(BackendState)


@given(st.lists(st.sampled_from(list(HealthEvent)), max_size=40))
def test_the_record_follows_the_table_or_refuses(events: list[HealthEvent]) -> None:
    health = fresh()
    now = 0.0
    for event in events:
        now += 0.5
        before = health.state
        expected = TRANSITIONS.get((before, event))
        if expected is None:
            with pytest.raises(IllegalTransition):
                health.apply(event, now=now, config=CONFIG)
            assert health.state is before
        else:
            assert health.apply(event, now=now, config=CONFIG) is expected
        assert health.consecutive_failures >= 0


@given(
    st.floats(0.1, 100.0),
    st.floats(0.2, 5.0),
    st.lists(st.floats(-5.0, 200.0, allow_nan=False), min_size=2, max_size=30),
)
def test_slow_start_ramp_is_monotone_and_bounded(
    window: float, curve: float, times: list[float]
) -> None:
    slow = SlowStart(window_s=window, curve=curve)
    shares = [slow.fraction(t) for t in sorted(times)]
    assert all(slow.floor <= s <= 1.0 for s in shares)
    assert shares == sorted(shares)
    assert slow.fraction(window) == 1.0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        Backend("a", "h", 1, weight=0)
    with pytest.raises(ValueError, match="bad health"):
        HealthConfig(eject_after_failures=0)
    with pytest.raises(ValueError, match="bad slow start"):
        SlowStart(window_s=-1)
