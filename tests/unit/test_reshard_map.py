"""remove-shard against the shard map: shards found by member names, renumbered at cut-over."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.storage import logical_name
from photostack.service._reshard_map import locate, removal_successor
from photostack.service._reshard_plan import ReshardError, plan_remove, sources_of
from photostack.service.directory import ClusterMap, Endpoint, PhysicalShard, initial_map


def _map(shards: int) -> ClusterMap:
    return initial_map(
        {
            "social": [
                PhysicalShard(i, Endpoint(f"social-{i + 1}-primary", f"postgresql://h/{i}"))
                for i in range(shards)
            ],
            "users": [PhysicalShard(0, Endpoint("users-1-primary", "postgresql://h/u"))],
        }
    )


def _plan(current: ClusterMap, removed: int) -> dict[str, Any]:
    group = current.group("social")
    placement = [group.placement.entries[logical_name(i)] for i in range(group.logical_shards)]
    move = plan_remove("social", placement, len(group.shards), removed)
    return {
        "group": "social",
        "moves": {str(k): v for k, v in move.moves.items()},
        "shard_count": len(group.shards),
        "removed_shard": removed,
        "sources": {str(s): ls for s, ls in sources_of(placement, move.moves).items()},
        "members": {str(s.index): [e.name for e in (s.primary, *s.replicas)] for s in group.shards},
    }


@given(st.integers(2, 8), st.data())
def test_removal_renumbers_and_keeps_every_other_key_in_place(
    shards: int, data: st.DataObject
) -> None:
    current = _map(shards)
    removed = data.draw(st.integers(0, shards - 1))
    plan = _plan(current, removed)
    after = removal_successor(plan, current)
    assert after is not None
    assert after.version == current.version + 1
    old, new = current.group("social"), after.group("social")
    names = [s.primary.name for s in new.shards]
    assert names == [s.primary.name for s in old.shards if s.index != removed]
    assert [s.index for s in new.shards] == list(range(shards - 1))
    moved = {int(k) for k in plan["moves"]}
    for logical in range(old.logical_shards):
        key = logical_name(logical)
        server_before = old.shards[old.placement.entries[key]].primary.name
        server_after = new.shards[new.placement.entries[key]].primary.name
        if logical in moved:
            target = plan["members"][str(plan["moves"][str(logical)])][0]
            assert server_after == target != server_before
        else:
            assert server_after == server_before  # same server, maybe another number
    assert after.group("users").shards == current.group("users").shards
    # published already: nothing more to publish
    assert removal_successor(plan, after) is None


def test_shards_found_by_member_names_after_a_failover() -> None:
    current = _map(3)
    plan = _plan(current, 1)
    group = current.group("social")
    failed = PhysicalShard(
        2, Endpoint("social-3-replica-1", "postgresql://h/r"), (group.shards[2].primary,), 2
    )
    plan["members"]["2"] = ["social-3-primary", "social-3-replica-1"]
    moved = current.successor(shards={"social": [group.shards[0], group.shards[1], failed]})
    assert locate(plan, moved.group("social")) == {0: 0, 1: 1, 2: 2}
    after = removal_successor(plan, moved)
    assert after is not None
    social = after.group("social")
    assert [s.primary.name for s in social.shards] == ["social-1-primary", "social-3-replica-1"]
    assert social.shards[1].epoch == 2
    assert locate(plan, social) == {0: 0, 2: 1}  # the removed shard is gone


def test_a_target_missing_from_the_map_is_refused() -> None:
    current = _map(3)
    plan = _plan(current, 0)
    plan["members"]["2"] = ["someone-else"]
    with pytest.raises(ReshardError, match="not in the map"):
        removal_successor(plan, current)


def test_plans_without_member_names_map_by_position() -> None:
    current = _map(2)
    plan = _plan(current, 1)
    del plan["members"]
    assert locate(plan, current.group("social")) == {0: 0, 1: 1}
