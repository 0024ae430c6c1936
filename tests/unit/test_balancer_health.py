"""Backend health state machine: table, cool-downs, illegal edges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    Backend,
    BackendHealth,
    BackendState,
    HealthConfig,
    HealthEvent,
    IllegalTransition,
)
from photostack.blocks.balancer._health import TRANSITIONS

CONFIG = HealthConfig(cooldown_initial_s=1.0, cooldown_max_s=10.0, cooldown_factor=2.0)


def fresh() -> BackendHealth:
    return BackendHealth(Backend("app-1", "127.0.0.1", 1))


def test_failure_marks_down_for_initial_cooldown() -> None:
    health = fresh()
    assert health.apply(HealthEvent.FAILURE, now=5.0, config=CONFIG) is BackendState.DOWN
    assert health.down_until == 6.0
    assert not health.is_available(5.9)
    assert health.is_available(6.0)
    assert health.markdowns == 1


def test_probe_then_success_is_up_and_resets_failures() -> None:
    health = fresh()
    health.apply(HealthEvent.FAILURE, now=0.0, config=CONFIG)
    assert health.apply(HealthEvent.PROBE, now=1.0, config=CONFIG) is BackendState.PROBING
    assert not health.is_available(100.0)  # one trial at a time
    assert health.apply(HealthEvent.SUCCESS, now=1.1, config=CONFIG) is BackendState.UP
    assert health.consecutive_failures == 0


def test_failed_probe_doubles_cooldown_up_to_cap() -> None:
    health = fresh()
    now = 0.0
    cooldowns = []
    for _ in range(6):
        health.apply(HealthEvent.FAILURE, now=now, config=CONFIG)
        cooldowns.append(health.down_until - now)
        now = health.down_until
        health.apply(HealthEvent.PROBE, now=now, config=CONFIG)
    assert cooldowns == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_late_failures_while_down_do_not_extend() -> None:
    health = fresh()
    health.apply(HealthEvent.FAILURE, now=0.0, config=CONFIG)
    health.apply(HealthEvent.FAILURE, now=0.5, config=CONFIG)
    assert health.down_until == 1.0
    assert health.consecutive_failures == 1
    assert health.markdowns == 1


@pytest.mark.parametrize(
    ("state", "event"),
    [(BackendState.UP, HealthEvent.PROBE), (BackendState.PROBING, HealthEvent.PROBE)],
)
def test_illegal_transitions_raise(state: BackendState, event: HealthEvent) -> None:
    health = fresh()
    health.state = state
    with pytest.raises(IllegalTransition):
        health.apply(event, now=0.0, config=CONFIG)


def test_every_table_edge_targets_a_state() -> None:
    for (source, event), target in TRANSITIONS.items():
        health = fresh()
        health.state = source
        assert health.apply(event, now=0.0, config=CONFIG) is target


def test_repr_shows_state() -> None:
    health = fresh()
    health.apply(HealthEvent.FAILURE, now=0.0, config=CONFIG)
    assert "state=DOWN" in repr(health)
    assert "app-1" in repr(health)


@given(
    st.floats(0.001, 10.0),
    st.floats(1.0, 4.0),
    st.floats(0.001, 100.0),
    st.integers(1, 10_000),
)
def test_cooldown_is_monotonic_and_capped(
    initial: float, factor: float, cap: float, failures: int
) -> None:
    config = HealthConfig(cooldown_initial_s=initial, cooldown_max_s=cap, cooldown_factor=factor)
    assert config.cooldown_s(failures) <= cap
    assert config.cooldown_s(failures) <= config.cooldown_s(failures + 1)
