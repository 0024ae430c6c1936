"""Writes behind the ownership fence, for the code paths that are not the user store's.

A reshard's cut-over (service/_reshard.py) deletes a moving logical shard's ``shard_ownership``
row on the old owner; that delete waits for every transaction holding the row ``FOR SHARE``, and
afterwards :meth:`OwnershipGuard.verify` there raises WrongShardError. A write that skips the
check could commit on the old owner after the move's final replay and be lost with the old copy.
So every write to a moved table (``_reshard_plan.GROUP_TABLES``) runs through one of these:

- :func:`fenced`: ``action(conn)`` in one transaction on the shard of ``keys[0]``, every key's
  ownership verified first (the keys must share that shard: one user's rows, a username and its
  claim...), retried on the refreshed map while a cut-over is in progress.
- :func:`fenced_each`: ``action(conn, part)`` once per shard owning some of ``keys``, each part
  in its own guarded transaction. The parts are recomputed on every attempt, so a map that moved
  mid-way only re-splits what is left.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from photostack.blocks.storage import ShardRouter

from .directory import OwnershipGuard

__all__ = ["execute", "fenced", "fenced_each"]

T = TypeVar("T")


async def fenced(
    router: ShardRouter[Any],
    guard: OwnershipGuard,
    group: str,
    keys: Sequence[str],
    action: Callable[[Any], Awaitable[T]],
) -> T:
    """``action(conn)`` on the owner of ``keys`` (all on one shard), behind the fence.

    Raises WrongShardError when the shard still refuses after the guard's cut-over wait, and
    whatever ``action`` or the driver raises."""

    async def attempt() -> T:
        pool = router.shard_for(group, keys[0])
        async with pool.acquire() as conn, conn.transaction():
            for key in keys:
                await guard.verify(conn, group, key)
            return await action(conn)

    return await guard.retrying(attempt)


async def fenced_each(
    router: ShardRouter[Any],
    guard: OwnershipGuard,
    group: str,
    keys: Sequence[str],
    action: Callable[[Any, list[str]], Awaitable[object]],
) -> None:
    """``action(conn, part)`` for each shard's part of ``keys``, each behind the fence."""
    pending = list(dict.fromkeys(keys))
    while pending:
        done = set(await guard.retrying(_first_part(router, guard, group, pending, action)))
        pending = [k for k in pending if k not in done]


def _first_part(
    router: ShardRouter[Any],
    guard: OwnershipGuard,
    group: str,
    pending: list[str],
    action: Callable[[Any, list[str]], Awaitable[object]],
) -> Callable[[], Awaitable[list[str]]]:
    """One attempt: the keys sharing ``pending[0]``'s shard *on the map of that attempt*."""

    async def attempt() -> list[str]:
        index = router.shard_index(group, pending[0])
        part = router.split_by_shard(group, pending)[index]
        pool = router.shards(group)[index]
        async with pool.acquire() as conn, conn.transaction():
            for key in part:
                await guard.verify(conn, group, key)
            await action(conn, part)
        return part

    return attempt


def execute(sql: str, *args: Any) -> Callable[[Any], Awaitable[object]]:
    """An action running one statement (its arguments bound now, not at call time)."""

    async def run(conn: Any) -> object:
        result: object = await conn.execute(sql, *args)
        return result

    return run
