"""How many requests a target is measured with."""

from __future__ import annotations

import math

from photostack.ops._bench_pathrun import requests_for_window


def test_a_slow_target_gets_the_requested_count() -> None:
    # 16 connections at 50 ms: 320 req/s, so 3000 requests take ~9 s
    assert requests_for_window(3000, 16, 0.050, 2.0) == 3000


def test_a_fast_target_gets_enough_for_the_minimum_window() -> None:
    # 16 connections at 0.5 ms: 32,000 req/s for 2 s
    assert requests_for_window(3000, 16, 0.0005, 2.0) == 64000


def test_no_warmup_figures_leave_the_count_alone() -> None:
    assert requests_for_window(3000, 16, math.nan, 2.0) == 3000
    assert requests_for_window(3000, 16, 0.0, 2.0) == 3000
