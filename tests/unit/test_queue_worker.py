"""The worker runtime over the in-memory engine, with a manual clock for queue time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from photostack.blocks.queue import (
    PermanentTaskError,
    QueueConfig,
    QueueConfigError,
    QueueMetrics,
    RetryPolicy,
    TaskContext,
    TaskRegistry,
    TaskState,
    Worker,
    WorkerConfig,
    WorkerState,
)
from photostack.blocks.queue.testing import ManualClock, MemoryQueue
from photostack.blocks.queue.worker import load_registry

POLICY = RetryPolicy(max_attempts=3, base_delay_s=10.0, max_delay_s=100.0, jitter_ratio=0.0)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    until = time.monotonic() + 5
    while not await check():
        if time.monotonic() > until:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def in_state(queue: MemoryQueue, task_id: str, state: TaskState) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await queue.status(task_id)).state is state

    return check


@asynccontextmanager
async def working(
    queue: MemoryQueue, registry: TaskRegistry, clock: ManualClock, **config: Any
) -> AsyncIterator[tuple[Worker, QueueMetrics]]:
    metrics = QueueMetrics(queue.config.name)
    settings = {"visibility_timeout_s": 30.0, "poll_interval_s": 0.01, **config}
    worker = Worker(queue, registry, WorkerConfig(**settings), hooks=metrics, clock=clock)
    task = asyncio.create_task(worker.run())
    try:
        yield worker, metrics
    finally:
        worker.stop()
        await task
    assert worker.state is WorkerState.STOPPED


def counter(metrics: QueueMetrics, name: str, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        f"photostack_queue_{name}_total", {"queue": "q", "kind": kind}
    )
    return value or 0.0


def new_queue(clock: ManualClock) -> MemoryQueue:
    return MemoryQueue(QueueConfig(name="q", policies={"flaky": POLICY}), clock=clock)


def test_a_task_runs_once_and_its_result_is_stored() -> None:
    clock = ManualClock()
    registry = TaskRegistry()

    @registry.task("add")
    async def add(ctx: TaskContext) -> Any:
        return ctx.payload["a"] + ctx.payload["b"]

    async def body() -> None:
        queue = new_queue(clock)
        async with working(queue, registry, clock) as (_, metrics):
            task_id = await queue.enqueue("add", {"a": 2, "b": 3})
            await eventually(in_state(queue, task_id, TaskState.SUCCEEDED), "success")
            assert (await queue.status(task_id)).result == 5
            assert counter(metrics, "succeeded", "add") == 1

    run(body())


def test_failures_wait_their_backoff_on_the_clock_then_die() -> None:
    clock = ManualClock()
    registry = TaskRegistry()
    attempts: list[int] = []

    @registry.task("flaky")
    async def flaky(ctx: TaskContext) -> Any:
        attempts.append(ctx.attempt)
        raise ValueError("nope")

    async def body() -> None:
        queue = new_queue(clock)
        async with working(queue, registry, clock) as (_, metrics):
            task_id = await queue.enqueue("flaky", {})
            await eventually(in_state(queue, task_id, TaskState.FAILED), "first failure")
            await asyncio.sleep(0.05)  # give a wrong worker the chance to run it early
            assert attempts == [1]  # backoff is 10 s of queue time: nothing happens yet
            clock.advance(10.0)
            await eventually(lambda: _len_is(attempts, 2), "second attempt")
            clock.advance(20.0)
            await eventually(in_state(queue, task_id, TaskState.DEAD), "dead")
            info = await queue.status(task_id)
            assert (info.attempts, info.last_error) == (3, "ValueError: nope")
            assert counter(metrics, "retries", "flaky") == 2
            assert counter(metrics, "dead", "flaky") == 1

    run(body())


async def _len_is(items: list[int], n: int) -> bool:
    return len(items) == n


def test_unknown_kind_and_permanent_errors_go_dead_at_once() -> None:
    clock = ManualClock()
    registry = TaskRegistry()

    @registry.task("bad")
    async def bad(ctx: TaskContext) -> Any:
        raise PermanentTaskError("corrupt image")

    async def body() -> None:
        queue = new_queue(clock)
        async with working(queue, registry, clock):
            unknown = await queue.enqueue("mystery", {})
            permanent = await queue.enqueue("bad", {})
            await eventually(in_state(queue, unknown, TaskState.DEAD), "unknown dead")
            await eventually(in_state(queue, permanent, TaskState.DEAD), "permanent dead")
        assert "no handler" in ((await queue.status(unknown)).last_error or "")
        assert (await queue.status(permanent)).last_error == "corrupt image"
        assert (await queue.status(permanent)).attempts == 1

    run(body())


def test_a_lost_workers_task_is_reaped_and_redelivered() -> None:
    clock = ManualClock()
    registry = TaskRegistry()
    seen: list[bool] = []

    @registry.task("job")
    async def job(ctx: TaskContext) -> Any:
        seen.append(ctx.redelivered)
        return "ok"

    async def body() -> None:
        queue = new_queue(clock)
        task_id = await queue.enqueue("job", {})
        [lease] = await queue.lease(1, 30.0, "doomed-worker")  # ...which then vanishes
        assert lease.task_id == task_id
        async with working(queue, registry, clock) as (_, metrics):
            await asyncio.sleep(0.05)
            assert (await queue.status(task_id)).state is TaskState.RUNNING  # lease still valid
            clock.advance(31.0)
            await eventually(in_state(queue, task_id, TaskState.SUCCEEDED), "redelivery")
            assert seen == [True]
            assert counter(metrics, "redeliveries", "job") == 1
        info = await queue.status(task_id)
        assert (info.attempts, info.redeliveries) == (2, 1)

    run(body())


def test_losing_the_lease_cancels_the_handler() -> None:
    clock = ManualClock()
    registry = TaskRegistry()
    cancelled = asyncio.Event()
    runs: list[int] = []

    @registry.task("slow")
    async def slow(ctx: TaskContext) -> Any:
        runs.append(ctx.attempt)
        if ctx.attempt == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return ctx.attempt

    async def body() -> None:
        queue = new_queue(clock)
        async with working(queue, registry, clock, visibility_timeout_s=0.06, concurrency=1) as (
            _,
            metrics,
        ):
            task_id = await queue.enqueue("slow", {})
            await eventually(lambda: _len_is(runs, 1), "first run")
            clock.advance(1.0)
            await queue.reap_expired()  # another worker's reaper takes the task away
            await asyncio.wait_for(cancelled.wait(), 5)
            await eventually(in_state(queue, task_id, TaskState.SUCCEEDED), "second run")
            assert counter(metrics, "leases_lost", "slow") == 1
        assert (await queue.status(task_id)).result == 2

    run(body())


def test_stop_releases_unfinished_tasks_without_counting_the_attempt() -> None:
    clock = ManualClock()
    registry = TaskRegistry()
    started = asyncio.Event()

    @registry.task("stuck")
    async def stuck(ctx: TaskContext) -> Any:
        started.set()
        await asyncio.Event().wait()

    async def body() -> None:
        queue = new_queue(clock)
        task_id = await queue.enqueue("stuck", {})
        async with working(queue, registry, clock, stop_deadline_s=0.05) as (worker, metrics):
            await asyncio.wait_for(started.wait(), 5)
            assert worker.busy == 1
        info = await queue.status(task_id)
        assert (info.state, info.attempts) == (TaskState.QUEUED, 0)
        assert counter(metrics, "released", "stuck") == 1
        assert not queue.consuming

    run(body())


def test_registry_rejects_duplicates_and_loads_by_name() -> None:
    registry = TaskRegistry()
    registry.register("a", _noop, RetryPolicy(max_attempts=2))
    with pytest.raises(QueueConfigError):
        registry.register("a", _noop)
    assert registry.kinds() == frozenset({"a"})
    assert registry.policies()["a"].max_attempts == 2
    assert isinstance(load_registry("tests.unit.test_queue_worker:LOADABLE"), TaskRegistry)
    for bad in ("nocolon", "no.such.module:x", "tests.unit.test_queue_worker:POLICY"):
        with pytest.raises(ValueError, match="--tasks"):
            load_registry(bad)
    with pytest.raises(QueueConfigError):
        WorkerConfig(concurrency=0)


async def _noop(ctx: TaskContext) -> Any:
    return None


LOADABLE = TaskRegistry()
