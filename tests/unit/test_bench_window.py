"""How many requests a target is measured with."""

from __future__ import annotations

from photostack.ops.bench import requests_for_window


def test_a_slow_target_gets_the_requested_count() -> None:
    assert requests_for_window(3000, 300, 1.0, 2.0) == 3000  # 300 req/s: 3000 take 10 s


def test_a_fast_target_gets_enough_for_the_minimum_window() -> None:
    assert requests_for_window(3000, 300, 0.01, 2.0) == 60000  # 30,000 req/s for 2 s


def test_no_warmup_figures_leave_the_count_alone() -> None:
    assert requests_for_window(3000, 0, 0.0, 2.0) == 3000
    assert requests_for_window(3000, 10, 0.0, 2.0) == 3000
