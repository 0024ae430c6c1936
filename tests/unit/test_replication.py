"""Replica read routing, LSN tokens, synchronous standby names, topology keys (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.storage import (
    PRIMARY,
    Consistency,
    PrimaryView,
    ReadPolicy,
    ReadRefused,
    ReplicationMode,
    ReplicaView,
    choose_read,
    format_lsn,
    format_read_after,
    merge_read_after,
    parse_lsn,
    parse_read_after,
    synchronous_standby_names,
)
from photostack.cluster.topology import TopologyError, parse_topology
from photostack.ops._replication_status import replication_rows
from photostack.service.directory import ClusterMap, Endpoint, PhysicalShard, initial_map

NOW = 100.0
UP = PrimaryView(reachable=True, confirmed=True, lsn=1000)


def replica(name: str, lag_s: float = 0.1, replay: int = 990, **kw: object) -> ReplicaView:
    base: dict[str, object] = {
        "name": name,
        "reachable": True,
        "streaming": True,
        "replay_lsn": replay,
        "lag_bytes": 1000 - replay,
        "lag_s": lag_s,
        "sampled_at": NOW,
    }
    base.update(kw)
    return ReplicaView(**base)  # type: ignore[arg-type]


SPLIT = ReadPolicy(Consistency.CP, max_lag_s=1.0)


def test_reads_go_to_a_replica_within_bound_round_robin() -> None:
    replicas = [replica("r1"), replica("r2")]
    targets = {choose_read(SPLIT, UP, replicas, now=NOW, turn=t).target for t in range(4)}
    assert targets == {"r1", "r2"}


def test_lagging_not_streaming_stale_sample_or_unreachable_replicas_are_skipped() -> None:
    replicas = [
        replica("slow", lag_s=5.0),
        replica("cut", streaming=False),
        replica("old", sampled_at=NOW - 10),
        replica("gone", reachable=False),
    ]
    decision = choose_read(SPLIT, UP, replicas, now=NOW)
    assert decision.target == PRIMARY
    assert not decision.stale


def test_zero_bound_means_primary_only() -> None:
    policy = ReadPolicy(Consistency.AP, max_lag_s=0.0)
    assert choose_read(policy, UP, [replica("r1", lag_s=0)], now=NOW).on_primary


def test_read_your_writes_token_needs_a_replica_past_it() -> None:
    replicas = [replica("behind", replay=900), replica("ahead", replay=995)]
    assert choose_read(SPLIT, UP, replicas, now=NOW, read_after=950).target == "ahead"
    assert choose_read(SPLIT, UP, replicas, now=NOW, read_after=999).on_primary


@pytest.mark.parametrize(
    "primary", [PrimaryView(False, False), PrimaryView(True, False, 1000)], ids=["down", "fenced"]
)
def test_cp_refuses_when_the_primary_is_not_usable(primary: PrimaryView) -> None:
    with pytest.raises(ReadRefused):
        choose_read(SPLIT, primary, [replica("r1")], now=NOW)


def test_ap_serves_the_freshest_copy_marked_stale() -> None:
    ap = ReadPolicy(Consistency.AP, max_lag_s=1.0)
    down = PrimaryView(False, False)
    replicas = [replica("old", replay=100, lag_s=50), replica("new", replay=500, lag_s=20)]
    decision = choose_read(ap, down, replicas, now=NOW)
    assert (decision.target, decision.stale) == ("new", True)
    unconfirmed = choose_read(ap, PrimaryView(True, False, 1000), replicas, now=NOW)
    assert unconfirmed.on_primary
    assert unconfirmed.stale
    with pytest.raises(ReadRefused):
        choose_read(ap, down, [replica("gone", reachable=False)], now=NOW)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_lsn_round_trip(value: int) -> None:
    assert parse_lsn(format_lsn(value)) == value


def test_lsn_text_matches_postgres() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    for bad in ("", "16", "x/1", "1/2/3", "123456789/0"):
        with pytest.raises(ValueError, match="LSN"):
            parse_lsn(bad)


def test_read_after_tokens_ignore_garbage_and_keep_the_maximum() -> None:
    token = parse_read_after("users-1=0/10;social-2=0/20;bad;x=1/1;users-1=0/5;photos-1=zz")
    assert token == {"users-1": 0x10, "social-2": 0x20}
    assert parse_read_after(None) == {}
    merged = merge_read_after(token, {"users-1": 0x30})
    assert (
        parse_read_after(format_read_after(merged))
        == merged
        == {
            "users-1": 0x30,
            "social-2": 0x20,
        }
    )


def test_synchronous_standby_names() -> None:
    assert synchronous_standby_names(ReplicationMode.ASYNC, ["a"]) == ""
    assert synchronous_standby_names(ReplicationMode.SYNC, []) == ""
    assert (
        synchronous_standby_names(ReplicationMode.REMOTE_APPLY, ["u-1-replica-1", 'we"ird'])
        == 'FIRST 1 ("u-1-replica-1", "we""ird")'
    )


_BASE = """
[storage.users]
shards = 1
replicas = {replicas}
{extra}
[storage.social]
shards = 1
[storage.photos]
shards = 1
"""


def test_topology_reads_replication_keys() -> None:
    topo = parse_topology(
        _BASE.format(
            replicas=2,
            extra='replication = "sync"\nconsistency = "ap"\nmax_replica_lag_s = 0.5',
        )
    )
    users = topo.group("users")
    assert (users.replication, users.consistency, users.max_replica_lag_s) == ("sync", "ap", 0.5)
    social = topo.group("social")
    assert (social.replication, social.consistency, social.max_replica_lag_s) == (
        "async",
        "cp",
        0.0,
    )


@pytest.mark.parametrize(
    ("replicas", "extra", "message"),
    [
        (1, 'replication = "semi"', "replication must be"),
        (1, 'consistency = "ca"', "consistency must be"),
        (1, "max_replica_lag_s = -1", "max_replica_lag_s"),
        (0, 'replication = "sync"', "needs replicas >= 1"),
        (1, "lag_bound = 1", "unknown key 'lag_bound'"),
    ],
)
def test_topology_refuses_bad_replication_keys(replicas: int, extra: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(_BASE.format(replicas=replicas, extra=extra))


def test_the_map_carries_epochs_and_a_failover_moves_the_primary() -> None:
    shard = PhysicalShard(0, Endpoint("p", "dsn-p"), (Endpoint("r1", "d1"), Endpoint("r2", "d2")))
    first = initial_map({"users": [shard]})
    assert first.group("users").shards[0].epoch == 1
    moved = shard.failed_over_to("r2")
    assert (moved.primary.name, [r.name for r in moved.replicas], moved.epoch) == (
        "r2",
        ["r1", "p"],
        2,
    )
    second = first.successor(shards={"users": [moved]})
    again = ClusterMap.from_json(second.to_json())
    assert again.group("users").shards[0].epoch == 2
    assert again.version == 2
    legacy = first.to_json()
    del legacy["groups"]["users"]["shards"][0]["epoch"]
    assert ClusterMap.from_json(legacy).group("users").shards[0].epoch == 1


def test_status_rows_show_mode_cost_epoch_and_lag() -> None:
    view = {
        "shards": {
            "users-1": {
                "primary": "users-1-replica-1",
                "epoch": 2,
                "replication": "sync",
                "consistency": "cp",
                "phase": "healthy",
                "replicas": {
                    "users-1-primary": {"lag_bytes": 0, "lag_s": 0.002, "sync_state": "sync"},
                    "users-1-replica-2": {"lag_bytes": None, "reachable": False},
                },
            }
        }
    }
    [row] = replication_rows(view)
    assert row[:3] == ["users-1", "users-1-replica-1", "2"]
    assert row[3].startswith("sync: ")
    assert row[4].startswith("cp: partition: 503")
    assert row[6] == "users-1-primary sync: 0B/0.002s; users-1-replica-2: down"
