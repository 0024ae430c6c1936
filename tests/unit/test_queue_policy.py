"""The queue's pure decisions: states, backoff, lost leases, the length gate, delay tiers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.queue import (
    DELAY_TIERS_MS,
    TRANSITIONS,
    DepthGate,
    IllegalTransition,
    PayloadTooLarge,
    QueueConfig,
    QueueConfigError,
    RetryPolicy,
    TaskState,
    backoff_delay_s,
    check_transition,
    decide_failure,
    decide_lost_lease,
    delay_tier_ms,
    heartbeat_interval_s,
)
from photostack.blocks.queue._model import encode_payload
from photostack.blocks.queue.testing import ManualClock

NO_JITTER = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=10.0, jitter_ratio=0.0)


def test_backoff_doubles_per_attempt_up_to_the_cap() -> None:
    schedule = [backoff_delay_s(NO_JITTER, attempt, rand=0.0) for attempt in range(1, 7)]
    assert schedule == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_survives_huge_attempt_numbers() -> None:
    assert backoff_delay_s(NO_JITTER, 10_000, rand=0.5) == 10.0


@given(
    attempt=st.integers(1, 60),
    rand=st.floats(0.0, 1.0, exclude_max=True),
    jitter=st.floats(0.0, 1.0),
)
def test_jitter_only_shortens_within_its_ratio(attempt: int, rand: float, jitter: float) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=60.0, jitter_ratio=jitter)
    full = backoff_delay_s(
        RetryPolicy(base_delay_s=0.5, max_delay_s=60.0, jitter_ratio=0), attempt, 0
    )
    delay = backoff_delay_s(policy, attempt, rand)
    assert full * (1 - jitter) - 1e-9 <= delay <= full + 1e-9


def test_failure_retries_until_the_last_attempt_then_dies() -> None:
    decisions = [decide_failure(NO_JITTER, attempt, rand=0.0) for attempt in range(1, 6)]
    assert [d.state for d in decisions] == [TaskState.FAILED] * 4 + [TaskState.DEAD]
    assert [d.delay_s for d in decisions[:4]] == [1.0, 2.0, 4.0, 8.0]


def test_permanent_failure_dies_at_once() -> None:
    assert decide_failure(NO_JITTER, 1, 0.0, permanent=True).state is TaskState.DEAD


def test_a_lost_lease_requeues_unless_attempts_are_used_up() -> None:
    assert decide_lost_lease(attempts=1, max_attempts=3) is TaskState.QUEUED
    assert decide_lost_lease(attempts=3, max_attempts=3) is TaskState.DEAD


def test_heartbeat_beats_three_times_per_visibility_timeout() -> None:
    assert heartbeat_interval_s(30.0) == 10.0


@pytest.mark.parametrize("old", list(TaskState))
@pytest.mark.parametrize("new", list(TaskState))
def test_transition_table_is_enforced(old: TaskState, new: TaskState) -> None:
    if new in TRANSITIONS[old]:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


def test_finished_tasks_never_move_except_dead_to_replay() -> None:
    assert TRANSITIONS[TaskState.SUCCEEDED] == frozenset()
    assert TRANSITIONS[TaskState.DEAD] == frozenset({TaskState.QUEUED})
    assert TaskState.SUCCEEDED.is_terminal
    assert TaskState.DEAD.is_terminal
    assert TaskState.FAILED.is_waiting
    assert not TaskState.RUNNING.is_waiting


def test_depth_gate_counts_only_when_stale_or_near_the_limit() -> None:
    clock = ManualClock()
    gate = DepthGate(100, refresh_s=0.5)
    assert gate.needs_count(clock())  # never counted
    gate.counted(10, clock())
    assert not gate.needs_count(clock())
    for _ in range(78):
        gate.enqueued()
    assert not gate.needs_count(clock())  # 88 < 89
    gate.enqueued()
    assert gate.needs_count(clock())  # near: count exactly under the lock
    gate.counted(100, clock())
    assert not gate.admits()
    gate.counted(5, clock())
    clock.advance(0.5)
    assert gate.needs_count(clock())  # stale: other producers may have filled it


def test_a_tiny_limit_always_counts() -> None:
    gate = DepthGate(1)
    gate.counted(0, 0.0)
    assert gate.needs_count(0.0)
    assert gate.admits()


@given(st.floats(0.0, 7 * 24 * 3600.0))
def test_delay_tiers_never_deliver_early(remaining_s: float) -> None:
    tier = delay_tier_ms(remaining_s)
    if tier is None:
        assert remaining_s * 1000 < DELAY_TIERS_MS[0]
    else:
        assert tier in DELAY_TIERS_MS
        assert tier <= remaining_s * 1000  # rounds down: the rest is delayed again
        bigger = [t for t in DELAY_TIERS_MS if t > tier]
        assert not bigger or bigger[0] > remaining_s * 1000  # the largest that fits


def test_payload_limit_counts_utf8_bytes() -> None:
    assert encode_payload({"a": "é"}, 11) == '{"a":"é"}'
    with pytest.raises(PayloadTooLarge) as caught:
        encode_payload({"a": "é" * 10}, 11)
    assert (caught.value.size_bytes, caught.value.limit_bytes) == (28, 11)
    with pytest.raises(QueueConfigError):
        encode_payload({"a": object()}, 100)


def test_config_validation() -> None:
    with pytest.raises(QueueConfigError):
        QueueConfig(name="Bad-Name")
    with pytest.raises(QueueConfigError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(QueueConfigError):
        RetryPolicy(base_delay_s=5, max_delay_s=1)
    config = QueueConfig(name="media", policies={"thumbnail": NO_JITTER})
    assert config.policy_for("thumbnail") is NO_JITTER
    assert config.policy_for("other") == RetryPolicy()
    with pytest.raises(QueueConfigError):
        config.check_priority(10)
    with pytest.raises(QueueConfigError):
        config.check_delay(-1)
