"""CPU accounting over a window, and how cluster nodes map to tiers."""

from __future__ import annotations

import math
import os

import pytest

from photostack.ops._bench_cpu import (
    MachineSample,
    TierRoots,
    busy_fraction,
    cpu_used_s,
    sample_machine,
    sample_self,
    sample_tiers,
    tier_cpu_used_s,
)
from photostack.ops._bench_procs import BenchError, ClusterNode, tier_roots


def test_cpu_used_is_the_delta_per_process_identity() -> None:
    before = {(10, 1.0): 2.0, (11, 1.0): 5.0, (12, 1.0): 1.0}
    after = {(10, 1.0): 2.5, (11, 1.0): 5.25, (13, 9.0): 0.5}  # 12 exited, 13 started
    assert cpu_used_s(before, after) == pytest.approx(0.5 + 0.25 + 0.5)


def test_a_reused_pid_is_a_new_process() -> None:
    before = {(10, 1.0): 7.0}
    after = {(10, 2.0): 0.25}
    assert cpu_used_s(before, after) == pytest.approx(0.25)


def test_a_counter_going_backwards_counts_zero() -> None:
    assert cpu_used_s({(1, 1.0): 3.0}, {(1, 1.0): 2.0}) == 0.0


def test_tier_totals_keep_the_given_order_and_fill_missing_tiers() -> None:
    before = {"web": {(1, 1.0): 1.0}}
    after = {"web": {(1, 1.0): 1.5}, "edge": {(2, 1.0): 0.25}}
    totals = tier_cpu_used_s(("edge", "web", "cache"), before, after)
    assert list(totals) == ["edge", "web", "cache"]
    assert totals == {"edge": 0.25, "web": 0.5, "cache": 0.0}


def test_sampling_a_real_tree_includes_the_root_and_skips_vanished_pids() -> None:
    samples = sample_tiers([TierRoots("self", (os.getpid(),)), TierRoots("gone", (2**22 + 1,))])
    assert os.getpid() in {pid for pid, _ in samples["self"]}
    assert samples["gone"] == {}
    assert sample_self() > 0


def test_machine_busy_fraction_is_busy_over_all_cpu_time() -> None:
    before = MachineSample(busy_s=10.0, idle_s=100.0)
    after = MachineSample(busy_s=13.0, idle_s=101.0)
    assert busy_fraction(before, after) == pytest.approx(0.75)
    assert math.isnan(busy_fraction(before, before))
    now = sample_machine()
    assert now.busy_s > 0
    assert now.idle_s >= 0


def _node(name: str, role: str, pid: int | None, group: str | None = None) -> ClusterNode:
    return ClusterNode(name=name, role=role, group=group, pid=pid, state="ready")


def test_storage_nodes_form_the_postgres_tier() -> None:
    nodes = [
        _node("edge-1", "edge", 1),
        _node("web-1", "web", 2),
        _node("web-2", "web", 3),
        _node("users-1-primary", "storage", 4, "users"),
        _node("social-1-replica-1", "storage", 5, "social"),
    ]
    roots = tier_roots(nodes, ("edge", "web", "app", "postgres"))
    assert roots == [
        TierRoots("edge", (1,)),
        TierRoots("web", (2, 3)),
        TierRoots("app", ()),
        TierRoots("postgres", (4, 5)),
    ]


def test_a_measured_node_without_a_process_is_refused() -> None:
    nodes = [_node("web-1", "web", None), _node("cache-1", "cache", None)]
    with pytest.raises(BenchError, match="web-1"):
        tier_roots(nodes, ("web",))
    assert tier_roots(nodes[1:], ("web",)) == [TierRoots("web", ())]
