"""Online resharding, the pure half: which logical shards move, and the move's state machine.

No I/O here. :mod:`._reshard` runs a plan against real shards and persists every step.

- :func:`plan_add`: a new physical shard takes the minimal set of logical shards that leaves every
  physical shard with ``floor`` or ``ceil`` of ``L / (n + 1)`` logical shards, taken from the
  fullest shards first. Keys moved / ideal ``k / (n + 1)`` is ``floor(L/(n+1)) / (L/(n+1)) <= 1``.
- :func:`plan_remove`: a shard's logical shards go to the emptiest remaining shards.
- :func:`plan_hot`: logical shards off the hottest physical shard onto the coolest one, enough to
  bring both to the mean (each logical shard of a shard assumed to carry an equal share).
- :class:`MoveState` with :data:`TRANSITIONS`: every persisted step; :func:`advance` refuses any
  other transition (:class:`IllegalTransitionError`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CANCELLABLE",
    "GROUP_TABLES",
    "NEXT",
    "SUPPORTED_GROUPS",
    "TERMINAL",
    "TRANSITIONS",
    "IllegalTransitionError",
    "MoveKind",
    "MovePlan",
    "MoveState",
    "ReshardError",
    "Table",
    "advance",
    "check_supported",
    "ideal_fraction",
    "plan_add",
    "plan_hot",
    "plan_remove",
    "skew",
    "sources_of",
]


class ReshardError(Exception):
    """Root of every resharding error. ``str(exc)`` is a one-line reason for the user."""


class IllegalTransitionError(ReshardError):
    """A move asked to go from one state to a state the table does not allow."""


class MoveKind(enum.Enum):
    ADD_SHARD = "add-shard"
    REMOVE_SHARD = "remove-shard"
    HOT_SHARD = "hot-shard"


class MoveState(enum.Enum):
    """The phase a move is in; the executor runs that phase's (idempotent) step, then advances."""

    PLANNED = "planned"  # persisted, nothing touched yet
    CAPTURING = "capturing"  # installing change capture on the sources (every write logged)
    BACKFILLING = "backfilling"  # copying the moving rows in keyset batches (cursor persisted)
    CATCHING_UP = "catching-up"  # replaying captured changes onto the target(s)
    FENCING = "fencing"  # sources give up ownership: guarded writes there answer "wrong shard"
    CLAIMING = "claiming"  # final replay, then the target(s) own the moved logical shards
    PUBLISHING = "publishing"  # the map's next version routes the moved logical shards anew
    CLEANING = "cleaning"  # capture dropped, old copies deleted from the sources
    DONE = "done"
    CANCELLING = "cancelling"  # capture dropped, the targets' copies deleted (before FENCING)
    CANCELLED = "cancelled"


TRANSITIONS: dict[MoveState, frozenset[MoveState]] = {
    MoveState.PLANNED: frozenset({MoveState.CAPTURING, MoveState.CANCELLING}),
    MoveState.CAPTURING: frozenset({MoveState.BACKFILLING, MoveState.CANCELLING}),
    MoveState.BACKFILLING: frozenset({MoveState.CATCHING_UP, MoveState.CANCELLING}),
    MoveState.CATCHING_UP: frozenset({MoveState.FENCING, MoveState.CANCELLING}),
    MoveState.FENCING: frozenset({MoveState.CLAIMING}),
    MoveState.CLAIMING: frozenset({MoveState.PUBLISHING}),
    MoveState.PUBLISHING: frozenset({MoveState.CLEANING}),
    MoveState.CLEANING: frozenset({MoveState.DONE}),
    MoveState.DONE: frozenset(),
    MoveState.CANCELLING: frozenset({MoveState.CANCELLED}),
    MoveState.CANCELLED: frozenset(),
}
# The forward path: the state each step leads to.
NEXT: dict[MoveState, MoveState] = {
    MoveState.PLANNED: MoveState.CAPTURING,
    MoveState.CAPTURING: MoveState.BACKFILLING,
    MoveState.BACKFILLING: MoveState.CATCHING_UP,
    MoveState.CATCHING_UP: MoveState.FENCING,
    MoveState.FENCING: MoveState.CLAIMING,
    MoveState.CLAIMING: MoveState.PUBLISHING,
    MoveState.PUBLISHING: MoveState.CLEANING,
    MoveState.CLEANING: MoveState.DONE,
    MoveState.CANCELLING: MoveState.CANCELLED,
}
TERMINAL = frozenset({MoveState.DONE, MoveState.CANCELLED})
# Before the fence nothing outside the move's own bookkeeping has changed: cancel is safe.
CANCELLABLE = frozenset(
    {MoveState.PLANNED, MoveState.CAPTURING, MoveState.BACKFILLING, MoveState.CATCHING_UP}
)


def advance(current: MoveState, new: MoveState) -> MoveState:
    """``new`` when the table allows ``current -> new``; raises IllegalTransitionError."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"a {current.value} move cannot become {new.value}")
    return new


@dataclass(frozen=True)
class Table:
    """A table that moves with its sharding key: ``key`` picks the logical shard, ``pk`` pages."""

    name: str
    key: str
    pk: tuple[str, ...]


GROUP_TABLES: dict[str, tuple[Table, ...]] = {
    "social": (
        Table("following", "user_id", ("user_id", "target_id")),
        Table("followers", "user_id", ("user_id", "follower_id")),
    ),
    "photos": (Table("photos", "owner_id", ("id",)),),
    "users": (
        Table("users", "id", ("id",)),
        Table("usernames", "username", ("username",)),
        Table("event_seqs", "user_id", ("user_id",)),
        Table("events", "user_id", ("user_id", "seq")),
        Table("user_deletions", "user_id", ("user_id",)),
        # keyed by the job's name (service/_jobs_lease.py): its saved cursor and its lease on the
        # users shard owning that name, so a move carries them like any row, behind the fence
        Table("job_state", "job", ("job",)),
    ),
}
# Groups a move may touch: every row of their tables is placed by a key (above) and every write
# to them runs behind the ownership fence (the stores, event appends, the jobs' writes and
# leases, a failed sign-up's claim release: service/_fenced.py, docs/directory.md).
SUPPORTED_GROUPS = frozenset(GROUP_TABLES)
UNSUPPORTED_WHY = {
    "directory": "it is the shard map's own database",
}


def check_supported(group: str) -> None:
    """Raises ReshardError (one line) unless moves of ``group`` are supported."""
    if group not in SUPPORTED_GROUPS:
        why = UNSUPPORTED_WHY.get(group, "no resharding plan for it")
        raise ReshardError(
            f"resharding {group!r} is not supported yet ({why}); "
            f"supported: {', '.join(sorted(SUPPORTED_GROUPS))}"
        )


@dataclass(frozen=True)
class MovePlan:
    """Which logical shards move where. ``moves``: logical shard -> target physical shard.

    ``new_shard``: the index of the physical shard this move adds (None: no shard added);
    ``removed_shard``: the index it empties (None: none).
    """

    kind: MoveKind
    group: str
    moves: Mapping[int, int]
    shard_count: int  # physical shards before the move
    logical_shards: int
    new_shard: int | None = None
    removed_shard: int | None = None

    def moved_fraction(self) -> float:
        return len(self.moves) / self.logical_shards


def sources_of(placement: Sequence[int], moves: Mapping[int, int]) -> dict[int, list[int]]:
    """source physical shard -> the logical shards leaving it, ascending."""
    out: dict[int, list[int]] = {}
    for logical in sorted(moves):
        out.setdefault(placement[logical], []).append(logical)
    return out


def _counts(placement: Sequence[int], shards: int) -> list[list[int]]:
    owned: list[list[int]] = [[] for _ in range(shards)]
    for logical, physical in enumerate(placement):
        owned[physical].append(logical)
    return owned


def _check(group: str, placement: Sequence[int], shards: int) -> None:
    if shards < 1 or not placement:
        raise ReshardError(f"{group}: no shards to move")
    bad = [p for p in placement if not 0 <= p < shards]
    if bad:
        raise ReshardError(f"{group}: placement names shard {bad[0]} of {shards}")


def ideal_fraction(shards_before: int) -> float:
    """The ideal share of keys a new shard takes: ``1 / (n + 1)``."""
    return 1.0 / (shards_before + 1)


def plan_add(group: str, placement: Sequence[int], shards: int) -> MovePlan:
    """Add physical shard ``shards`` (0-based: the next index) and move to it the fewest logical
    shards that leave every shard with floor or ceil of ``L / (n + 1)``, fullest shards first
    (ties: the higher index), each giving its highest-numbered logical shards."""
    _check(group, placement, shards)
    total = len(placement)
    new_count = shards + 1
    quota = total // new_count  # the new shard's share (the floor: never over the ideal)
    owned = _counts(placement, shards)
    moves: dict[int, int] = {}
    for _ in range(quota):
        donor = max(range(shards), key=lambda s: (len(owned[s]), s))
        moves[owned[donor].pop()] = shards
    return MovePlan(MoveKind.ADD_SHARD, group, moves, shards, total, new_shard=shards)


def plan_remove(group: str, placement: Sequence[int], shards: int, removed: int) -> MovePlan:
    """Empty physical shard ``removed``: each of its logical shards goes to the remaining shard
    that owns the fewest (ties: the lower index). Raises ReshardError."""
    _check(group, placement, shards)
    if not 0 <= removed < shards:
        raise ReshardError(f"{group} has no shard {removed + 1} (shards 1..{shards})")
    if shards == 1:
        raise ReshardError(f"{group} has one shard; it cannot be removed")
    owned = _counts(placement, shards)
    counts = {s: len(owned[s]) for s in range(shards) if s != removed}
    moves: dict[int, int] = {}
    for logical in owned[removed]:
        target = min(counts, key=lambda s: (counts[s], s))
        moves[logical] = target
        counts[target] += 1
    return MovePlan(
        MoveKind.REMOVE_SHARD, group, moves, shards, len(placement), removed_shard=removed
    )


def skew(loads: Sequence[float]) -> float:
    """Hottest over mean (1.0 = even; 0 when there is no load)."""
    if not loads:
        return 0.0
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 0.0


def plan_hot(
    group: str, placement: Sequence[int], shards: int, loads: Sequence[float]
) -> MovePlan | None:
    """Move logical shards from the hottest physical shard to the coolest, assuming the hot
    shard's load is spread evenly over its logical shards: as many as bring the hot shard
    nearest the mean of the two. None when nothing would improve (one shard, even load, or a
    hot shard with a single logical shard left)."""
    _check(group, placement, shards)
    if len(loads) != shards:
        raise ReshardError(f"{group}: {len(loads)} load figures for {shards} shards")
    if shards < 2:
        return None
    hot = max(range(shards), key=lambda s: (loads[s], -s))
    cool = min(range(shards), key=lambda s: (loads[s], s))
    owned = _counts(placement, shards)
    if hot == cool or loads[hot] <= 0 or len(owned[hot]) < 2:
        return None
    per_logical = loads[hot] / len(owned[hot])
    count = int((loads[hot] - loads[cool]) / 2 / per_logical)
    count = min(count, len(owned[hot]) - 1)
    if count < 1:
        return None
    moves = {logical: cool for logical in owned[hot][-count:]}
    return MovePlan(MoveKind.HOT_SHARD, group, moves, shards, len(placement))
