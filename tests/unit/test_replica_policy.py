"""Keeping replicas attached to their primary: decisions with a manual clock (no I/O)."""

from __future__ import annotations

import pytest

from photostack.cluster._roles import replicas_to_rebuild
from photostack.service.directory._replica_policy import (
    ReplicaAction,
    ReplicaPolicy,
    ReplicaWatch,
    conninfo_address,
    dsn_address,
)

POLICY = ReplicaPolicy(reattach_after_s=1.0, repoint_interval_s=2.0, rebuild_after_s=10.0)


def test_an_attached_replica_is_kept() -> None:
    watch = ReplicaWatch("r1", POLICY)
    for t in range(20):
        watch.observe(judged=True, attached=True, now=float(t))
        assert watch.decide(float(t), points_at_primary=False) is ReplicaAction.KEEP


def test_a_detached_replica_naming_another_server_is_repointed_after_the_grace() -> None:
    watch = ReplicaWatch("r1", POLICY)
    watch.observe(judged=True, attached=False, now=0.0)
    assert watch.decide(0.5, points_at_primary=False) is ReplicaAction.KEEP
    watch.observe(judged=True, attached=False, now=1.0)
    assert watch.decide(1.0, points_at_primary=False) is ReplicaAction.REPOINT
    watch.repointed(1.0)
    # not again within the interval, even if the setting still reads old (reload pending)
    assert watch.decide(2.5, points_at_primary=False) is ReplicaAction.KEEP
    assert watch.decide(3.0, points_at_primary=False) is ReplicaAction.REPOINT


def test_one_attached_round_starts_the_count_over() -> None:
    watch = ReplicaWatch("r1", POLICY)
    watch.observe(judged=True, attached=False, now=0.0)
    watch.observe(judged=True, attached=True, now=0.9)
    watch.observe(judged=True, attached=False, now=1.2)
    assert watch.decide(1.5, points_at_primary=False) is ReplicaAction.KEEP
    assert watch.decide(2.2, points_at_primary=False) is ReplicaAction.REPOINT


def test_unjudged_rounds_never_act() -> None:
    """Primary unconfirmed or replica down: the failover's or the supervisor's business."""
    watch = ReplicaWatch("r1", POLICY)
    for t in range(30):
        watch.observe(judged=False, attached=False, now=float(t))
        assert watch.decide(float(t), points_at_primary=True) is ReplicaAction.KEEP
        assert watch.decide(float(t), points_at_primary=False) is ReplicaAction.KEEP


def test_pointed_at_the_primary_and_never_streaming_is_rebuilt() -> None:
    watch = ReplicaWatch("r1", POLICY)
    watch.observe(judged=True, attached=False, now=0.0)
    assert watch.decide(9.9, points_at_primary=True) is ReplicaAction.KEEP
    assert watch.decide(10.0, points_at_primary=True) is ReplicaAction.REBUILD


def test_the_rebuild_clock_starts_at_the_last_repoint() -> None:
    watch = ReplicaWatch("r1", POLICY)
    watch.observe(judged=True, attached=False, now=0.0)
    assert watch.decide(5.0, points_at_primary=False) is ReplicaAction.REPOINT
    watch.repointed(5.0)
    assert watch.decide(14.0, points_at_primary=True) is ReplicaAction.KEEP
    assert watch.decide(15.0, points_at_primary=True) is ReplicaAction.REBUILD


def test_policy_bounds() -> None:
    with pytest.raises(ValueError, match="reattach"):
        ReplicaPolicy(reattach_after_s=5.0, rebuild_after_s=5.0)
    with pytest.raises(ValueError, match="reattach"):
        ReplicaPolicy(reattach_after_s=0.0)


@pytest.mark.parametrize(
    ("conninfo", "address"),
    [
        ("host=127.0.0.1 port=5433 user=postgres application_name=r1", ("127.0.0.1", 5433)),
        (
            "user=postgres passfile='/var/lib/x/.pgpass' channel_binding=prefer "
            "host=127.0.0.1 port=40001 sslmode=prefer application_name=users-1-replica-1",
            ("127.0.0.1", 40001),
        ),
        ("host='10.0.0.2' port = '6000'", ("10.0.0.2", 6000)),
        ("hostaddr=10.0.0.3", ("10.0.0.3", 5432)),
        ("application_name='a \\' b' host=h port=1", ("h", 1)),  # libpq escapes with \\
        ("application_name='host=x port=9' host=h port=1", ("h", 1)),  # quoted, not a key
        ("", None),
        ("user=postgres", None),
        ("host=h port=notaport", None),
    ],
)
def test_conninfo_address(conninfo: str, address: tuple[str, int] | None) -> None:
    assert conninfo_address(conninfo) == address


def test_dsn_address() -> None:
    assert dsn_address("postgresql://postgres@127.0.0.1:5555/photostack") == ("127.0.0.1", 5555)
    assert dsn_address("postgresql://postgres@[::1]:5555/x") == ("::1", 5555)
    assert dsn_address("postgresql:///x") is None


def test_replicas_to_rebuild_needs_a_leader_and_a_reachable_primary() -> None:
    shard = {"primary": "p", "primary_reachable": True, "replicas": {"r": {"action": "rebuild"}}}
    assert replicas_to_rebuild({"leader": True, "shards": {"s": shard}}) == {"r": "p"}
    assert replicas_to_rebuild({"leader": False, "shards": {"s": shard}}) == {}
    assert replicas_to_rebuild(None) == {}
    unreachable = {**shard, "primary_reachable": False}
    assert replicas_to_rebuild({"leader": True, "shards": {"s": unreachable}}) == {}
    keep = {**shard, "replicas": {"r": {"action": "keep"}}}
    assert replicas_to_rebuild({"leader": True, "shards": {"s": keep}}) == {}
