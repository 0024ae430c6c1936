"""The failover coordinator's decisions, with a manual clock (no I/O)."""

from __future__ import annotations

import pytest

from photostack.blocks.storage import ReplicationMode
from photostack.service.directory._coordinator_policy import (
    Candidate,
    CoordinatorConfig,
    DecisionKind,
    ShardPhase,
    ShardWatch,
    Tally,
    Vote,
    choose_candidate,
    tally,
)

CONFIG = CoordinatorConfig(down_after_s=0.6, min_failover_interval_s=20.0)
SYNC, ASYNC = ReplicationMode.SYNC, ReplicationMode.ASYNC


def cand(name: str, lsn: int, **kw: object) -> Candidate:
    base: dict[str, object] = {
        "name": name,
        "reachable": True,
        "in_recovery": True,
        "receive_lsn": lsn,
        "replay_lsn": lsn,
    }
    base.update(kw)
    return Candidate(**base)  # type: ignore[arg-type]


def phase_of(watch: ShardWatch) -> ShardPhase:
    return watch.phase


DOWN = Tally(down=3, up=0, total=3)
UP = Tally(down=0, up=3, total=3)


def test_majority_of_all_observers_absent_ones_abstain() -> None:
    votes = [Vote("d1", True), Vote("d2", None), Vote("r1", True)]
    assert tally(votes, 3).majority_down
    assert not tally([Vote("d1", True), Vote("d2", None), Vote("r1", None)], 3).majority_down
    assert not tally([Vote("d1", True)], 3).majority_down  # one broken link is not a majority
    split = tally([Vote("d1", True), Vote("d2", True), Vote("r1", False)], 3)
    assert split.majority_down
    assert split.any_up


def test_fails_over_after_down_after_s_and_the_old_lease() -> None:
    watch = ShardWatch("users-1", CONFIG)
    replicas = [cand("r1", 100), cand("r2", 120)]
    watch.observe(DOWN, 10.0)
    assert watch.phase is ShardPhase.SUSPECT
    assert watch.decide(10.5, SYNC, replicas, lease_lapsed_at=0).kind is DecisionKind.NONE
    waiting = watch.decide(10.7, SYNC, replicas, lease_lapsed_at=12.0)
    assert (waiting.kind, waiting.candidate) == (DecisionKind.WAIT, "r2")
    assert watch.phase == ShardPhase.SUSPECT
    promote = watch.decide(12.1, SYNC, replicas, lease_lapsed_at=12.0)
    assert (promote.kind, promote.candidate) == (DecisionKind.PROMOTE, "r2")
    assert phase_of(watch) is ShardPhase.FAILING_OVER
    watch.failed_over(12.5)
    assert phase_of(watch) is ShardPhase.HEALTHY


def test_flapping_resets_the_clock_and_recovery_cancels() -> None:
    watch = ShardWatch("users-1", CONFIG)
    replicas = [cand("r1", 100)]
    watch.observe(DOWN, 10.0)
    watch.observe(Tally(down=2, up=1, total=3), 10.5)  # someone still sees it up
    assert watch.decide(10.7, ASYNC, replicas, 0).kind is DecisionKind.NONE
    watch.observe(UP, 10.8)
    assert watch.phase is ShardPhase.HEALTHY
    assert watch.down_since is None
    assert watch.decide(20.0, ASYNC, replicas, 0).kind is DecisionKind.NONE


def test_no_majority_never_fails_over() -> None:
    watch = ShardWatch("users-1", CONFIG)
    for t in range(10):
        watch.observe(Tally(down=1, up=0, total=3), float(t))
    assert watch.decide(100.0, SYNC, [cand("r1", 5)], 0).kind is DecisionKind.NONE


def test_anti_flap_refuses_a_second_failover_soon_after() -> None:
    watch = ShardWatch("users-1", CONFIG)
    watch.observe(DOWN, 0.0)
    assert watch.decide(1.0, ASYNC, [cand("r1", 5)], 0).kind is DecisionKind.PROMOTE
    watch.failed_over(1.0)
    watch.observe(DOWN, 2.0)
    refused = watch.decide(3.0, ASYNC, [cand("r2", 5)], 0)
    assert refused.kind is DecisionKind.REFUSE
    assert "anti-flap" in refused.reason
    assert watch.phase is ShardPhase.NO_CANDIDATE
    assert watch.decide(22.0, ASYNC, [cand("r2", 5)], 0).kind is DecisionKind.PROMOTE


def test_sync_group_promotes_only_a_replica_with_every_acknowledged_write() -> None:
    sync_gone = [cand("r1", 100, was_sync=True, reachable=False), cand("r2", 90)]
    refused = choose_candidate(SYNC, sync_gone, 1 << 20)
    assert refused.kind is DecisionKind.REFUSE
    assert "synchronous standby" in refused.reason
    ok = choose_candidate(SYNC, [cand("r1", 100, was_sync=True), cand("r2", 90)], 1 << 20)
    assert (ok.kind, ok.candidate) == (DecisionKind.PROMOTE, "r1")
    # a potential standby ahead of the sync one has every commit too
    ahead = choose_candidate(SYNC, [cand("r1", 100, was_sync=True), cand("r2", 110)], 1)
    assert ahead.candidate == "r2"


def test_async_group_refuses_a_replica_lagging_beyond_the_bound() -> None:
    lagging = choose_candidate(ASYNC, [cand("r1", 100, lag_bytes=10_000)], 4096)
    assert lagging.kind is DecisionKind.REFUSE
    assert "lagged" in lagging.reason
    unknown = choose_candidate(ASYNC, [cand("r1", 100, lag_bytes=None)], 4096)
    assert unknown.kind is DecisionKind.PROMOTE


def test_no_reachable_replica_in_recovery_is_no_candidate() -> None:
    replicas = [cand("r1", 5, reachable=False), cand("r2", 9, in_recovery=False)]
    assert choose_candidate(ASYNC, replicas, 1 << 30).kind is DecisionKind.REFUSE
    watch = ShardWatch("users-1", CONFIG)
    watch.observe(DOWN, 0.0)
    assert watch.decide(1.0, ASYNC, replicas, 0).kind is DecisionKind.REFUSE
    assert watch.phase is ShardPhase.NO_CANDIDATE
    watch.observe(DOWN, 1.5)  # still down: a candidate that appears is promoted
    assert watch.decide(2.0, ASYNC, [cand("r1", 5)], 0).kind is DecisionKind.PROMOTE


def test_transitions_outside_the_table_raise() -> None:
    watch = ShardWatch("users-1", CONFIG)
    with pytest.raises(ValueError, match="not allowed"):
        watch.to(ShardPhase.NO_CANDIDATE)
