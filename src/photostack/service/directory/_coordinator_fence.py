"""The write lease on data primaries (``shard_fence`` + the ``photostack_fence`` trigger).

The leader renews every confirmed primary's lease each round; a primary that cannot hear it
refuses writes by itself once ``write_lease_s`` passed. Nothing is promoted before the old
primary's lease has surely lapsed (:meth:`Fencer.lease_lapsed_at`). A switchover revokes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from photostack.blocks.storage import parse_lsn

from ._coordinator_policy import CoordinatorConfig
from ._coordinator_replicas import DB_ERRORS, Runner
from ._coordinator_sql import (
    FENCE_FUNCTION,
    FENCE_SCHEMA,
    FENCE_TRIGGER,
    MISSING_TRIGGERS,
    RENEW_FENCE,
    REVOKE_FENCE,
    SET_FENCE,
    WRITING_BACKENDS,
)

__all__ = ["Fencer"]

log = logging.getLogger("photostack.service.directory._coordinator")

_TRIGGER_CHECK_EVERY_S = 5.0


class Fencer:
    """The leader's write leases: when each was last renewed, and which tables carry the
    trigger. Times are the caller's monotonic clock."""

    def __init__(
        self,
        coordinator: str,
        on: Runner,
        config: CoordinatorConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordinator = coordinator
        self._on = on
        self.config = config
        self._clock = clock
        self.renew_sent: dict[str, float] = {}  # node -> monotonic time of the last attempt
        self._fenced: dict[str, float] = {}  # node -> when its triggers were last checked

    async def fence(self, dsn: str, name: str, epoch: int, *, first: bool) -> bool:
        """Give (``first``) or renew the write lease of primary ``name``. True when it holds."""
        lease = self.config.write_lease_s
        self.renew_sent[name] = self._clock()
        deadline = time.time() + lease  # a renewal delivered late never extends past this

        async def run(conn: asyncpg.Connection[Any]) -> Any:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = local")
                if first:
                    await conn.execute(FENCE_SCHEMA)
                    return await conn.fetchval(SET_FENCE, epoch, lease, deadline)
                return await conn.fetchval(RENEW_FENCE, epoch, lease, deadline)

        try:
            try:
                held = await self._on(dsn, run)
            except asyncpg.UndefinedTableError:
                held = None  # the first round after `up`: no fence yet
            if held is None and not first:
                held = await self._on(dsn, lambda c: _first_fence(c, epoch, lease, deadline))
        except DB_ERRORS as exc:
            (log.warning if first else log.debug)(
                "%s: fence of %s not %s: %r",
                self.coordinator,
                name,
                "set" if first else "renewed",
                exc,
            )
            return False
        if held is None:
            return False
        now = self._clock()
        if now - self._fenced.get(name, -1e9) >= _TRIGGER_CHECK_EVERY_S:
            with contextlib.suppress(*DB_ERRORS):
                await self._on(dsn, _install_triggers)
                self._fenced[name] = now
        return True

    def lease_lapsed_at(self, name: str, leader_since: float | None) -> float:
        """When primary ``name``'s write lease has surely expired (monotonic). A new leader
        assumes one was just sent when it took over."""
        since = leader_since if leader_since is not None else self._clock()
        last = max(self.renew_sent.get(name, since), since)
        return last + self.config.write_lease_s + self.config.fence_margin_s

    async def revoke(self, dsn: str) -> int:
        """Revoke the lease of the primary at ``dsn`` (writes stop), wait (up to 2 s) for the
        write transactions already past the fence, and return its WAL position then."""

        async def run(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = local")
                await conn.execute(REVOKE_FENCE)
            end = self._clock() + 2.0
            while await conn.fetchval(WRITING_BACKENDS) and self._clock() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # in-flight writes that passed the fence finish
            return parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))

        lsn: int = await self._on(dsn, run)
        return lsn


async def _first_fence(
    conn: asyncpg.Connection[Any], epoch: int, lease_s: float, deadline: float
) -> Any:
    """A primary without a fence row yet (first round after ``up``): create it."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute(FENCE_SCHEMA)
        return await conn.fetchval(SET_FENCE, epoch, lease_s, deadline)


async def _install_triggers(conn: asyncpg.Connection[Any]) -> None:
    """The fence function, and its trigger on every table that lacks it (new tables too)."""
    missing = [r["name"] for r in await conn.fetch(MISSING_TRIGGERS)]
    if not missing and await conn.fetchval(
        "SELECT 1 FROM pg_proc WHERE proname = 'photostack_fence'"
    ):
        return
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute("SET LOCAL lock_timeout = '200ms'")
        await conn.execute(FENCE_FUNCTION)
        for table in missing:
            await conn.execute(FENCE_TRIGGER.format(table=table.replace('"', '""')))
