"""Online resharding, the I/O half: runs a :class:`MovePlan` against real shards, step by step.

Every move is a row of ``reshard_moves`` in the **directory database** (its plan, its phase, its
progress: keyset cursors, counts). Each phase's step is idempotent and saves its
progress before it advances, so a move restarted in any phase continues where it stopped; a
storage node that dies mid-step makes the step fail and retry (with back-off) until it is back.

The route (docs/resharding.md):

1. **capture** on every source shard: an ``AFTER`` row trigger on the group's tables logs each
   changed row to ``reshard_changes`` (a transient table, dropped at the end). Creating the
   trigger waits for in-flight writers, so every write after it is logged.
2. **backfill**: keyset pages of each table, the rows of moving logical shards upserted to their
   target, the cursor saved after every page.
3. **catch up**: replay the log: for each logged key, read the source's current row and upsert it
   on the target (or delete it there when it is gone), then delete the replayed entries (no id
   cursor: ids are taken at insert, not at commit). Re-reading makes replay idempotent and
   order-free. Repeated until the backlog is one page.
4. **fence**: on each source delete the moving logical shards' ``shard_ownership`` rows. The
   delete waits for in-flight guarded writes (they hold the rows ``FOR SHARE``); after it,
   guarded writes there answer "wrong shard" and the app waits (``MapGuard.retrying``) for the map.
5. **claim**: drain the log (nothing new can be written there now), then insert the ownership
   rows on the target(s).
6. **publish** the map's next version (new placement, the new shard) in the directory database;
   directory nodes serve it within their refresh interval, apps fetch it on the next "wrong shard".
7. **clean**: after a grace period (apps polling the old version still read the old copies), drop
   the capture and delete the moved rows from the sources.

Cancel (before the fence only): drop the capture, delete the targets' copies; nothing else moved.

Bookkeeping (the move rows, saving progress, a move's shard connections) is
:class:`._reshard_book.MoveBook`, this executor's base.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncpg

from photostack.blocks.storage import logical_name

from ._reshard_book import MoveBook
from ._reshard_map import removal_successor
from ._reshard_plan import (
    CANCELLABLE,
    GROUP_TABLES,
    NEXT,
    TERMINAL,
    MoveKind,
    MoveState,
    ReshardError,
    ideal_fraction,
)
from ._reshard_sql import (
    CAPTURE,
    RETRYABLE,
    TRIGGER,
    MoveRecord,
    ReshardConfig,
    delete_sql,
    page_sql,
    select_sql,
    upsert_sql,
)
from .directory import ClusterMap, Endpoint, PhysicalShard, StaleMapError
from .directory._mapstore import MapStore
from .schema import apply_schema_on

__all__ = ["RETRYABLE", "MoveRecord", "ReshardConfig", "ReshardExecutor"]

log = logging.getLogger(__name__)


class ReshardExecutor(MoveBook):
    """Plans, runs, resumes and cancels moves. ``directory_dsn``: the directory's primary."""

    def __init__(self, directory_dsn: str, config: ReshardConfig | None = None) -> None:
        super().__init__(directory_dsn, config)
        self._cancel: set[int] = set()
        self.tasks: dict[int, asyncio.Task[MoveRecord]] = {}

    # -- running -------------------------------------------------------------------------------

    def start(self, rec: MoveRecord) -> asyncio.Task[MoveRecord]:
        """Run ``rec`` in the background (one task per move)."""
        task = self.tasks.get(rec.id)
        if task is None or task.done():
            task = asyncio.create_task(self.run(rec), name=f"reshard-{rec.id}")
            self.tasks[rec.id] = task
        return task

    async def run(self, rec: MoveRecord, stop_at: MoveState | None = None) -> MoveRecord:
        """Step ``rec`` until it is done or cancelled (or reaches ``stop_at``: tests stop a move
        there, as a crash would). Storage errors are retried with back-off."""
        delay = 0.1
        while rec.state not in TERMINAL and rec.state is not stop_at:
            if rec.id in self._cancel and rec.state in CANCELLABLE:
                rec = await self._save(rec, MoveState.CANCELLING)
            try:
                await self._step(rec)
                rec.error = ""
                following = NEXT[rec.state]
                if rec.id in self._cancel and following is MoveState.FENCING:
                    following = MoveState.CANCELLING  # a cancel asked for before the fence wins
                rec = await self._save(rec, following)
                delay = 0.1
            except RETRYABLE as exc:
                rec.error = f"{rec.state.value}: {exc!r}"[:500]
                log.warning("reshard move %d: %s; retrying in %.1fs", rec.id, rec.error, delay)
                with contextlib.suppress(*RETRYABLE):
                    await self._save(rec)
                await asyncio.sleep(delay)  # back-off while a storage node is away
                delay = min(self.config.retry_max_s, delay * 2)
        return rec

    async def cancel(self, rec: MoveRecord) -> MoveRecord:
        """Roll ``rec`` back to the old placement. Raises ReshardError past the fence."""
        if rec.state in TERMINAL:
            raise ReshardError(f"move {rec.id} is {rec.state.value} already")
        if rec.state not in CANCELLABLE and rec.state is not MoveState.CANCELLING:
            raise ReshardError(
                f"move {rec.id} is past its cut-over ({rec.state.value}); it can only finish"
            )
        self._cancel.add(rec.id)
        task = self.tasks.get(rec.id)
        if task is not None and not task.done():
            return await task
        return await self.run(rec)

    async def _step(self, rec: MoveRecord) -> None:
        steps = {
            MoveState.PLANNED: self._noop,
            MoveState.CAPTURING: self._capture,
            MoveState.BACKFILLING: self._backfill,
            MoveState.CATCHING_UP: self._catch_up,
            MoveState.FENCING: self._fence,
            MoveState.CLAIMING: self._claim,
            MoveState.PUBLISHING: self._publish,
            MoveState.CLEANING: self._clean,
            MoveState.CANCELLING: self._undo,
        }
        await steps[rec.state](rec)

    async def _noop(self, rec: MoveRecord) -> None:
        return None

    # -- steps ---------------------------------------------------------------------------------

    async def _capture(self, rec: MoveRecord) -> None:
        tables = GROUP_TABLES[rec.group]
        async with self._shards(rec, [*self._sources(rec), *self._targets(rec)]) as conns:
            for index in self._targets(rec):
                await apply_schema_on(conns[index], rec.group)  # a new shard: its tables
            for index in self._sources(rec):
                conn = conns[index]
                await conn.execute(CAPTURE)
                # One table per transaction: holding one table's trigger lock while waiting for
                # another's deadlocks with a writer that takes them the other way round (a
                # sign-up: usernames, then users). Per table is as safe: each CREATE TRIGGER
                # waits for that table's in-flight writers, and the backfill starts after all.
                for table in tables:
                    async with conn.transaction():
                        await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table.name}")
                        await conn.execute(
                            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE "
                            f"ON {table.name} FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()"
                        )

    async def _backfill(self, rec: MoveRecord) -> None:
        moves = rec.moves
        logical_of = self._logical_of(rec)
        cursors: dict[str, Any] = rec.progress.setdefault("cursors", {})
        async with self._shards(rec, [*self._sources(rec), *self._targets(rec)]) as conns:
            for source in self._sources(rec):
                for table in GROUP_TABLES[rec.group]:
                    slot = f"{source}:{table.name}"
                    while cursors.get(slot) != "done":
                        after = cursors.get(slot)
                        if after is None:
                            rows = await conns[source].fetch(
                                page_sql(table, True), self.config.batch_rows
                            )
                        else:
                            rows = await conns[source].fetch(
                                page_sql(table, False), *after, self.config.batch_rows
                            )
                        moving: dict[int, list[asyncpg.Record]] = {}
                        for row in rows:
                            target = moves.get(logical_of(row[table.key]))
                            if target is not None:
                                moving.setdefault(target, []).append(row)
                        for target, batch in moving.items():
                            columns = list(batch[0].keys())
                            await conns[target].executemany(
                                upsert_sql(table, columns), [tuple(r.values()) for r in batch]
                            )
                        rec.progress["copied"] = rec.progress.get("copied", 0) + sum(
                            len(b) for b in moving.values()
                        )
                        if len(rows) < self.config.batch_rows:
                            cursors[slot] = "done"
                        else:
                            cursors[slot] = [rows[-1][c] for c in table.pk]
                        await self._save(rec)

    async def _replay(self, rec: MoveRecord, conns: Mapping[int, asyncpg.Connection[Any]]) -> int:
        """One pass over every source's change log; returns the entries read.

        Entries are consumed (deleted once replayed), not passed by an id cursor: a ``bigserial``
        id is taken at insert, not at commit, so a writer holding a lower id can commit after a
        higher one was read, and a cursor would skip its change for good (an event or a seq lost
        on the new owner). A crash between the upserts and the delete replays them again, which
        is idempotent (replay re-reads the source)."""
        moves = rec.moves
        logical_of = self._logical_of(rec)
        tables = {t.name: t for t in GROUP_TABLES[rec.group]}
        seen = 0
        for source in self._sources(rec):
            rows = await conns[source].fetch(
                "SELECT id, tbl, row_key::text AS row_key FROM reshard_changes "
                "ORDER BY id LIMIT $1",
                self.config.batch_rows,
            )
            keys: dict[tuple[str, tuple[Any, ...]], int] = {}
            for row in rows:
                table = tables[row["tbl"]]
                body = json.loads(row["row_key"])
                target = moves.get(logical_of(body[table.key]))
                if target is not None:
                    keys[(table.name, tuple(body[c] for c in table.pk))] = target
            for (name, pk), target in keys.items():
                table = tables[name]
                current = await conns[source].fetchrow(select_sql(table), *pk)
                if current is None:
                    await conns[target].execute(delete_sql(table), *pk)
                else:
                    await conns[target].execute(
                        upsert_sql(table, list(current.keys())), *current.values()
                    )
            if rows:
                await conns[source].execute(
                    "DELETE FROM reshard_changes WHERE id = ANY($1::bigint[])",
                    [int(r["id"]) for r in rows],
                )
                rec.progress["replayed"] = rec.progress.get("replayed", 0) + len(keys)
                await self._save(rec)
            seen += len(rows)
        return seen

    async def _catch_up(self, rec: MoveRecord) -> None:
        async with self._shards(rec, [*self._sources(rec), *self._targets(rec)]) as conns:
            for _ in range(self.config.catch_up_rounds):
                if await self._replay(rec, conns) < self.config.batch_rows:
                    return

    async def _fence(self, rec: MoveRecord) -> None:
        sources = self._sources(rec)
        async with self._shards(rec, list(sources)) as conns:
            for index, logical in sources.items():
                await conns[index].execute(
                    "DELETE FROM shard_ownership WHERE logical_shard = ANY($1::int[])", logical
                )
        rec.progress["fenced_at"] = time.time()

    async def _claim(self, rec: MoveRecord) -> None:
        async with self._shards(rec, [*self._sources(rec), *self._targets(rec)]) as conns:
            while await self._replay(rec, conns) > 0:  # drain: nothing new reaches the log now
                pass
            version = int(rec.plan["base_version"]) + 1
            for target in self._targets(rec):
                logical = sorted(k for k, t in rec.moves.items() if t == target)
                await conns[target].execute(
                    "INSERT INTO shard_ownership (logical_shard, map_version) "
                    "SELECT unnest($1::int[]), $2 ON CONFLICT (logical_shard) "
                    "DO UPDATE SET map_version = EXCLUDED.map_version",
                    logical,
                    version,
                )

    def _successor(self, rec: MoveRecord, current: ClusterMap) -> ClusterMap | None:
        if rec.kind is MoveKind.REMOVE_SHARD:
            return removal_successor({**rec.plan, "group": rec.group}, current)
        group = current.group(rec.group)
        moves = rec.moves
        placed = all(group.placement.entries[logical_name(k)] == t for k, t in moves.items())
        new = rec.plan.get("new_endpoint")
        shards = list(group.shards)
        if new is not None and len(shards) == int(rec.plan["new_shard"]):
            added = rec.plan.get("new_replicas", ())
            replicas = tuple(Endpoint(r["name"], r["dsn"]) for r in added)
            shards.append(PhysicalShard(len(shards), Endpoint(new["name"], new["dsn"]), replicas))
        elif placed:
            return None  # published already (a resumed move)
        return current.successor(
            placements={rec.group: {logical_name(k): t for k, t in moves.items()}},
            shards={rec.group: shards},
        )

    async def _publish(self, rec: MoveRecord) -> None:
        for _ in range(10):
            async with self._directory() as conn:
                current = await MapStore.current(conn)
                assert current is not None
                proposed = self._successor(rec, current)
                if proposed is None:
                    break
                try:
                    await MapStore.publish(conn, proposed)
                except StaleMapError:
                    continue  # a failover published first: build on its map
                rec.progress["published_version"] = proposed.version
                break
        rec.progress["published_at"] = rec.progress.get("published_at") or time.time()
        fenced = float(rec.progress.get("fenced_at", rec.progress["published_at"]))
        rec.progress["cutover_s"] = round(rec.progress["published_at"] - fenced, 3)

    async def _delete_moved(
        self, rec: MoveRecord, conn: asyncpg.Connection[Any], logical: set[int]
    ) -> int:
        """Delete the rows of ``logical`` from one shard, a page at a time; returns the count."""
        logical_of = self._logical_of(rec)
        deleted = 0
        for table in GROUP_TABLES[rec.group]:
            after: list[Any] | None = None
            while True:
                if after is None:
                    rows = await conn.fetch(page_sql(table, True), self.config.batch_rows)
                else:
                    rows = await conn.fetch(page_sql(table, False), *after, self.config.batch_rows)
                gone = [
                    tuple(r[c] for c in table.pk)
                    for r in rows
                    if logical_of(r[table.key]) in logical
                ]
                if gone:
                    await conn.executemany(delete_sql(table), gone)
                deleted += len(gone)
                if len(rows) < self.config.batch_rows:
                    break
                after = [rows[-1][c] for c in table.pk]
        return deleted

    async def _drop_capture(self, conn: asyncpg.Connection[Any], group: str) -> None:
        # one statement (one table lock) per transaction, like the capture: no lock-order cycle
        for table in GROUP_TABLES[group]:
            await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {table.name}")
        await conn.execute("DROP TABLE IF EXISTS reshard_changes")

    async def _clean(self, rec: MoveRecord) -> None:
        waited = time.time() - float(rec.progress.get("published_at", 0))
        if waited < self.config.grace_s:
            await asyncio.sleep(self.config.grace_s - waited)  # apps move to the new map
        sources = self._sources(rec)
        async with self._shards(rec, list(sources)) as conns:
            moved = 0
            for index, logical in sources.items():
                await self._drop_capture(conns[index], rec.group)
                if index == rec.plan.get("removed_shard"):
                    await self._unfence(conns[index])
                moved += await self._delete_moved(rec, conns[index], set(logical))
        rec.progress["rows_moved"] = rec.progress.get("rows_moved", 0) + moved
        await self._figures(rec)
        rec.progress["finished_at"] = time.time()
        rec.progress["duration_s"] = round(
            rec.progress["finished_at"] - float(rec.progress["started_at"]), 2
        )

    async def _unfence(self, conn: asyncpg.Connection[Any]) -> None:
        """Lift a removed shard's write fence (docs/replication.md) before its clean-up: out of
        the map, no coordinator renews its lease, so the fence would refuse the deletes. No app
        writes there any more (its ownership rows went at the fence step); it is retired next."""
        tables = await conn.fetch(
            "SELECT tgrelid::regclass::text AS name FROM pg_trigger "
            "WHERE tgname = 'photostack_fence' AND tgenabled <> 'D'"
        )
        for table in tables:
            await conn.execute(f"ALTER TABLE {table['name']} DISABLE TRIGGER photostack_fence")

    async def _figures(self, rec: MoveRecord) -> None:
        """rows in the group now, and rows moved against the ideal ``rows / (n + 1)``."""
        current = await self.current_map()
        total = 0
        for shard in current.group(rec.group).shards:
            conn = await asyncpg.connect(shard.primary.dsn, timeout=5)
            try:
                for table in GROUP_TABLES[rec.group]:
                    total += int(await conn.fetchval(f"SELECT count(*) FROM {table.name}"))  # noqa: S608
            finally:
                await conn.close()
        rec.progress["rows_total"] = total
        if rec.kind is MoveKind.ADD_SHARD and total:
            ideal = total * ideal_fraction(int(rec.plan["shard_count"]))
            rec.progress["rows_ideal"] = round(ideal, 1)
            rec.progress["moved_vs_ideal"] = round(rec.progress["rows_moved"] / ideal, 4)

    async def _undo(self, rec: MoveRecord) -> None:
        sources = self._sources(rec)
        targets = self._targets(rec)
        async with self._shards(rec, [*sources, *targets]) as conns:
            for index in sources:
                await self._drop_capture(conns[index], rec.group)
            for target in targets:
                logical = {k for k, t in rec.moves.items() if t == target}
                with contextlib.suppress(asyncpg.UndefinedTableError):  # never got its tables
                    await self._delete_moved(rec, conns[target], logical)
        self._cancel.discard(rec.id)
