"""Task records in Postgres: the Postgres engine's queue table and the RabbitMQ engine's
status store are the same table, written by the same statements.

Every outcome a worker reports is fenced by its lease token (``WHERE lease_token = $token AND
state = 'running'``): a worker whose lease expired and was taken over cannot overwrite the new
holder's outcome, so a task reaches ``succeeded`` once even when it ran twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from photostack.blocks.queue._errors import LeaseLost, QueueError, QueueUnavailable, TaskNotFound
from photostack.blocks.queue._model import (
    Lease,
    QueueStats,
    TaskInfo,
    TaskState,
    check_transition,
    decode_json,
)
from photostack.blocks.queue._translate import translated

__all__ = [
    "SCHEMA",
    "CompletionBatcher",
    "TaskStore",
    "create_pool",
    "lease_from_row",
    "parse_task_id",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_tasks (
    id uuid PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    queue text NOT NULL,
    kind text NOT NULL,
    state text NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead')),
    priority smallint NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb NOT NULL,
    result jsonb,
    last_error text,
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    redeliveries integer NOT NULL DEFAULT 0,
    redelivered boolean NOT NULL DEFAULT false,
    idempotency_key text,
    lease_token uuid,
    lease_expires_at timestamptz,
    worker text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS queue_tasks_ready
    ON queue_tasks (queue, priority DESC, run_at, seq) WHERE state IN ('queued', 'failed');
CREATE INDEX IF NOT EXISTS queue_tasks_leases
    ON queue_tasks (queue, lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS queue_tasks_dead
    ON queue_tasks (queue, updated_at) WHERE state = 'dead';
CREATE UNIQUE INDEX IF NOT EXISTS queue_tasks_idempotency
    ON queue_tasks (queue, idempotency_key) WHERE idempotency_key IS NOT NULL;
"""

_INFO_COLUMNS = (
    "id::text, kind, state, attempts, max_attempts, priority, redeliveries, run_at, created_at,"
    " updated_at, result::text, last_error"
)

# Running tasks are fenced by token; the WHERE clause is the compare-and-set.
_FENCE = "WHERE id = $1 AND lease_token = $2 AND state = 'running'"

# Only constant fragments are joined into these statements; values always go as parameters.
_INSERT_CTE = """
WITH ins AS (
    INSERT INTO queue_tasks
        (id, queue, kind, state, priority, run_at, payload, max_attempts, idempotency_key)
    VALUES ($1, $2, $3, 'queued', $4, now() + make_interval(secs => $5), $6::jsonb, $7, $8)
    ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id::text
)
"""
_INSERT = _INSERT_CTE + "SELECT id FROM ins"  # noqa: S608
_INSERT_NOTIFY = _INSERT_CTE + "SELECT id, pg_notify($9, '') FROM ins"  # noqa: S608
_STATUS = f"SELECT {_INFO_COLUMNS} FROM queue_tasks WHERE id = $1 AND queue = $2"  # noqa: S608
_DEAD = (
    f"SELECT {_INFO_COLUMNS} FROM queue_tasks"  # noqa: S608
    " WHERE queue = $1 AND state = 'dead' ORDER BY updated_at DESC LIMIT $2"
)
_REPLAY = (
    "UPDATE queue_tasks SET state = 'queued', attempts = 0, run_at = now(),"  # noqa: S608
    " redelivered = false, updated_at = now()"
    f" WHERE id = $1 RETURNING {_INFO_COLUMNS}, payload::text"
)
_START_MANY = """
WITH old AS (
    SELECT id, state FROM queue_tasks
    WHERE id = ANY($1::uuid[]) AND queue = $2 AND state IN ('queued', 'failed', 'running')
    FOR UPDATE
)
UPDATE queue_tasks t
SET state = 'running', attempts = t.attempts + 1,
    redeliveries = t.redeliveries + (old.state = 'running')::int,
    lease_token = gen_random_uuid(), lease_expires_at = now() + make_interval(secs => $3),
    worker = $4, updated_at = now()
FROM old WHERE t.id = old.id
RETURNING t.id::text, t.kind, t.payload::text, t.attempts, t.max_attempts,
    t.lease_token::text, old.state AS old_state
"""
_CLEARED = "lease_token = NULL, lease_expires_at = NULL, updated_at = now()"
_HEARTBEAT = (
    "UPDATE queue_tasks SET lease_expires_at = now() + make_interval(secs => $3),"  # noqa: S608
    f" updated_at = now() {_FENCE}"
)
_COMPLETE = (
    "UPDATE queue_tasks SET state = 'succeeded', result = $3::jsonb, last_error = NULL,"  # noqa: S608
    f" {_CLEARED} {_FENCE}"
)
_FAIL = (
    "UPDATE queue_tasks SET state = $3, last_error = $4,"  # noqa: S608
    " run_at = now() + make_interval(secs => $5),"
    f" {_CLEARED} {_FENCE}"
)
_RELEASE = (
    "UPDATE queue_tasks SET state = 'queued', attempts = greatest(attempts - 1, 0),"  # noqa: S608
    f" {_CLEARED} {_FENCE}"
)


async def _keep_session(_: asyncpg.Connection) -> None:
    """Our statements leave no session state behind (no LISTEN on pooled connections, only
    transaction-scoped locks, every transaction closed by a context manager), so a pooled
    connection needs no reset query: that saves one round trip per acquire."""


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, reset=_keep_session
    )
    return pool


def parse_task_id(task_id: str) -> uuid.UUID:
    """The id as a UUID; raises TaskNotFound for anything that cannot be one of our ids."""
    try:
        return uuid.UUID(task_id)
    except (ValueError, AttributeError, TypeError) as exc:
        raise TaskNotFound(str(task_id)) from exc


def _info(row: asyncpg.Record) -> TaskInfo:
    return TaskInfo(
        id=row["id"],
        kind=row["kind"],
        state=TaskState(row["state"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        redeliveries=row["redeliveries"],
        run_at=row["run_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        result=decode_json(row["result"]),
        last_error=row["last_error"],
    )


def _updated(status: str) -> int:
    """Rows changed, from asyncpg's command status (``UPDATE 1``)."""
    return int(status.rsplit(" ", 1)[-1])


class TaskStore:
    """Statements over ``queue_tasks`` for one queue. Translates driver errors to
    QueueUnavailable at this boundary; engines add dequeueing on top."""

    def __init__(self, pool: asyncpg.Pool, queue: str) -> None:
        self.pool = pool
        self.queue = queue

    def __repr__(self) -> str:
        return f"<TaskStore queue={self.queue!r}>"

    async def create_schema(self) -> None:
        """Create the table and indexes if missing (safe to run from every process at once)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Concurrent CREATE ... IF NOT EXISTS can still collide on the catalog: serialise.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('photostack.queue.schema'))")
            await conn.execute(SCHEMA)

    async def find_by_key(self, conn: Any, key: str) -> str | None:
        row = await conn.fetchval(
            "SELECT id::text FROM queue_tasks WHERE queue = $1 AND idempotency_key = $2",
            self.queue,
            key,
        )
        return None if row is None else str(row)

    async def insert(
        self,
        conn: Any,
        *,
        kind: str,
        payload_json: str,
        priority: int,
        delay_s: float,
        max_attempts: int,
        idempotency_key: str | None,
        notify_channel: str | None = None,
    ) -> tuple[str, bool]:
        """Insert a queued task; returns ``(id, created)``. With an idempotency key already
        used, nothing is inserted and the existing id comes back with ``created=False``."""
        task_id = uuid.uuid4()
        row = await conn.fetchrow(
            _INSERT_NOTIFY if notify_channel else _INSERT,
            task_id,
            self.queue,
            kind,
            priority,
            delay_s,
            payload_json,
            max_attempts,
            idempotency_key,
            *([notify_channel] if notify_channel else []),
        )
        if row is not None:
            return row["id"], True
        assert idempotency_key is not None  # only a key conflict inserts nothing
        existing = await self.find_by_key(conn, idempotency_key)
        if existing is None:  # the other insert was rolled back meanwhile: a real race
            raise QueueUnavailable("idempotency key race: retry the enqueue")
        return existing, False

    async def count_waiting(self, conn: Any, limit: int) -> int:
        """Waiting tasks, counted up to ``limit`` (an index-only walk, bounded)."""
        value = await conn.fetchval(
            """SELECT count(*) FROM (SELECT 1 FROM queue_tasks
               WHERE queue = $1 AND state IN ('queued', 'failed') LIMIT $2) AS waiting""",
            self.queue,
            limit,
        )
        return int(value)

    async def delete_queued(self, task_id: str) -> None:
        """Undo an insert whose publish the broker refused (nothing half-written)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM queue_tasks WHERE id = $1 AND state = 'queued'",
                parse_task_id(task_id),
            )

    async def status(self, task_id: str) -> TaskInfo:
        ident = parse_task_id(task_id)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                _STATUS,
                ident,
                self.queue,
            )
        if row is None:
            raise TaskNotFound(task_id)
        return _info(row)

    async def start_many(
        self, task_ids: Sequence[str], visibility_timeout_s: float, worker: str
    ) -> dict[str, tuple[TaskState, Lease]]:
        """Lease tasks by id (the RabbitMQ engine: the broker chose them), in one statement.

        Returns task id -> (previous state, lease) for the tasks that may run; finished or
        unknown ids are absent (duplicate deliveries to drop)."""
        rows = []
        if task_ids:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    _START_MANY,
                    [parse_task_id(task_id) for task_id in task_ids],
                    self.queue,
                    visibility_timeout_s,
                    worker,
                )
        started = {}
        for row in rows:
            old_state = TaskState(row["old_state"])
            check_transition(old_state, TaskState.RUNNING)
            lease = lease_from_row(row, redelivered=old_state is TaskState.RUNNING)
            started[lease.task_id] = (old_state, lease)
        return started

    async def heartbeat(self, lease: Lease, visibility_timeout_s: float) -> None:
        await self._fenced(lease, _HEARTBEAT, visibility_timeout_s)

    async def complete(self, lease: Lease, result_json: str) -> None:
        check_transition(TaskState.RUNNING, TaskState.SUCCEEDED)
        await self._fenced(lease, _COMPLETE, result_json)

    async def complete_many(self, items: Sequence[tuple[Lease, str]]) -> set[str]:
        """Complete several leases in one statement; returns the task ids whose lease was lost."""
        check_transition(TaskState.RUNNING, TaskState.SUCCEEDED)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """UPDATE queue_tasks t SET state = 'succeeded', result = d.result::jsonb,
                       last_error = NULL, lease_token = NULL, lease_expires_at = NULL,
                       updated_at = now()
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS d(id, token, result)
                   WHERE t.id = d.id AND t.lease_token = d.token AND t.state = 'running'
                   RETURNING t.id::text""",
                [uuid.UUID(lease.task_id) for lease, _ in items],
                [uuid.UUID(lease.token) for lease, _ in items],
                [result for _, result in items],
            )
        done = {row["id"] for row in rows}
        return {lease.task_id for lease, _ in items} - done

    async def fail(self, lease: Lease, state: TaskState, delay_s: float, error: str) -> None:
        """Record a failed attempt: ``FAILED`` (retry after ``delay_s``) or ``DEAD``."""
        check_transition(TaskState.RUNNING, state)
        await self._fenced(lease, _FAIL, state.value, error, delay_s)

    async def release(self, lease: Lease) -> None:
        """Give a leased task back unrun (graceful stop): the attempt is not counted, and it
        keeps its place in line."""
        check_transition(TaskState.RUNNING, TaskState.QUEUED)
        await self._fenced(lease, _RELEASE)

    async def _fenced(self, lease: Lease, sql: str, *args: Any) -> None:
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                sql, uuid.UUID(lease.task_id), uuid.UUID(lease.token), *args
            )
        if _updated(status) == 0:
            raise LeaseLost(f"task {lease.task_id}: lease lost (expired and taken over?)")

    async def dead_letters(self, limit: int) -> list[TaskInfo]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_DEAD, self.queue, limit)
        return [_info(row) for row in rows]

    async def replay(self, task_id: str) -> tuple[TaskInfo, str]:
        """Move a dead task back to queued with its attempts reset; returns it and its payload.

        Raises TaskNotFound, or IllegalTransition when the task is not dead.
        """
        ident = parse_task_id(task_id)
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchval(
                "SELECT state FROM queue_tasks WHERE id = $1 AND queue = $2 FOR UPDATE",
                ident,
                self.queue,
            )
            if old is None:
                raise TaskNotFound(task_id)
            check_transition(TaskState(old), TaskState.QUEUED)
            row = await conn.fetchrow(_REPLAY, ident)
        assert row is not None  # locked above
        return _info(row), row["payload"]

    async def stats(self) -> QueueStats:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT
                   (SELECT count(*) FROM queue_tasks
                     WHERE queue = $1 AND state IN ('queued', 'failed')) AS waiting,
                   (SELECT count(*) FROM queue_tasks
                     WHERE queue = $1 AND state = 'running') AS running,
                   (SELECT count(*) FROM queue_tasks
                     WHERE queue = $1 AND state = 'dead') AS dead,
                   (SELECT extract(epoch FROM now() - min(run_at)) FROM queue_tasks
                     WHERE queue = $1 AND state IN ('queued', 'failed') AND run_at <= now())
                     AS oldest""",
                self.queue,
            )
        assert row is not None  # an aggregate always returns a row
        return QueueStats(
            waiting=row["waiting"],
            running=row["running"],
            dead=row["dead"],
            oldest_waiting_age_s=float(row["oldest"] or 0.0),
        )

    async def purge_succeeded(self, older_than_s: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` succeeded tasks finished more than ``older_than_s`` ago
        (their status then answers TaskNotFound). Returns how many went."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                """DELETE FROM queue_tasks WHERE id IN (
                       SELECT id FROM queue_tasks WHERE queue = $1 AND state = 'succeeded'
                         AND updated_at < now() - make_interval(secs => $2) LIMIT $3)""",
                self.queue,
                older_than_s,
                limit,
            )
        return _updated(status)


def lease_from_row(row: asyncpg.Record, *, redelivered: bool) -> Lease:
    return Lease(
        task_id=row["id"],
        kind=row["kind"],
        payload=decode_json(row["payload"]),
        attempt=row["attempts"],
        max_attempts=row["max_attempts"],
        token=row["lease_token"],
        redelivered=redelivered,
    )


class CompletionBatcher:
    """Group commit of completions: whatever is pending when a flush starts is written in one
    statement; completions arriving during it go in the next. No added wait when idle."""

    def __init__(self, store: Callable[[], TaskStore]) -> None:
        self._store = store
        self._pending: list[tuple[Lease, str, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def complete(self, lease: Lease, result_json: str) -> None:
        """Raises LeaseLost, or QueueUnavailable when the write failed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((lease, result_json, done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await done

    async def aclose(self) -> None:
        if self._flushing is not None:
            await self._flushing

    async def _flush(self) -> None:
        batch: list[tuple[Lease, str, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with translated("complete tasks"):
                        lost = await self._store().complete_many([(le, tx) for le, tx, _ in batch])
                except QueueError as exc:
                    _settle(batch, exc)
                    continue
                for lease, _, done in batch:
                    if not done.done():
                        if lease.task_id in lost:
                            done.set_exception(LeaseLost(f"task {lease.task_id}: lease lost"))
                        else:
                            done.set_result(None)
        finally:
            # Cancelled or broken mid-flush: no completer may wait forever.
            stopped = QueueUnavailable("completion flush stopped")
            _settle(batch, stopped)
            _settle(self._pending, stopped)
            self._pending = []


def _settle(batch: Sequence[tuple[Lease, str, asyncio.Future[None]]], exc: BaseException) -> None:
    for _, _, done in batch:
        if not done.done():
            done.set_exception(exc)
