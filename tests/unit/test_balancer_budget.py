"""The retry budget (sliding window) and the balancing settings parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    BalancerConfigError,
    RetryBudget,
    RetryBudgetConfig,
    StrategyName,
    key_function,
    parse_settings,
)
from photostack.blocks.balancer.testing import ManualClock


def test_low_traffic_still_retries_a_few_per_second() -> None:
    clock = ManualClock(100.0)
    budget = RetryBudget(RetryBudgetConfig(budget_percent=20, min_retries_per_s=1, window_s=10))
    budget = RetryBudget(budget._config, clock=clock)
    assert sum(budget.try_spend() for _ in range(20)) == 10  # 1/s over a 10 s window
    assert budget.exhausted == 10


def test_budget_is_a_share_of_requests() -> None:
    clock = ManualClock(50.0)
    budget = RetryBudget(
        RetryBudgetConfig(budget_percent=20, min_retries_per_s=0, window_s=10), clock=clock
    )
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(500)) == 200


def test_the_window_slides() -> None:
    clock = ManualClock(0.0)
    budget = RetryBudget(
        RetryBudgetConfig(budget_percent=10, min_retries_per_s=0, window_s=5), clock=clock
    )
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 10
    clock.advance(5.0)  # the requests and retries of second 0 left the window
    assert not budget.try_spend()
    for _ in range(10):
        budget.record_request()
    assert budget.try_spend()


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.floats(0, 3)), max_size=40))
def test_retries_never_exceed_the_allowance(steps: list[tuple[int, int, float]]) -> None:
    clock = ManualClock(0.0)
    config = RetryBudgetConfig(budget_percent=20, min_retries_per_s=2, window_s=10)
    budget = RetryBudget(config, clock=clock)
    history: list[tuple[float, int, int]] = []  # (time, requests, retries granted)
    for requests, retries, tick in steps:
        for _ in range(requests):
            budget.record_request()
        granted = sum(budget.try_spend() for _ in range(retries))
        history.append((clock(), requests, granted))
        now = int(clock())
        window = [(r, g) for t, r, g in history if int(t) > now - config.window_s]
        total_requests = sum(r for r, _ in window)
        total_granted = sum(g for _, g in window)
        if granted:  # judged when granted: later, old requests leave the window first
            assert total_granted <= 0.2 * total_requests + 2 * 10
        clock.advance(tick)


def test_parse_settings_builds_the_config() -> None:
    config, weights = parse_settings(
        {
            "strategy": "hash",
            "hash_key": "header:X-User",
            "hash_epsilon": 0.5,
            "slow_start_s": 4,
            "checks": True,
            "check_interval_s": 0.5,
            "check_fall": 3,
            "retry_budget_percent": 10,
            "try_timeout_s": 2,
            "weights": {"web-1": 2},
        }
    )
    assert config.strategy is StrategyName.HASH
    assert config.hash_epsilon == 0.5
    assert config.health.slow_start.window_s == 4
    assert config.health.checks.enabled
    assert config.health.checks.interval_s == 0.5
    assert config.health.checks.fall == 3
    assert config.retry_budget.budget_percent == 10
    assert config.try_timeout_s == 2
    assert weights == {"web-1": 2.0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "fastest"}, "unknown strategy"),
        ({"stratgy": "random"}, "unknown balancing key"),
        ({"check_rise": 0}, "check_rise"),
        ({"check_rise": True}, "check_rise must be a int"),
        ({"slow_start_s": -1}, "negative"),
        ({"hash_key": "cookie:x"}, "hash_key"),
        ({"weights": {"a": 0}}, "weights.a"),
        ({"max_tries": 0}, "positive"),
    ],
)
def test_parse_settings_refuses_bad_values(settings: dict[str, object], message: str) -> None:
    with pytest.raises(BalancerConfigError, match=message):
        parse_settings(settings)


def test_key_functions() -> None:
    headers = [("X-User", "u-7")]
    assert key_function("header:x-user")("/v1/a", headers) == b"u-7"
    assert key_function("header:x-other")("/v1/a", headers) is None
    assert key_function("path:2")("/v1/users/42/photos?x=1", ()) == b"42"
    assert key_function("path:9")("/v1/users", ()) is None
    assert key_function("path")("/v1/users?x=1", ()) == b"/v1/users"
