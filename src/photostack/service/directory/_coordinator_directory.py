"""The coordinator's side of the directory database: observations, the leader lease, the map it
publishes, the failover history and the switchover requests (tables in
:mod:`._coordinator_sql`).

Two connections: one for everything a round does (one operation at a time: the rounds and the
routes share it), and one for the leader lease alone, so a slow round never costs the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from ._coordinator_policy import CoordinatorConfig
from ._coordinator_replicas import DB_ERRORS
from ._coordinator_sql import ACQUIRE_LEASE, DIRECTORY_COORDINATOR_SCHEMA, LEASE_HELD
from ._dirdb import FencedError as DirdbFencedError
from ._dirdb import check_fence
from ._errors import DirectoryError
from ._map import ClusterMap
from ._mapstore import MapStore

__all__ = ["DirectoryLink", "FailoverError"]

_LINK_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, DirdbFencedError)

Action = Callable[["asyncpg.Connection[Any]"], Awaitable[Any]]


class FailoverError(DirectoryError):
    """A failover could not be run (unknown shard, not the leader, no candidate...)."""


class DirectoryLink:
    """One coordinator's connections to the directory database."""

    def __init__(self, name: str, dsn: str, config: CoordinatorConfig) -> None:
        self.name = name
        self._dsn = dsn
        self.config = config
        self._db: asyncpg.Connection[Any] | None = None
        self._lease_db: asyncpg.Connection[Any] | None = None
        self._lock = asyncio.Lock()
        self._schema_ready = False
        # (member, generation) of the directory primary (``_dirdb``): every connection checks
        # it names its server, and a publish re-checks it in its transaction. None: no check.
        self.fence: tuple[str, int] | None = None

    def retarget(self, dsn: str, fence: tuple[str, int] | None) -> None:
        """The directory database failed over: use ``dsn`` (member and generation ``fence``)
        from the next operation on; the connections to the old primary are dropped."""
        self._dsn, self.fence = dsn, fence
        for conn in (self._db, self._lease_db):
            if conn is not None:
                conn.terminate()
        self._db = self._lease_db = None

    async def _fenced(self, conn: asyncpg.Connection[Any]) -> None:
        if self.fence is not None:
            async with conn.transaction():
                await check_fence(conn, *self.fence)

    async def aclose(self) -> None:
        conns = [c for c in (self._db, self._lease_db) if c is not None]
        self._db = self._lease_db = None
        for conn in conns:
            conn.terminate()

    async def _directory(self) -> asyncpg.Connection[Any]:
        if self._db is None or self._db.is_closed():
            self._db = await asyncpg.connect(
                self._dsn,
                timeout=self.config.probe_timeout_s * 2,
                server_settings={
                    "application_name": f"photostack-coordinator-{self.name}",
                    "statement_timeout": "1000",
                    "synchronous_commit": "off",
                },
            )
            await self._fenced(self._db)
        if not self._schema_ready:
            async with self._db.transaction():
                await self._db.execute("SELECT pg_advisory_xact_lock(7070)")
                await self._db.execute(DIRECTORY_COORDINATOR_SCHEMA)
            self._schema_ready = True
        return self._db

    async def on(self, fn: Action) -> Any:
        """Run ``fn`` on the directory connection. One at a time: the rounds and the routes
        (``request_failover``, ``history``) share it, and an asyncpg connection runs one
        operation at a time (a second one fails, and used to drop the first's transaction)."""
        async with self._lock:
            try:
                return await fn(await self._directory())
            except _LINK_ERRORS as exc:
                if self._db is not None:
                    self._db.terminate()
                    self._db = None
                if isinstance(exc, DirdbFencedError):  # to its callers: the primary is gone
                    raise ConnectionError(str(exc)) from exc
                raise

    # -- observations --------------------------------------------------------------------------

    async def record_observations(self, seen: Mapping[str, bool]) -> None:
        if not seen:
            return
        names, oks = list(seen), list(seen.values())
        with contextlib.suppress(*DB_ERRORS):
            await self.on(
                lambda db: db.execute(
                    "INSERT INTO coordinator_observations (observer, target, ok, at) "
                    "SELECT $1, t, o, clock_timestamp() FROM unnest($2::text[], $3::bool[]) AS "
                    "x(t, o) ON CONFLICT (observer, target) DO UPDATE "
                    "SET ok = excluded.ok, at = excluded.at",
                    self.name,
                    names,
                    oks,
                )
            )

    async def observations(self) -> dict[str, dict[str, bool]]:
        """target -> observer -> ok, only observations younger than the max age."""
        rows = await self.on(
            lambda db: db.fetch(
                "SELECT observer, target, ok FROM coordinator_observations "
                "WHERE at > clock_timestamp() - make_interval(secs => $1)",
                self.config.observation_max_age_s,
            )
        )
        out: dict[str, dict[str, bool]] = {}
        for row in rows:
            out.setdefault(row["target"], {})[row["observer"]] = bool(row["ok"])
        return out

    # -- the leader lease ----------------------------------------------------------------------

    async def acquire_lease(self, holder: str) -> int | None:
        """Take or renew the leader lease for ``holder``: its term, or None when another holder
        has it. Raises the database errors (the lease connection is dropped first)."""
        try:
            if self._lease_db is None or self._lease_db.is_closed():
                self._lease_db = await asyncpg.connect(
                    self._dsn,
                    timeout=self.config.probe_timeout_s * 2,
                    server_settings={
                        "application_name": f"photostack-coordinator-{self.name}-lease",
                        "statement_timeout": str(int(self.config.leader_lease_s * 500)),
                    },
                )
                async with self._lease_db.transaction():
                    await self._lease_db.execute("SELECT pg_advisory_xact_lock(7070)")
                    await self._lease_db.execute(DIRECTORY_COORDINATOR_SCHEMA)
                await self._fenced(self._lease_db)
            term = await self._lease_db.fetchval(ACQUIRE_LEASE, holder, self.config.leader_lease_s)
        except _LINK_ERRORS as exc:
            if self._lease_db is not None:
                self._lease_db.terminate()
                self._lease_db = None
            if isinstance(exc, DirdbFencedError):
                raise ConnectionError(str(exc)) from exc
            raise
        return None if term is None else int(term)

    async def lease_holder(self) -> str:
        """Who holds the lease now ('' when unknown)."""
        with contextlib.suppress(*DB_ERRORS):
            if self._lease_db is not None:
                return str(
                    await self._lease_db.fetchval(
                        "SELECT holder FROM coordinator_lease WHERE id = 1"
                    )
                )
        return ""

    async def publish(self, holder: str, proposed: ClusterMap) -> None:
        """Store ``proposed`` as the current map if ``holder`` still holds the lease.
        Raises FailoverError when it does not, database errors otherwise."""

        async def run(db: asyncpg.Connection[Any]) -> None:
            async with db.transaction():
                await db.execute("SET LOCAL synchronous_commit = on")
                if self.fence is not None:
                    await check_fence(db, *self.fence)
                if await db.fetchval(LEASE_HELD, holder) is None:
                    raise FailoverError(f"{self.name} no longer holds the coordinator lease")
                await MapStore.publish(db, proposed)

        await self.on(run)

    # -- failover history and requests ---------------------------------------------------------

    async def record(
        self,
        shard: str,
        *,
        planned: bool,
        from_node: str,
        to_node: str | None,
        result: str,
        reason: str,
        epoch: int | None = None,
        new_map: ClusterMap | None = None,
    ) -> None:
        with contextlib.suppress(*DB_ERRORS):
            await self.on(
                lambda db: db.execute(
                    "INSERT INTO failovers (shard, planned, from_node, to_node, epoch, "
                    "map_version, result, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    shard,
                    planned,
                    from_node,
                    to_node,
                    epoch,
                    new_map.version if new_map is not None else None,
                    result,
                    reason,
                )
            )

    async def amend_last(self, shard: str, down_for_s: float) -> None:
        with contextlib.suppress(*DB_ERRORS):
            await self.on(
                lambda db: db.execute(
                    "UPDATE failovers SET down_for_s = $2 WHERE id = "
                    "(SELECT max(id) FROM failovers WHERE shard = $1)",
                    shard,
                    down_for_s,
                )
            )

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self.on(
            lambda db: db.fetch(
                "SELECT shard, planned, from_node, to_node, epoch, map_version, result, reason, "
                "down_for_s, at::text AS at FROM failovers ORDER BY id DESC LIMIT $1",
                limit,
            )
        )
        return [dict(r) for r in rows]

    async def request_switchover(self, shard: str) -> int:
        """File a switchover request; the id of the last failover before it."""
        last = await self.on(lambda db: db.fetchval("SELECT coalesce(max(id), 0) FROM failovers"))
        await self.on(
            lambda db: db.execute(
                "INSERT INTO failover_requests (shard) VALUES ($1) ON CONFLICT DO NOTHING", shard
            )
        )
        return int(last)

    async def switchover_result(self, after_id: int, shard: str) -> dict[str, Any] | None:
        """The first planned failover of ``shard`` recorded after ``after_id``, or None."""
        row = await self.on(
            lambda db: db.fetchrow(
                "SELECT shard, planned, from_node, to_node, epoch, map_version, result, "
                "reason FROM failovers WHERE id > $1 AND shard = $2 AND planned "
                "ORDER BY id LIMIT 1",
                after_id,
                shard,
            )
        )
        return None if row is None else dict(row)

    async def pending_requests(self) -> list[str]:
        """The shards with a pending switchover request."""
        rows = await self.on(lambda db: db.fetch("SELECT shard FROM failover_requests"))
        return [str(row["shard"]) for row in rows]

    async def delete_request(self, shard: str) -> None:
        await self.on(_delete_request(shard))


def _delete_request(key: str) -> Action:
    async def run(db: asyncpg.Connection[Any]) -> Any:
        return await db.execute("DELETE FROM failover_requests WHERE shard = $1", key)

    return run
