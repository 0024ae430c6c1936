"""Online resharding, the bookkeeping half: the ``reshard_moves`` rows and the shards a move uses.

:class:`MoveBook` is the base of :class:`._reshard.ReshardExecutor`: it plans a move and persists
it (one row of ``reshard_moves`` in the **directory database**: plan, phase, progress), saves each
step's progress, reads the current shard map, and connects to a move's shards (looked up in the
current map by the plan's numbering). The phases themselves live in :mod:`._reshard`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg

from photostack.blocks.storage import stable_hash64

from ._reshard_map import locate, plan_move
from ._reshard_plan import MoveKind, MoveState, ReshardError, advance
from ._reshard_sql import RESHARD_SCHEMA, RETRYABLE, SELECT_MOVES, MoveRecord, ReshardConfig, record
from .directory import ClusterMap, Endpoint
from .directory._mapstore import MapStore

__all__ = ["MoveBook"]

log = logging.getLogger("photostack.service._reshard")


class MoveBook:
    """The moves in the directory database and a move's shard connections.
    ``directory_dsn``: the directory's primary."""

    def __init__(self, directory_dsn: str, config: ReshardConfig | None = None) -> None:
        self._dsn = directory_dsn
        self.config = config or ReshardConfig()

    # -- bookkeeping ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _directory(self) -> AsyncIterator[asyncpg.Connection[Any]]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(self._dsn, timeout=5)
        try:
            await conn.execute(RESHARD_SCHEMA)
            yield conn
        finally:
            await conn.close()

    async def current_map(self) -> ClusterMap:
        async with self._directory() as conn:
            found = await MapStore.current(conn)
        if found is None:
            raise ReshardError("the directory has no shard map yet")
        return found

    async def moves(self, limit: int = 10) -> list[MoveRecord]:
        """The newest moves, newest first."""
        async with self._directory() as conn:
            rows = await conn.fetch(
                f"{SELECT_MOVES} FROM reshard_moves ORDER BY id DESC LIMIT $1", limit
            )
        return [record(r) for r in rows]

    async def active(self) -> MoveRecord | None:
        async with self._directory() as conn:
            row = await conn.fetchrow(
                f"{SELECT_MOVES} FROM reshard_moves WHERE state NOT IN ('done', 'cancelled')"
            )
        return None if row is None else record(row)

    async def _save(self, rec: MoveRecord, new_state: MoveState | None = None) -> MoveRecord:
        state = advance(rec.state, new_state) if new_state is not None else rec.state
        async with self._directory() as conn:
            done = await conn.fetchval(
                "UPDATE reshard_moves SET state = $2, progress = $3::jsonb, error = $4, "
                "updated_at = now() WHERE id = $1 AND state = $5 RETURNING id",
                rec.id,
                state.value,
                json.dumps(rec.progress),
                rec.error,
                rec.state.value,
            )
        if done is None:
            raise ReshardError(f"move {rec.id} changed under this executor")
        if new_state is not None:
            log.info("reshard move %d (%s): %s", rec.id, rec.group, state.value)
        rec.state = state
        return rec

    async def plan(
        self,
        kind: MoveKind,
        group: str,
        *,
        new_endpoint: Endpoint | None = None,
        new_replicas: Sequence[Endpoint] = (),
        shard: int | None = None,
        loads: Sequence[float] | None = None,
    ) -> MoveRecord:
        """Persist a new move (PLANNED). ``shard`` is 1-based (remove-shard). Raises
        ReshardError (unknown group or shard, unsupported group, another move active...)."""
        current = await self.current_map()
        body, progress = plan_move(
            current,
            kind,
            group,
            new_endpoint=new_endpoint,
            new_replicas=new_replicas,
            shard=shard,
            loads=loads,
            now=time.time(),
        )
        async with self._directory() as conn:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO reshard_moves (kind, group_name, state, plan, progress) "
                    "VALUES ($1, $2, 'planned', $3::jsonb, $4::jsonb) "
                    "RETURNING id, kind, group_name, state, plan::text AS plan, "
                    "progress::text AS progress, error",
                    kind.value,
                    group,
                    json.dumps(body),
                    json.dumps(progress),
                )
            except asyncpg.UniqueViolationError:
                raise ReshardError(
                    "another move is in progress (photostack reshard status)"
                ) from None
        assert row is not None
        return record(row)

    # -- shards --------------------------------------------------------------------------------

    async def _dsns(self, rec: MoveRecord) -> dict[int, str]:
        """physical shard index *as the plan numbers it* -> primary DSN now.

        A shard is looked up in the current map by its members' names (a failover may have
        promoted a replica; a published remove-shard renumbered the shards after the removed
        one). A shard the map no longer lists (the removed one, after its cut-over) keeps the
        DSN it had when the move was planned; the shard being added is the plan's endpoint."""
        current = (await self.current_map()).group(rec.group)
        out: dict[int, str] = {}
        where = locate(rec.plan, current)
        for index in range(int(rec.plan["shard_count"])):
            now = where.get(index)
            if now is not None:
                out[index] = current.shards[now].primary.dsn
            else:
                out[index] = str(rec.plan.get("dsns", {}).get(str(index), ""))
        new = rec.plan.get("new_endpoint")
        if new is not None:
            out[int(rec.plan["new_shard"])] = new["dsn"]
        return out

    @contextlib.asynccontextmanager
    async def _shards(
        self, rec: MoveRecord, which: Sequence[int]
    ) -> AsyncIterator[dict[int, asyncpg.Connection[Any]]]:
        dsns = await self._dsns(rec)
        conns: dict[int, asyncpg.Connection[Any]] = {}
        try:
            for index in sorted(set(which)):
                conns[index] = await asyncpg.connect(dsns[index], timeout=5)
            yield conns
        finally:
            for conn in conns.values():
                with contextlib.suppress(*RETRYABLE):
                    await conn.close(timeout=2)

    def _sources(self, rec: MoveRecord) -> dict[int, list[int]]:
        return {int(k): v for k, v in rec.plan["sources"].items()}

    def _targets(self, rec: MoveRecord) -> list[int]:
        return sorted(set(rec.moves.values()))

    def _logical_of(self, rec: MoveRecord) -> Callable[[Any], int]:
        count = int(rec.plan["logical_shards"])
        return lambda key: stable_hash64(str(key)) % count
