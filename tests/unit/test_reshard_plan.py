"""The pure half of resharding: which logical shards move, and the move's state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.service._reshard_plan import (
    CANCELLABLE,
    NEXT,
    TERMINAL,
    TRANSITIONS,
    IllegalTransitionError,
    MoveState,
    ReshardError,
    advance,
    ideal_fraction,
    plan_add,
    plan_hot,
    plan_remove,
    skew,
    sources_of,
)


def _placement(shards: int, per: int = 64) -> list[int]:
    return [i % shards for i in range(per * shards)]


def _apply(placement: list[int], moves: dict[int, int]) -> list[int]:
    return [moves.get(i, p) for i, p in enumerate(placement)]


@given(st.integers(1, 12), st.sampled_from([16, 64]))
def test_add_moves_the_ideal_share_and_balances(shards: int, per: int) -> None:
    placement = _placement(shards, per)
    plan = plan_add("social", placement, shards)
    total = len(placement)
    assert plan.new_shard == shards
    assert set(plan.moves.values()) == {shards}
    assert len(plan.moves) / total <= 1.05 * ideal_fraction(shards)
    after = _apply(placement, dict(plan.moves))
    counts = [after.count(s) for s in range(shards + 1)]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == total


@given(st.lists(st.integers(0, 3), min_size=8, max_size=200))
def test_add_on_an_uneven_placement_takes_from_the_fullest(raw: list[int]) -> None:
    shards = max(raw) + 1
    plan = plan_add("photos", raw, shards)
    after = _apply(raw, dict(plan.moves))
    assert len(plan.moves) == len(raw) // (shards + 1)
    for logical in plan.moves:  # only moved logical shards changed, each to the new shard
        assert after[logical] == shards
    counts = [after.count(s) for s in range(shards)]
    before = [raw.count(s) for s in range(shards)]
    assert max(counts) <= max(before)


@given(st.integers(2, 10), st.data())
def test_remove_empties_one_shard_onto_the_emptiest(shards: int, data: st.DataObject) -> None:
    placement = _placement(shards)
    removed = data.draw(st.integers(0, shards - 1))
    plan = plan_remove("social", placement, shards, removed)
    after = _apply(placement, dict(plan.moves))
    assert removed not in after
    assert set(plan.moves) == {i for i, p in enumerate(placement) if p == removed}
    counts = [after.count(s) for s in range(shards) if s != removed]
    assert max(counts) - min(counts) <= 1


def test_bad_input_is_one_line() -> None:
    with pytest.raises(ReshardError, match="no shard 4"):
        plan_remove("social", _placement(2), 2, 3)
    with pytest.raises(ReshardError, match="one shard"):
        plan_remove("social", _placement(1), 1, 0)
    with pytest.raises(ReshardError, match="names shard 5"):
        plan_add("social", [0, 5], 2)
    with pytest.raises(ReshardError, match="load figures"):
        plan_hot("social", _placement(2), 2, [1.0])


def test_hot_moves_off_the_hottest_onto_the_coolest() -> None:
    placement = _placement(3)
    plan = plan_hot("social", placement, 3, [10.0, 90.0, 20.0])
    assert plan is not None
    assert set(plan.moves.values()) == {0}
    assert {placement[i] for i in plan.moves} == {1}
    assert len(plan.moves) == int((90 - 10) / 2 / (90 / 64))
    assert plan_hot("social", placement, 3, [30.0, 30.0, 30.0]) is None
    assert plan_hot("social", [0], 1, [5.0]) is None
    assert skew([10.0, 90.0, 20.0]) == pytest.approx(90 / 40)
    assert skew([]) == 0.0


def test_sources_of_groups_by_old_owner() -> None:
    assert sources_of([0, 1, 0, 1], {3: 2, 0: 2, 2: 2}) == {0: [0, 2], 1: [3]}


def test_state_machine_refuses_illegal_transitions() -> None:
    for state, allowed in TRANSITIONS.items():
        for other in MoveState:
            if other in allowed:
                assert advance(state, other) is other
            else:
                with pytest.raises(IllegalTransitionError):
                    advance(state, other)


def test_every_persisted_step_has_one_way_forward() -> None:
    """Resume runs the step of the persisted state, then NEXT[state]: every non-terminal state
    has exactly that way on, and it is allowed by the table; cancel only before the fence."""
    for state in MoveState:
        if state in TERMINAL:
            assert state not in NEXT
            assert TRANSITIONS[state] == frozenset()
            continue
        assert NEXT[state] in TRANSITIONS[state]
        cancellable = MoveState.CANCELLING in TRANSITIONS[state]
        assert cancellable == (state in CANCELLABLE)
    state = MoveState.PLANNED
    path = [state]
    while state in NEXT:
        state = NEXT[state]
        path.append(state)
    assert path[-1] is MoveState.DONE
    assert MoveState.FENCING in path
    assert path.index(MoveState.FENCING) > max(path.index(s) for s in CANCELLABLE)
