"""One contract suite over both queue engines: Postgres, and RabbitMQ (+ Postgres status store).

RabbitMQ is the server already running on 127.0.0.1:5672 (guest/guest); each test uses its own
uniquely named queues and deletes them after. Timeouts are short (visibility ~1.5 s); every wait
is a poll under a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from photostack.blocks.queue import (
    IllegalTransition,
    PayloadTooLarge,
    PostgresQueue,
    QueueBackend,
    QueueConfig,
    QueueFull,
    RabbitQueue,
    RetryPolicy,
    TaskContext,
    TaskNotFound,
    TaskRegistry,
    TaskState,
    Worker,
    WorkerConfig,
)
from photostack.blocks.queue.testing import delete_rabbit_topology
from photostack.cluster.engines.testing import PostgresServer
from tests.conftest import engine_missing

pytestmark = pytest.mark.component

AMQP_URL = os.environ.get("PHOTOSTACK_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[2]
VISIBILITY_S = 1.5


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout_s))


async def eventually(
    check: Callable[[], Awaitable[bool]], deadline_s: float = 15.0, what: str = "condition"
) -> None:
    """Poll ``check`` until true; fail after ``deadline_s``."""
    until = time.monotonic() + deadline_s
    while not await check():
        if time.monotonic() > until:
            pytest.fail(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- the task kinds the subprocess workers run (imported there as this module's REGISTRY) --------
REGISTRY = TaskRegistry()


@REGISTRY.task("effect")
async def _effect(ctx: TaskContext) -> Any:
    """Records each start, hangs on the first attempt when asked (to be killed there), then
    applies its effect once per key: the idempotent task of the exactly-once check."""
    conn = await asyncpg.connect(ctx.payload["dsn"])
    try:
        await conn.execute(
            "INSERT INTO queue_test_starts (task_id, attempt, at)"
            " VALUES ($1, $2, clock_timestamp())",
            ctx.task_id,
            ctx.attempt,
        )
        if ctx.payload.get("hang_on_first") and ctx.attempt == 1:
            await asyncio.Event().wait()  # the test SIGKILLs the process here
        await conn.execute(
            "INSERT INTO queue_test_effects (key, task_id) VALUES ($1, $2)"
            " ON CONFLICT (key) DO NOTHING",
            ctx.payload["key"],
            ctx.task_id,
        )
    finally:
        await conn.close()
    return {"applied": ctx.payload["key"]}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def queue_dsn(pg_server: PostgresServer) -> str:
    pg_server.create_database("queue_contract")
    dsn = pg_server.dsn("queue_contract")

    async def tables() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS queue_test_starts
                       (task_id text, attempt int, at timestamptz);
                   CREATE TABLE IF NOT EXISTS queue_test_effects
                       (key text PRIMARY KEY, task_id text)"""
            )
        finally:
            await conn.close()

    asyncio.run(tables())
    return dsn


def _rabbit_available() -> str | None:
    async def probe() -> None:
        connection = await aio_pika.connect(AMQP_URL, timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
        return f"RabbitMQ at {AMQP_URL}: {exc}"
    return None


@pytest.fixture(params=["postgres", "rabbitmq"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        missing = _rabbit_available()
        if missing:
            engine_missing(missing)
    return str(request.param)


@pytest.fixture
def make_queue(engine: str, queue_dsn: str) -> Iterator[Callable[..., QueueBackend]]:
    """Build (not start) a backend of ``engine`` for a fresh uniquely named queue."""
    names: list[str] = []

    def make(**config: Any) -> QueueBackend:
        name = config.pop("name", None) or f"t_{uuid.uuid4().hex[:12]}"
        names.append(name)
        cfg = QueueConfig(name=name, **config)
        if engine == "postgres":
            return PostgresQueue(queue_dsn, cfg)
        return RabbitQueue(AMQP_URL, queue_dsn, cfg)

    yield make
    if engine == "rabbitmq":

        async def cleanup() -> None:
            for name in names:
                await delete_rabbit_topology(AMQP_URL, name)

        asyncio.run(cleanup())


@asynccontextmanager
async def started(queue: QueueBackend) -> AsyncIterator[QueueBackend]:
    await queue.start()
    try:
        yield queue
    finally:
        await queue.aclose()


@asynccontextmanager
async def working(
    queue: QueueBackend, registry: TaskRegistry, **config: Any
) -> AsyncIterator[Worker]:
    """An in-process worker running until the block ends (then stopped gracefully)."""
    settings = {"visibility_timeout_s": VISIBILITY_S, "poll_interval_s": 0.1, **config}
    worker = Worker(queue, registry, WorkerConfig(**settings))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def rows_of(queue: QueueBackend, dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM queue_tasks WHERE queue = $1", queue.config.name
        )
    finally:
        await conn.close()
    return int(value)


def state_is(
    queue: QueueBackend, task_id: str, *states: TaskState
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await queue.status(task_id)).state in states

    return check


# -- the contract --------------------------------------------------------------------------------
def test_unknown_id_is_task_not_found(make_queue: Callable[..., QueueBackend]) -> None:
    async def body() -> None:
        async with started(make_queue()) as queue:
            for bogus in (str(uuid.uuid4()), "not-a-uuid", ""):
                with pytest.raises(TaskNotFound):
                    await queue.status(bogus)

    run(body())


def test_enqueue_answers_an_id_whose_status_is_queued(
    make_queue: Callable[..., QueueBackend],
) -> None:
    async def body() -> None:
        async with started(make_queue()) as queue:
            task_id = await queue.enqueue("thumbnail", {"photo": 7}, priority=2)
            info = await queue.status(task_id)
            assert (info.id, info.kind, info.state) == (task_id, "thumbnail", TaskState.QUEUED)
            assert (info.attempts, info.priority, info.result) == (0, 2, None)

    run(body())


def test_worker_runs_task_to_succeeded_with_result(
    make_queue: Callable[..., QueueBackend],
) -> None:
    registry = TaskRegistry()

    @registry.task("double")
    async def double(ctx: TaskContext) -> Any:
        return {"value": ctx.payload["n"] * 2}

    async def body() -> None:
        async with started(make_queue()) as queue, working(queue, registry):
            task_id = await queue.enqueue("double", {"n": 21})
            await eventually(state_is(queue, task_id, TaskState.SUCCEEDED), what="success")
            info = await queue.status(task_id)
            assert info.result == {"value": 42}
            assert (info.attempts, info.last_error) == (1, None)

    run(body())


def test_failing_task_retries_with_backoff_then_dies_and_replays(
    make_queue: Callable[..., QueueBackend],
) -> None:
    registry = TaskRegistry()
    starts: list[float] = []
    healed = asyncio.Event()

    @registry.task("flaky")
    async def flaky(ctx: TaskContext) -> Any:
        starts.append(time.monotonic())
        if not healed.is_set():
            raise RuntimeError(f"boom {ctx.attempt}")
        return "fine"

    policy = RetryPolicy(max_attempts=3, base_delay_s=0.3, max_delay_s=5.0, jitter_ratio=0.0)

    async def body() -> None:
        queue = make_queue(policies={"flaky": policy})
        async with started(queue), working(queue, registry):
            task_id = await queue.enqueue("flaky", {})
            await eventually(state_is(queue, task_id, TaskState.DEAD), what="dead")
            info = await queue.status(task_id)
            assert info.attempts == 3
            assert info.last_error == "RuntimeError: boom 3"
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert len(gaps) == 2
            assert gaps[0] >= 0.3 - 0.02
            assert gaps[1] >= 0.6 - 0.02  # exponential: base * 2**(attempt-1)

            dead = await queue.dead_letters()
            assert [(d.id, d.last_error) for d in dead] == [(task_id, "RuntimeError: boom 3")]
            with pytest.raises(TaskNotFound):
                await queue.replay(str(uuid.uuid4()))

            healed.set()
            replayed = await queue.replay(task_id)
            assert (replayed.state, replayed.attempts) == (TaskState.QUEUED, 0)
            await eventually(state_is(queue, task_id, TaskState.SUCCEEDED), what="replayed run")
            assert (await queue.status(task_id)).result == "fine"
            assert await queue.dead_letters() == []
            with pytest.raises(IllegalTransition):
                await queue.replay(task_id)  # not dead any more

    run(body())


def test_payload_too_large_is_rejected_and_nothing_written(
    make_queue: Callable[..., QueueBackend], queue_dsn: str
) -> None:
    async def body() -> None:
        async with started(make_queue(max_payload_bytes=1024)) as queue:
            with pytest.raises(PayloadTooLarge) as caught:
                await queue.enqueue("thumbnail", {"blob": "x" * 2000})
            assert caught.value.limit_bytes == 1024
            assert await rows_of(queue, queue_dsn) == 0

    run(body())


def test_full_queue_rejects_new_work_and_writes_nothing(
    make_queue: Callable[..., QueueBackend], queue_dsn: str
) -> None:
    async def body() -> None:
        async with started(make_queue(max_length=3, full_retry_after_s=7.0)) as queue:
            first = await queue.enqueue("thumbnail", {"i": 0}, idempotency_key="k0")
            for i in (1, 2):
                await queue.enqueue("thumbnail", {"i": i})
            with pytest.raises(QueueFull) as caught:
                await queue.enqueue("thumbnail", {"i": 3})
            assert caught.value.retry_after_s == 7.0
            with pytest.raises(QueueFull):
                await queue.enqueue("thumbnail", {"i": 4}, idempotency_key="k4")
            assert await rows_of(queue, queue_dsn) == 3
            assert (await queue.stats()).waiting == 3
            # A retried request of accepted work still gets its id: nothing new is queued.
            assert await queue.enqueue("thumbnail", {"i": 0}, idempotency_key="k0") == first
            # The rejected key was not half-written: with room again, it is accepted as new.
            registry = TaskRegistry()

            @registry.task("thumbnail")
            async def thumbnail(ctx: TaskContext) -> Any:
                return None

            async with working(queue, registry):
                await eventually(state_is(queue, first, TaskState.SUCCEEDED), what="drain")
                k4 = await queue.enqueue("thumbnail", {"i": 4}, idempotency_key="k4")
                await eventually(state_is(queue, k4, TaskState.SUCCEEDED), what="k4")

    run(body())


def test_idempotency_key_returns_the_first_task(
    make_queue: Callable[..., QueueBackend], queue_dsn: str
) -> None:
    registry = TaskRegistry()
    runs: list[str] = []

    @registry.task("charge")
    async def charge(ctx: TaskContext) -> Any:
        runs.append(ctx.task_id)
        return None

    async def body() -> None:
        async with started(make_queue()) as queue:
            first = await queue.enqueue("charge", {"n": 1}, idempotency_key="upload-42")
            again = await queue.enqueue("charge", {"n": 1}, idempotency_key="upload-42")
            other = await queue.enqueue("charge", {"n": 2}, idempotency_key="upload-43")
            assert first == again != other
            assert await rows_of(queue, queue_dsn) == 2
            async with working(queue, registry):
                await eventually(state_is(queue, first, TaskState.SUCCEEDED), what="first")
                await eventually(state_is(queue, other, TaskState.SUCCEEDED), what="other")
            assert sorted(runs) == sorted([first, other])

    run(body())


def test_higher_priority_first_and_fifo_within_a_priority(
    make_queue: Callable[..., QueueBackend],
) -> None:
    registry = TaskRegistry()
    order: list[str] = []

    @registry.task("job")
    async def job(ctx: TaskContext) -> Any:
        order.append(ctx.payload["name"])
        return None

    async def body() -> None:
        async with started(make_queue()) as queue:
            ids = []
            for name, priority in [("low1", 0), ("high", 5), ("low2", 0), ("mid", 3), ("low3", 0)]:
                ids.append(await queue.enqueue("job", {"name": name}, priority=priority))
            async with working(queue, registry, concurrency=1):
                for task_id in ids:
                    await eventually(state_is(queue, task_id, TaskState.SUCCEEDED), what="all")
            assert order == ["high", "mid", "low1", "low2", "low3"]

    run(body())


def test_delayed_task_does_not_run_before_its_time(
    make_queue: Callable[..., QueueBackend],
) -> None:
    registry = TaskRegistry()
    ran_at: list[float] = []

    @registry.task("later")
    async def later(ctx: TaskContext) -> Any:
        ran_at.append(time.time())
        return None

    async def body() -> None:
        async with started(make_queue()) as queue, working(queue, registry):
            enqueued_at = time.time()
            task_id = await queue.enqueue("later", {}, delay_s=1.2)
            now_task = await queue.enqueue("later", {})
            await eventually(state_is(queue, now_task, TaskState.SUCCEEDED), what="undelayed")
            assert (await queue.status(task_id)).state is TaskState.QUEUED
            await eventually(state_is(queue, task_id, TaskState.SUCCEEDED), what="delayed")
            assert max(ran_at) >= enqueued_at + 1.2

    run(body())


def test_heartbeats_keep_a_long_task_leased(make_queue: Callable[..., QueueBackend]) -> None:
    registry = TaskRegistry()
    runs: list[int] = []

    @registry.task("long")
    async def long(ctx: TaskContext) -> Any:
        runs.append(ctx.attempt)
        await asyncio.sleep(VISIBILITY_S * 2.5)  # the work itself: longer than one lease
        return "done"

    async def body() -> None:
        queue = make_queue()
        other = make_queue(name=queue.config.name)
        async with started(queue), started(other):
            # A second worker on the same queue would take the task if the lease lapsed.
            async with working(queue, registry), working(other, registry):
                task_id = await queue.enqueue("long", {})
                await eventually(state_is(queue, task_id, TaskState.SUCCEEDED), what="done")
            info = await queue.status(task_id)
            assert (info.attempts, info.redeliveries, runs) == (1, 0, [1])

    run(body())


def test_graceful_stop_releases_leased_tasks(make_queue: Callable[..., QueueBackend]) -> None:
    registry = TaskRegistry()
    started_runs = asyncio.Event()
    blocked = True

    @registry.task("slow")
    async def slow(ctx: TaskContext) -> Any:
        started_runs.set()
        if blocked:
            await asyncio.Event().wait()  # never finishes on its own: stop must release it
        return ctx.attempt

    async def body() -> None:
        nonlocal blocked
        async with started(make_queue()) as queue:
            task_id = await queue.enqueue("slow", {})
            worker = Worker(
                queue,
                registry,
                WorkerConfig(visibility_timeout_s=30.0, poll_interval_s=0.1, stop_deadline_s=0.2),
            )
            running = asyncio.create_task(worker.run())
            await asyncio.wait_for(started_runs.wait(), 10)
            worker.stop()
            await running
            info = await queue.status(task_id)
            assert (info.state, info.attempts) == (TaskState.QUEUED, 0)
            # Released, not abandoned: the next worker runs it long before the 30 s lease.
            blocked = False
            async with working(queue, registry, visibility_timeout_s=30.0):
                await eventually(
                    state_is(queue, task_id, TaskState.SUCCEEDED), deadline_s=5, what="rerun"
                )
            assert (await queue.status(task_id)).result == 1

    run(body())


def _spawn_worker(engine: str, queue: QueueBackend, dsn: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "photostack.blocks.queue.worker",
        "--engine",
        engine,
        "--dsn",
        dsn,
        "--queue",
        queue.config.name,
        "--tasks",
        "tests.component.test_queue_contract:REGISTRY",
        "--concurrency",
        "2",
        "--visibility-timeout-s",
        str(VISIBILITY_S),
        "--poll-interval-s",
        "0.1",
        "--stop-deadline-s",
        "2",
    ]
    if engine == "rabbitmq":
        argv += ["--amqp-url", AMQP_URL]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def test_killed_worker_task_is_redelivered_and_applied_once(
    engine: str, make_queue: Callable[..., QueueBackend], queue_dsn: str, tmp_path: Path
) -> None:
    key = f"effect-{uuid.uuid4().hex}"

    async def starts(task_id: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(queue_dsn)
        try:
            return await conn.fetch(
                "SELECT attempt, at FROM queue_test_starts WHERE task_id = $1 ORDER BY at",
                task_id,
            )
        finally:
            await conn.close()

    async def body() -> None:
        async with started(make_queue()) as queue:
            payload = {"dsn": queue_dsn, "key": key, "hang_on_first": True}
            task_id = await queue.enqueue("effect", payload, idempotency_key=key)
            first = _spawn_worker(engine, queue, queue_dsn, tmp_path / "first.log")
            second: subprocess.Popen[bytes] | None = None
            try:

                async def first_started() -> bool:
                    return len(await starts(task_id)) == 1

                await eventually(first_started, deadline_s=30, what="first attempt to start")
                first.send_signal(signal.SIGKILL)  # dies holding the lease
                first.wait(10)
                second = _spawn_worker(engine, queue, queue_dsn, tmp_path / "second.log")
                await eventually(
                    state_is(queue, task_id, TaskState.SUCCEEDED), deadline_s=30, what="redelivery"
                )
            finally:
                for proc in (first, second):
                    if proc is not None and proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                        assert proc.wait(20) == 0
            info = await queue.status(task_id)
            assert (info.attempts, info.redeliveries) == (2, 1)
            assert info.result == {"applied": key}
            runs = await starts(task_id)
            assert [r["attempt"] for r in runs] == [1, 2]
            if engine == "postgres":  # redelivered only once the lease had expired
                assert (runs[1]["at"] - runs[0]["at"]).total_seconds() >= VISIBILITY_S - 0.1
            conn = await asyncpg.connect(queue_dsn)
            try:
                applied = await conn.fetch(
                    "SELECT task_id FROM queue_test_effects WHERE key = $1", key
                )
            finally:
                await conn.close()
            assert [r["task_id"] for r in applied] == [task_id]  # exactly once

    run(body(), timeout_s=120)
