"""Online resharding against the shard map: pure functions, no I/O.

A move's plan numbers physical shards as the map did when it was planned. Two things can change
those numbers before the move ends: a failover (a replica becomes the primary: same position,
other primary name) and the move's own cut-over when it removes a shard (every shard after the
removed one moves down a position, so the map's indexes stay ``0..n-1``). Shards are therefore
found again by their **members' node names** (:func:`locate`), never by position alone.

:func:`removal_successor` is the map a remove-shard publishes at its cut-over: the removed shard
gone, the shards after it renumbered, each moved logical shard on its target, every other
logical shard on the same server as before (its position number shifted with it).

:func:`plan_move` turns the current map and a request (add / remove / hot) into the plan a move
persists: the logical shards that move, the sources, each shard's member names and DSN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from photostack.blocks.storage import logical_name

from ._reshard_plan import (
    MoveKind,
    MovePlan,
    ReshardError,
    check_supported,
    ideal_fraction,
    plan_add,
    plan_hot,
    plan_remove,
    sources_of,
)
from .directory import ClusterMap, Endpoint, GroupPlacement, PhysicalShard

__all__ = ["locate", "plan_move", "removal_successor", "renumbered"]


def locate(plan: Mapping[str, Any], group: GroupPlacement) -> dict[int, int]:
    """plan's shard index -> its index in ``group`` now, for the shards ``group`` still lists.

    A shard is the one holding any of the node names it had at planning time (primary or
    replica). A plan without member names (older moves) maps each index to itself."""
    members: Mapping[str, list[str]] | None = plan.get("members")
    if members is None:
        return {i: i for i in range(min(int(plan["shard_count"]), len(group.shards)))}
    where: dict[int, int] = {}
    for index, names in members.items():
        wanted = set(names)
        for shard in group.shards:
            if wanted & {e.name for e in (shard.primary, *shard.replicas)}:
                where[int(index)] = shard.index
                break
    return where


def renumbered(shards: tuple[PhysicalShard, ...], gone: int) -> list[PhysicalShard]:
    """``shards`` without position ``gone``, the later ones moved down (indexes ``0..n-2``)."""
    kept = [s for s in shards if s.index != gone]
    return [PhysicalShard(i, s.primary, s.replicas, s.epoch) for i, s in enumerate(kept)]


def removal_successor(plan: Mapping[str, Any], current: ClusterMap) -> ClusterMap | None:
    """The next map version of a remove-shard move, or None when ``current`` already lacks the
    removed shard (published before a restart). Raises ReshardError when a moved logical
    shard's target, or a logical shard left on the removed shard, cannot be placed."""
    group_name = str(plan["group"])
    group = current.group(group_name)
    where = locate(plan, group)
    gone = where.get(int(plan["removed_shard"]))
    if gone is None:
        return None
    position = {s.index: new for new, s in enumerate(x for x in group.shards if x.index != gone)}
    moves = {int(k): int(v) for k, v in plan["moves"].items()}
    entries: dict[str, int] = {}
    for logical in range(group.logical_shards):
        name = logical_name(logical)
        physical = group.placement.entries[name]
        if logical in moves:
            target = where.get(moves[logical])
            if target is None or target == gone:
                raise ReshardError(
                    f"{group_name}: target shard {moves[logical] + 1} of logical shard "
                    f"{logical} is not in the map"
                )
            physical = target
        if physical == gone:
            raise ReshardError(
                f"{group_name}: logical shard {logical} is still on the shard being removed"
            )
        entries[name] = position[physical]
    return current.successor(
        placements={group_name: entries}, shards={group_name: renumbered(group.shards, gone)}
    )


def plan_move(
    current: ClusterMap,
    kind: MoveKind,
    group: str,
    *,
    new_endpoint: Endpoint | None = None,
    new_replicas: Sequence[Endpoint] = (),
    shard: int | None = None,
    loads: Sequence[float] | None = None,
    now: float = 0.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new move's persisted plan and its first progress, from the current map. ``shard`` is
    1-based (remove-shard). Raises ReshardError (unknown group or shard, unsupported group,
    the last shard, nothing to move...)."""
    if group not in current.groups:
        known = ", ".join(sorted(current.groups))
        raise ReshardError(f"unknown group {group!r} (groups: {known})")
    check_supported(group)
    placed = current.group(group)
    placement = [placed.placement.entries[logical_name(i)] for i in range(placed.logical_shards)]
    count = len(placed.shards)
    move: MovePlan | None
    if kind is MoveKind.ADD_SHARD:
        if new_endpoint is None:
            raise ReshardError("add-shard needs the new shard's endpoint")
        move = plan_add(group, placement, count)
    elif kind is MoveKind.REMOVE_SHARD:
        if shard is None:
            raise ReshardError("remove-shard needs a shard number")
        move = plan_remove(group, placement, count, shard - 1)
    else:
        move = plan_hot(group, placement, count, loads or [])
        if move is None:
            raise ReshardError(f"{group}: no hot shard to move (load is even enough)")
    body = {
        "kind": kind.value,
        "group": group,
        "moves": {str(k): v for k, v in move.moves.items()},
        "shard_count": count,
        "logical_shards": move.logical_shards,
        "new_shard": move.new_shard,
        "removed_shard": move.removed_shard,
        "new_endpoint": (
            {"name": new_endpoint.name, "dsn": new_endpoint.dsn} if new_endpoint else None
        ),
        # the new shard's streaming replicas: published with it, so failover watches them
        "new_replicas": [{"name": r.name, "dsn": r.dsn} for r in new_replicas],
        "base_version": current.version,
        "sources": {str(s): ls for s, ls in sources_of(placement, move.moves).items()},
        # Shards are found again by their members' node names, never by position alone: a
        # remove-shard renumbers the shards after the removed one at its cut-over, and a
        # failover may change a shard's primary mid-move.
        "members": {
            str(s.index): [e.name for e in (s.primary, *s.replicas)] for s in placed.shards
        },
        "dsns": {str(s.index): s.primary.dsn for s in placed.shards},
    }
    ideal: float | None = None
    if kind is MoveKind.ADD_SHARD:
        ideal = round(move.logical_shards * ideal_fraction(count), 2)
    elif kind is MoveKind.REMOVE_SHARD:
        ideal = float(len(move.moves))  # every key of the removed shard must move
    progress = {
        "logical_moved": len(move.moves),
        "logical_ideal": ideal,
        "started_at": now,
    }
    return body, progress
