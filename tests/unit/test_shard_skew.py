"""Shard skew (std/mean) from per-shard rows and transaction counters; its status lines."""

from __future__ import annotations

import pytest

from photostack.ops._shard_status import skew_lines
from photostack.service._hotshard import GroupLoad, SkewTracker, spread


def test_spread_is_std_over_mean() -> None:
    assert spread([10.0, 10.0, 10.0]) == 0.0
    assert spread([5.0, 15.0]) == pytest.approx(0.5)
    assert spread([7.0]) == 0.0  # nothing to compare
    assert spread([0.0, 0.0]) == 0.0  # no load at all


def test_tracker_gives_tps_since_the_previous_sample() -> None:
    now = [100.0]
    tracker = SkewTracker(clock=lambda: now[0])
    first = tracker.observe("social", ["a", "b"], [10, 30], [1000, 2000])
    assert first.tps is None
    assert first.load_skew is None
    assert first.rows_skew == pytest.approx(0.5)
    now[0] = 102.0
    second = tracker.observe("social", ["a", "b"], [10, 30], [1201, 2041])
    assert second.tps == pytest.approx((100.0, 20.0))  # (rise - our own sample) / 2 s
    assert second.load_skew == pytest.approx(spread([100.0, 20.0]))
    # the shard list changed (a reshard): no rate across different shards
    now[0] = 103.0
    third = tracker.observe("social", ["a", "b", "c"], [10, 20, 10], [1300, 2100, 5])
    assert third.tps is None
    assert third.to_json()["rows"] == [10, 20, 10]


def test_group_load_reports_std_over_mean_and_the_hottest() -> None:
    load = GroupLoad("social", (90.0, 10.0))
    body = load.to_json()
    assert body["skew"] == pytest.approx(0.8)
    assert body["max_over_mean"] == pytest.approx(1.8)
    assert body["hottest"] == 1


def test_status_lines() -> None:
    view = {
        "map_version": 3,
        "groups": [
            {"group": "photos", "error": "ConnectionRefusedError()"},
            {"group": "social", "rows": [10, 30], "rows_skew": 0.5, "tps": None},
            {"group": "users", "rows": [4], "rows_skew": 0.0, "tps": [1.5], "load_skew": 0.0},
        ],
    }
    assert skew_lines(view) == [
        "photos: shards unreadable (ConnectionRefusedError())",
        "social: rows per shard [10, 30] skew (std/mean) 0.500",
        "users: rows per shard [4] skew (std/mean) 0.000; tx/s [1.5] load skew 0.000",
    ]
