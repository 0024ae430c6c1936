"""The default engine: the queue is a table in its own Postgres database.

Dequeue is one statement (``FOR UPDATE SKIP LOCKED`` picks due rows no other worker holds, and
the same statement leases them). An enqueue NOTIFYs the queue's channel in its own statement, so
idle workers wake at once; a worker also polls every ``poll_interval_s`` in case a notification
was missed (listener reconnect) or a delayed task fell due, so a lost wake-up costs bounded
latency, not a stuck task. Completions issued at the same moment are written in one statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg

from photostack.blocks.queue._backend import ReapResult
from photostack.blocks.queue._errors import QueueError, QueueFull
from photostack.blocks.queue._model import (
    Json,
    Lease,
    QueueConfig,
    QueueStats,
    TaskInfo,
    TaskState,
    check_transition,
    encode_payload,
)
from photostack.blocks.queue._pgstore import (
    CompletionBatcher,
    TaskStore,
    create_pool,
    lease_from_row,
)
from photostack.blocks.queue._policy import DepthGate, decide_failure, decide_lost_lease
from photostack.blocks.queue._translate import translated

__all__ = ["PostgresQueue"]

_DEQUEUE = """
WITH picked AS (
    SELECT id, state AS old_state, redelivered AS was_redelivered
    FROM queue_tasks
    WHERE queue = $1 AND state IN ('queued', 'failed') AND run_at <= now()
    ORDER BY priority DESC, run_at, seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE queue_tasks t
SET state = 'running', attempts = t.attempts + 1, lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $3), worker = $4,
    redelivered = false, updated_at = now()
FROM picked
WHERE t.id = picked.id
RETURNING t.id::text, t.kind, t.payload::text, t.attempts, t.max_attempts,
    t.lease_token::text, t.priority, t.run_at, t.seq, picked.old_state, picked.was_redelivered
"""

_EXPIRED = """
SELECT id, attempts, max_attempts FROM queue_tasks
WHERE queue = $1 AND state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at LIMIT $2
FOR UPDATE SKIP LOCKED
"""


class PostgresQueue:
    """A :class:`QueueBackend` over asyncpg. ``dsn`` names the queue's own database.

    ``rand`` (jitter) and ``clock`` (the length gate's monotonic seconds) are injectable.
    """

    def __init__(
        self,
        dsn: str,
        config: QueueConfig,
        *,
        pool_size: int = 4,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn = dsn
        self.config = config
        self.pool_size = pool_size
        self._rand = rand
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._store: TaskStore | None = None
        self._gate = DepthGate(config.max_length)
        self._channel = f"photostack_queue_{config.name}"
        self._listener: asyncpg.Connection | None = None
        self._wakeup = asyncio.Event()
        self._listen_lock = asyncio.Lock()
        self._completions = CompletionBatcher(lambda: self.store)

    def __repr__(self) -> str:
        return f"<PostgresQueue {self.config.name!r} {'open' if self._pool else 'closed'}>"

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            raise RuntimeError("PostgresQueue.start() was not awaited")
        return self._store

    async def start(self) -> None:
        if self._pool is not None:
            return
        async with translated("connect to the queue database"):
            pool = await create_pool(self.dsn, self.pool_size)
            self._pool = pool
            self._store = TaskStore(pool, self.config.name)
            await self._store.create_schema()

    async def aclose(self) -> None:
        await self.stop_consuming()
        await self._completions.aclose()
        if self._pool is not None:
            pool, self._pool, self._store = self._pool, None, None
            await pool.close()

    # -- producers ---------------------------------------------------------------------------
    async def enqueue(
        self,
        kind: str,
        payload: Json,
        *,
        priority: int = 0,
        delay_s: float = 0.0,
        idempotency_key: str | None = None,
    ) -> str:
        self.config.check_priority(priority)
        self.config.check_delay(delay_s)
        text = encode_payload(payload, self.config.max_payload_bytes)
        store = self.store
        async with translated("enqueue"), store.pool.acquire() as conn:
            if idempotency_key is not None:
                existing = await store.find_by_key(conn, idempotency_key)
                if existing is not None:
                    return existing
            insert: dict[str, Any] = {
                "kind": kind,
                "payload_json": text,
                "priority": priority,
                "delay_s": delay_s,
                "max_attempts": self.config.policy_for(kind).max_attempts,
                "idempotency_key": idempotency_key,
                "notify_channel": self._channel if delay_s == 0 else None,
            }
            if not self._gate.needs_count(self._clock()):
                task_id, created = await store.insert(conn, **insert)
            else:
                # Near the limit (or not counted lately): count and insert under a per-queue
                # lock, so concurrent producers cannot both take the last free place.
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('photostack.queue.' || $1))",
                        self.config.name,
                    )
                    waiting = await store.count_waiting(conn, self.config.max_length)
                    self._gate.counted(waiting, self._clock())
                    if not self._gate.admits():
                        raise QueueFull(
                            self.config.name,
                            self.config.max_length,
                            self.config.full_retry_after_s,
                        )
                    task_id, created = await store.insert(conn, **insert)
            if created:
                self._gate.enqueued()
            return task_id

    async def status(self, task_id: str) -> TaskInfo:
        async with translated("task status"):
            return await self.store.status(task_id)

    # -- operators ---------------------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[TaskInfo]:
        async with translated("list dead letters"):
            return await self.store.dead_letters(limit)

    async def replay(self, task_id: str) -> TaskInfo:
        async with translated("replay"):
            info, _ = await self.store.replay(task_id)
            await self._notify()
        return info

    async def stats(self) -> QueueStats:
        async with translated("queue stats"):
            return await self.store.stats()

    async def purge_succeeded(self, older_than_s: float, limit: int = 10_000) -> int:
        async with translated("purge succeeded tasks"):
            return await self.store.purge_succeeded(older_than_s, limit)

    async def _notify(self) -> None:
        async with self.store.pool.acquire() as conn:
            await conn.execute("SELECT pg_notify($1, '')", self._channel)

    # -- workers -----------------------------------------------------------------------------
    async def start_consuming(self, prefetch: int) -> None:
        del prefetch  # leases are pulled in batches sized by the worker's free slots
        async with self._listen_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            async with translated("listen for new tasks"):
                listener = await asyncpg.connect(self.dsn)
                try:
                    await listener.add_listener(self._channel, self._on_notify)
                except BaseException:
                    await listener.close()
                    raise
                self._listener = listener

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def stop_consuming(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(*_CLOSE_ERRORS):
                await listener.close(timeout=2.0)

    async def wait_for_work(self, timeout_s: float) -> None:
        if self._listener is not None and self._listener.is_closed():
            # The listener's connection dropped: reconnect, and poll meanwhile.
            self._listener = None
            with contextlib.suppress(QueueError):
                await self.start_consuming(1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        self._wakeup.clear()

    async def lease(self, max_tasks: int, visibility_timeout_s: float, worker: str) -> list[Lease]:
        if max_tasks <= 0:
            return []
        store = self.store
        async with translated("lease tasks"), store.pool.acquire() as conn:
            rows = await conn.fetch(
                _DEQUEUE, self.config.name, max_tasks, visibility_timeout_s, worker
            )
        rows = sorted(rows, key=lambda r: (-r["priority"], r["run_at"], r["seq"]))
        leases = []
        for row in rows:
            check_transition(TaskState(row["old_state"]), TaskState.RUNNING)
            leases.append(lease_from_row(row, redelivered=row["was_redelivered"]))
        return leases

    async def heartbeat(self, lease: Lease, visibility_timeout_s: float) -> None:
        async with translated("heartbeat"):
            await self.store.heartbeat(lease, visibility_timeout_s)

    async def complete(self, lease: Lease, result: Json) -> None:
        text = encode_payload(result, max(self.config.max_payload_bytes, 1 << 20))
        await self._completions.complete(lease, text)

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> TaskState:
        # The attempt limit is the one the task was queued with.
        policy = replace(self.config.policy_for(lease.kind), max_attempts=lease.max_attempts)
        decision = decide_failure(policy, lease.attempt, self._rand(), permanent=permanent)
        async with translated("record failure"):
            await self.store.fail(lease, decision.state, decision.delay_s, error)
        return decision.state

    async def release(self, lease: Lease) -> None:
        async with translated("release"):
            await self.store.release(lease)
        self._wakeup.set()
        with contextlib.suppress(*_CLOSE_ERRORS):
            await self._notify()

    async def reap_expired(self, limit: int = 1000) -> ReapResult:
        store = self.store
        async with (
            translated("reap expired leases"),
            store.pool.acquire() as conn,
            conn.transaction(),
        ):
            rows = await conn.fetch(_EXPIRED, self.config.name, limit)
            back: list[uuid.UUID] = []
            dead: list[uuid.UUID] = []
            for row in rows:
                new = decide_lost_lease(row["attempts"], row["max_attempts"])
                check_transition(TaskState.RUNNING, new)
                (dead if new is TaskState.DEAD else back).append(row["id"])
            if back:
                await conn.execute(
                    """UPDATE queue_tasks SET state = 'queued', redelivered = true,
                               redeliveries = redeliveries + 1, lease_token = NULL,
                               lease_expires_at = NULL, updated_at = now(),
                               last_error = 'lease expired: its worker was lost'
                           WHERE id = ANY($1::uuid[])""",
                    back,
                )
            if dead:
                await conn.execute(
                    """UPDATE queue_tasks SET state = 'dead',
                               redeliveries = redeliveries + 1, lease_token = NULL,
                               lease_expires_at = NULL, updated_at = now(),
                               last_error = 'lease expired on its last attempt: worker lost'
                           WHERE id = ANY($1::uuid[])""",
                    dead,
                )
        if back:
            self._wakeup.set()
        return ReapResult((len(back), len(dead)))


_CLOSE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
