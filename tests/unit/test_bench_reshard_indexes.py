"""The `reshard` and `indexes` bench suites' pure parts: figures into report sections."""

from __future__ import annotations

import math

import pytest

from photostack.ops import bench
from photostack.ops._bench_indexes import ALL, PKEY_ONLY, IndexBenchConfig, TableCost, write_cost
from photostack.ops._bench_indexes import section as index_section
from photostack.ops._bench_report import Table, render_sections
from photostack.ops._bench_reshard import Figures, Loop, Workload
from photostack.ops._bench_reshard import section as reshard_section


def test_both_suites_are_registered() -> None:
    names = [s.name for s in bench.SUITES]
    assert "reshard" in names
    assert "indexes" in names


def test_write_cost_is_the_share_of_insert_time() -> None:
    assert write_cost(1.0) == 0.0
    assert write_cost(2.0) == pytest.approx(0.5)
    assert write_cost(1.25) == pytest.approx(0.2)
    assert math.isnan(write_cost(0.0))


def test_paired_ratio_is_the_median_of_each_rounds_cpu_ratio() -> None:
    cost = TableCost("photos", "photos", "photos_pkey", {"by_owner": "CREATE INDEX ..."})
    cost.rates = {ALL: [100.0, 50.0, 80.0], "by_owner": [150.0, 60.0, 120.0]}
    cost.cpu_us = {ALL: [15.0, 12.0, 30.0], "by_owner": [10.0, 10.0, 20.0]}
    assert cost.paired("by_owner") == pytest.approx(1.5)  # CPU ratios 1.5, 1.2, 1.5
    assert cost.median("by_owner") == 120.0  # wall rows/s, shown beside
    assert cost.cpu("by_owner") == 10.0
    assert math.isnan(cost.paired("missing"))


def test_index_section_lists_every_index_with_its_cost() -> None:
    cost = TableCost("social", "following", "following_pkey", {"following_by_recent": "x"})
    cost.rates = {ALL: [100.0, 100.0], "following_by_recent": [125.0, 125.0]}
    cost.cpu_us = {ALL: [10.0, 10.0], "following_by_recent": [8.0, 8.0]}
    text = render_sections((index_section([cost], IndexBenchConfig()),))
    assert "without following_by_recent" in text
    assert "| 1.25 |" in text
    assert "20 %" in text
    assert PKEY_ONLY not in text  # one secondary index: no separate pk-only variant


def test_reshard_section_compares_with_the_ideal_and_the_anchor() -> None:
    figures = Figures(
        anchor=Loop(ops=700, elapsed_s=10.0),
        during=Loop(ops=630, failed=0, elapsed_s=9.0),
        move={
            "moves": 42,
            "logical_shards": 128,
            "progress": {
                "rows_moved": 1900,
                "rows_total": 5500,
                "rows_ideal": 1833.3,
                "moved_vs_ideal": 1.036,
                "duration_s": 6.5,
                "cutover_s": 0.2,
            },
        },
        edges_checked=2700,
        unreadable=0,
        workers=6,
        keys_total=300,
        keys_moved=97,
    )
    result = reshard_section(figures)
    table = next(b for b in result.blocks if isinstance(b, Table))
    rows = {r[0]: r for r in table.rows}
    assert rows["logical shards moved"][3] == "0.984"  # 42/128 against 1/3
    assert rows["users (sharding keys) moved"][3] == "0.970"
    assert rows["requests/s during vs no move (anchor)"][3] == "1.00"
    assert rows["requests failed (goal 0)"][1] == "0"


def test_workload_slices_followers_between_workers() -> None:
    users = [{"id": f"u{i}", "token": f"t{i}"} for i in range(7)]
    work = Workload(users, 3)
    assert [len(s) for s in work.slices] == [3, 2, 2]
    assert sorted(u for part in work.slices for u in part) == sorted(work.ids)
    assert work.headers["u1"] == {"Authorization": "Bearer t1"}
