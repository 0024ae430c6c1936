"""Fakes for tests: a manual clock and an in-memory engine with the full queue contract.

``MemoryQueue`` follows the same pure policy as the real engines (transition table, backoff,
lost-lease rule), driven by a :class:`ManualClock`, so the worker runtime and the API's use of
the queue can be tested in milliseconds without sockets::

    clock = ManualClock()
    queue = MemoryQueue(QueueConfig(name="t"), clock=clock)
    task_id = await queue.enqueue("thumbnail", {"photo": 1})
    clock.advance(30.0)  # leases expire, delayed tasks fall due
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from photostack.blocks.queue._backend import ReapResult
from photostack.blocks.queue._errors import LeaseLost, QueueFull, TaskNotFound
from photostack.blocks.queue._model import (
    Json,
    Lease,
    QueueConfig,
    QueueStats,
    TaskInfo,
    TaskState,
    check_transition,
    decode_json,
    encode_payload,
)
from photostack.blocks.queue._policy import decide_failure, decide_lost_lease
from photostack.blocks.queue._rabbit import delete_topology as delete_rabbit_topology

__all__ = ["ManualClock", "MemoryQueue", "delete_rabbit_topology"]

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class ManualClock:
    """Seconds that move only when a test says so."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go back")
        self.now_s += seconds


@dataclass
class _Record:
    id: str
    seq: int
    kind: str
    payload_json: str
    priority: int
    run_at_s: float
    max_attempts: int
    created_s: float
    updated_s: float
    key: str | None
    state: TaskState = TaskState.QUEUED
    attempts: int = 0
    redeliveries: int = 0
    redelivered: bool = False
    result_json: str | None = None
    last_error: str | None = None
    token: str | None = None
    lease_expires_s: float = 0.0


class MemoryQueue:
    """An in-process :class:`QueueBackend` (one event loop; no durability)."""

    def __init__(
        self, config: QueueConfig, *, clock: ManualClock | None = None, rand: float = 0.0
    ) -> None:
        self.config = config
        self.clock = clock or ManualClock()
        self.rand = rand
        self._tasks: dict[str, _Record] = {}
        self._keys: dict[str, str] = {}
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self.consuming = False

    def __repr__(self) -> str:
        return f"<MemoryQueue {self.config.name!r} tasks={len(self._tasks)}>"

    def _at(self, seconds: float) -> datetime:
        return _EPOCH + timedelta(seconds=seconds)

    def _info(self, rec: _Record) -> TaskInfo:
        return TaskInfo(
            id=rec.id,
            kind=rec.kind,
            state=rec.state,
            attempts=rec.attempts,
            max_attempts=rec.max_attempts,
            priority=rec.priority,
            redeliveries=rec.redeliveries,
            run_at=self._at(rec.run_at_s),
            created_at=self._at(rec.created_s),
            updated_at=self._at(rec.updated_s),
            result=decode_json(rec.result_json),
            last_error=rec.last_error,
        )

    def _move(self, rec: _Record, new: TaskState) -> None:
        check_transition(rec.state, new)
        rec.state = new
        rec.updated_s = self.clock()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self.consuming = False

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
        if idempotency_key is not None and idempotency_key in self._keys:
            return self._keys[idempotency_key]
        waiting = sum(1 for r in self._tasks.values() if r.state.is_waiting)
        if waiting >= self.config.max_length:
            raise QueueFull(
                self.config.name, self.config.max_length, self.config.full_retry_after_s
            )
        now = self.clock()
        rec = _Record(
            id=str(uuid.uuid4()),
            seq=next(self._seq),
            kind=kind,
            payload_json=text,
            priority=priority,
            run_at_s=now + delay_s,
            max_attempts=self.config.policy_for(kind).max_attempts,
            created_s=now,
            updated_s=now,
            key=idempotency_key,
        )
        self._tasks[rec.id] = rec
        if idempotency_key is not None:
            self._keys[idempotency_key] = rec.id
        self._wakeup.set()
        return rec.id

    async def status(self, task_id: str) -> TaskInfo:
        rec = self._tasks.get(task_id)
        if rec is None:
            raise TaskNotFound(task_id)
        return self._info(rec)

    async def dead_letters(self, limit: int = 100) -> list[TaskInfo]:
        dead = [r for r in self._tasks.values() if r.state is TaskState.DEAD]
        dead.sort(key=lambda r: r.updated_s, reverse=True)
        return [self._info(r) for r in dead[:limit]]

    async def replay(self, task_id: str) -> TaskInfo:
        rec = self._tasks.get(task_id)
        if rec is None:
            raise TaskNotFound(task_id)
        self._move(rec, TaskState.QUEUED)
        rec.attempts, rec.run_at_s, rec.redelivered = 0, self.clock(), False
        self._wakeup.set()
        return self._info(rec)

    async def stats(self) -> QueueStats:
        now = self.clock()
        waiting = [r for r in self._tasks.values() if r.state.is_waiting]
        due = [now - r.run_at_s for r in waiting if r.run_at_s <= now]
        return QueueStats(
            waiting=len(waiting),
            running=sum(1 for r in self._tasks.values() if r.state is TaskState.RUNNING),
            dead=sum(1 for r in self._tasks.values() if r.state is TaskState.DEAD),
            oldest_waiting_age_s=max(due, default=0.0),
        )

    async def start_consuming(self, prefetch: int) -> None:
        self.consuming = True

    async def stop_consuming(self) -> None:
        self.consuming = False

    async def wait_for_work(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        self._wakeup.clear()

    async def lease(self, max_tasks: int, visibility_timeout_s: float, worker: str) -> list[Lease]:
        now = self.clock()
        due = [r for r in self._tasks.values() if r.state.is_waiting and r.run_at_s <= now]
        due.sort(key=lambda r: (-r.priority, r.run_at_s, r.seq))
        leases = []
        for rec in due[:max_tasks]:
            self._move(rec, TaskState.RUNNING)
            rec.attempts += 1
            rec.token = uuid.uuid4().hex
            rec.lease_expires_s = now + visibility_timeout_s
            lease = Lease(
                rec.id,
                rec.kind,
                decode_json(rec.payload_json),
                rec.attempts,
                rec.max_attempts,
                rec.token,
                rec.redelivered,
            )
            rec.redelivered = False
            leases.append(lease)
        return leases

    def _held(self, lease: Lease) -> _Record:
        rec = self._tasks.get(lease.task_id)
        if rec is None or rec.state is not TaskState.RUNNING or rec.token != lease.token:
            raise LeaseLost(f"task {lease.task_id}: lease lost")
        return rec

    async def heartbeat(self, lease: Lease, visibility_timeout_s: float) -> None:
        self._held(lease).lease_expires_s = self.clock() + visibility_timeout_s

    async def complete(self, lease: Lease, result: Json) -> None:
        rec = self._held(lease)
        self._move(rec, TaskState.SUCCEEDED)
        rec.result_json, rec.token, rec.last_error = encode_payload(result, 1 << 20), None, None

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> TaskState:
        rec = self._held(lease)
        policy = replace(self.config.policy_for(lease.kind), max_attempts=rec.max_attempts)
        decision = decide_failure(policy, rec.attempts, self.rand, permanent=permanent)
        self._move(rec, decision.state)
        rec.last_error, rec.token = error, None
        rec.run_at_s = self.clock() + decision.delay_s
        return decision.state

    async def release(self, lease: Lease) -> None:
        rec = self._held(lease)
        self._move(rec, TaskState.QUEUED)
        rec.attempts, rec.token = max(rec.attempts - 1, 0), None
        self._wakeup.set()

    async def reap_expired(self) -> ReapResult:
        now = self.clock()
        back = dead = 0
        for rec in self._tasks.values():
            if rec.state is TaskState.RUNNING and rec.lease_expires_s <= now:
                new = decide_lost_lease(rec.attempts, rec.max_attempts)
                self._move(rec, new)
                rec.token, rec.redeliveries = None, rec.redeliveries + 1
                rec.last_error = "lease expired: its worker was lost"
                if new is TaskState.QUEUED:
                    rec.redelivered, back = True, back + 1
                else:
                    dead += 1
        if back:
            self._wakeup.set()
        return ReapResult((back, dead))
