"""How a storage shard knows it does not own a key, and what the app does about it.

Every data shard's database has ``shard_ownership(logical_shard, map_version)``: the logical
shards of its group it owns and the map version that gave them to it. A guarded write runs
``SELECT ... FOR SHARE`` on the key's logical shard row inside its own transaction before
writing. No row means "wrong shard" (a MOVED): :class:`WrongShardError` carries the newest
version the shard has recorded, the app refreshes its map from the directory and retries once.

The row lock is the fence a reshard needs (item 7): the cut-over deletes the row on the old
shard (and inserts it on the new one) under ``FOR UPDATE``, which waits for every in-flight
guarded write of that logical shard to commit; no write can commit on the old owner afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from ._errors import WrongShardError
from ._map import ClusterMap

__all__ = ["NO_GUARD", "MapGuard", "NoGuard", "OwnershipGuard", "claim_ownership"]

T = TypeVar("T")

OWNS_SQL = "SELECT map_version FROM shard_ownership WHERE logical_shard = $1 FOR SHARE"
SHARD_VERSION_SQL = "SELECT coalesce(max(map_version), 0) FROM shard_ownership"


class OwnershipGuard(Protocol):
    async def verify(self, conn: Any, group: str, key: str) -> None:
        """Raises WrongShardError when ``conn``'s shard does not own ``key``."""
        ...

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt``; on WrongShardError refresh the map and run it once more."""
        ...


class NoGuard:
    """Static placement (no directory): every shard owns what the router sends it."""

    async def verify(self, conn: Any, group: str, key: str) -> None:
        return None

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await attempt()


NO_GUARD = NoGuard()


class MapGuard:
    """Checks ownership against the shard's ``shard_ownership`` rows.

    ``current`` returns the cached map; ``refresh(seen_version)`` asks the directory (True when
    a newer map was installed).
    """

    def __init__(
        self, current: Callable[[], ClusterMap], refresh: Callable[[int], Awaitable[bool]]
    ) -> None:
        self._current = current
        self._refresh = refresh
        self.wrong_shard_answers = 0
        self.cutover_wait_s = 5.0

    async def verify(self, conn: Any, group: str, key: str) -> None:
        logical = self._current().group(group).logical_of(key)
        if await conn.fetchval(OWNS_SQL, logical) is None:
            seen = int(await conn.fetchval(SHARD_VERSION_SQL))
            raise WrongShardError(group, logical, seen)

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """On "wrong shard": refresh the map and try again, for up to ``cutover_wait_s``.

        A reshard's cut-over (service/_reshard.py) fences the old owner before the directory
        publishes the new map: a write in that window waits here (backing off from 20 ms) until
        the map moved, instead of failing. After the deadline the last WrongShardError propagates.
        """
        deadline = time.monotonic() + self.cutover_wait_s
        delay = 0.02
        while True:
            try:
                return await attempt()
            except WrongShardError as exc:
                self.wrong_shard_answers += 1
                if time.monotonic() >= deadline:
                    raise
                if not await self._refresh(exc.shard_version):
                    await asyncio.sleep(delay)  # the directory has not published it yet
                    delay = min(0.2, delay * 2)


async def claim_ownership(conn: Any, logical: Sequence[int], version: int) -> bool:
    """Record that this shard owns ``logical`` at ``version`` — only on a shard that records no
    ownership yet (the first ``up``; a reshard moves rows itself). True when rows were written."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE shard_ownership IN EXCLUSIVE MODE")
        if await conn.fetchval("SELECT count(*) FROM shard_ownership") > 0:
            return False
        await conn.executemany(
            "INSERT INTO shard_ownership (logical_shard, map_version) VALUES ($1, $2)",
            [(i, version) for i in logical],
        )
        return True
