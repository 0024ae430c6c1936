"""The `queue` bench suite: end-to-end no-op tasks/s (enqueue -> done) of our queue engines
against PgQueuer on the same Postgres, with the same producers and worker concurrency.

One process, one event loop per engine run: ``producers`` coroutines enqueue single tasks on
their own connections while one worker (ours: :class:`Worker` with ``concurrency`` slots;
PgQueuer: a QueueManager with ``max_concurrent_tasks=concurrency``) runs them; the clock runs
from the first enqueue to the last handler call. Rounds alternate the engines and the median
is reported. The suite starts its own Postgres and removes it after; RabbitMQ is the server
at ``PHOTOSTACK_BENCH_AMQP_URL`` (default 127.0.0.1:5672), reported n/a when unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from photostack.blocks.queue import (
    PostgresQueue,
    QueueBackend,
    QueueConfig,
    QueueError,
    RabbitQueue,
    TaskContext,
    TaskRegistry,
    Worker,
    WorkerConfig,
)
from photostack.blocks.queue.testing import delete_rabbit_topology
from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import start_postgres
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = [
    "EngineRun",
    "QueueBenchConfig",
    "measure_queue_engines",
    "paired_ratio",
    "queue_section",
    "run_queue_suite",
]

AMQP_URL = os.environ.get("PHOTOSTACK_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PGQUEUER = "PgQueuer 1.6.0 (anchor)"
OURS_PG = "photostack queue, Postgres engine"
OURS_RABBIT = "photostack queue, RabbitMQ engine"


@dataclass(frozen=True)
class QueueBenchConfig:
    tasks: int = 3000
    producers: int = 4
    concurrency: int = 16
    rounds: int = 5
    warmup_tasks: int = 200
    run_cap_s: float = 60.0


@dataclass(frozen=True)
class EngineRun:
    """One measured run: ``done`` of ``tasks`` finished in ``elapsed_s``."""

    engine: str
    tasks: int
    done: int
    elapsed_s: float
    enqueue_s: float

    @property
    def tasks_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def complete(self) -> bool:
        return self.done == self.tasks


class _Counter:
    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()
        self.last_at = 0.0

    def hit(self) -> None:
        self.count += 1
        self.last_at = time.perf_counter()
        if self.count >= self.target:
            self.done.set()


async def _drive(
    engine: str,
    cfg: QueueBenchConfig,
    tasks: int,
    counter: _Counter,
    enqueue: Callable[[int], Awaitable[Any]],
) -> EngineRun:
    """Enqueue ``tasks`` from ``cfg.producers`` coroutines; wait for the counter (capped)."""
    per = [
        tasks // cfg.producers + (1 if i < tasks % cfg.producers else 0)
        for i in range(cfg.producers)
    ]

    async def producer(index: int, count: int) -> None:
        for _ in range(count):
            await enqueue(index)

    start = time.perf_counter()
    await asyncio.gather(*(producer(i, n) for i, n in enumerate(per)))
    enqueued = time.perf_counter() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(counter.done.wait(), cfg.run_cap_s)
    end = counter.last_at if counter.done.is_set() else time.perf_counter()
    return EngineRun(engine, tasks, counter.count, end - start, enqueued)


async def _run_ours(
    engine: str, make: Callable[[int], QueueBackend], cfg: QueueBenchConfig, tasks: int
) -> EngineRun:
    counter = _Counter(tasks)
    registry = TaskRegistry()

    @registry.task("noop")
    async def noop(ctx: TaskContext) -> None:
        counter.hit()

    producer, consumer = make(cfg.producers), make(4)
    await producer.start()
    await consumer.start()
    worker = Worker(
        consumer,
        registry,
        WorkerConfig(concurrency=cfg.concurrency, visibility_timeout_s=30.0, poll_interval_s=1.0),
    )
    running = asyncio.create_task(worker.run())
    try:
        return await _drive(engine, cfg, tasks, counter, lambda _: producer.enqueue("noop", None))
    finally:
        worker.stop()
        await running
        await consumer.aclose()
        await producer.aclose()


async def _run_pgqueuer(dsn: str, cfg: QueueBenchConfig, tasks: int) -> EngineRun:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

    counter = _Counter(tasks)
    worker_conn = await asyncpg.connect(dsn)
    producers = [await asyncpg.connect(dsn) for _ in range(cfg.producers)]
    try:
        manager = QueueManager(Queries(AsyncpgDriver(worker_conn)))

        @manager.entrypoint("noop")
        async def noop(job: Job) -> None:
            counter.hit()

        queries = [Queries(AsyncpgDriver(conn)) for conn in producers]
        batch = max(1, cfg.concurrency // 2)
        running = asyncio.create_task(
            manager.run(
                batch_size=batch,
                max_concurrent_tasks=2 * batch,
                dequeue_timeout=timedelta(seconds=1),
                log_aggregation_interval=timedelta(0),
            )
        )
        try:
            return await _drive(
                PGQUEUER, cfg, tasks, counter, lambda i: queries[i].enqueue("noop", None)
            )
        finally:
            manager.shutdown.set()
            await running
    finally:
        for conn in (worker_conn, *producers):
            await conn.close()


async def _rabbit_reachable() -> bool:
    import aio_pika

    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=3)
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
        return False
    await connection.close()
    return True


async def measure_queue_engines(
    dsn: str, pgq_dsn: str, cfg: QueueBenchConfig, out: Out
) -> dict[str, list[EngineRun]]:
    """Every engine, ``cfg.rounds`` alternating rounds after one warm-up each."""
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(pgq_dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    rabbit = await _rabbit_reachable()
    if not rabbit:
        out(f"RabbitMQ not reachable at {AMQP_URL}: its figures are n/a")
    names: list[str] = []

    def fresh_name() -> str:
        names.append(f"bench_{uuid.uuid4().hex[:10]}")
        return names[-1]

    def ours_pg(name: str) -> Callable[[int], QueueBackend]:
        config = QueueConfig(name=name, max_length=10 * cfg.tasks)
        return lambda pool: PostgresQueue(dsn, config, pool_size=pool)

    def ours_rabbit(name: str) -> Callable[[int], QueueBackend]:
        config = QueueConfig(name=name, max_length=10 * cfg.tasks)
        return lambda pool: RabbitQueue(AMQP_URL, dsn, config, pool_size=pool)

    engines: dict[str, Callable[[int], Awaitable[EngineRun]]] = {
        PGQUEUER: lambda n: _run_pgqueuer(pgq_dsn, cfg, n),
        OURS_PG: lambda n: _run_ours(OURS_PG, ours_pg(fresh_name()), cfg, n),
    }
    if rabbit:
        engines[OURS_RABBIT] = lambda n: _run_ours(OURS_RABBIT, ours_rabbit(fresh_name()), cfg, n)
    runs: dict[str, list[EngineRun]] = {name: [] for name in engines}
    try:
        for name, run in engines.items():
            out(f"warm-up: {name} ({cfg.warmup_tasks} tasks)")
            await run(cfg.warmup_tasks)
        for round_no in range(cfg.rounds):
            for name, run in engines.items():
                result = await run(cfg.tasks)
                out(
                    f"round {round_no + 1}: {name}: {result.done}/{result.tasks} tasks in"
                    f" {result.elapsed_s:.2f}s = {result.tasks_per_s:,.0f} tasks/s"
                )
                runs[name].append(result)
    finally:
        if rabbit:
            for name in names:
                with contextlib.suppress(QueueError, OSError):
                    await delete_rabbit_topology(AMQP_URL, name)
    return runs


def _median_rate(runs: list[EngineRun]) -> float:
    return statistics.median(r.tasks_per_s for r in runs) if runs else float("nan")


def paired_ratio(runs: list[EngineRun], anchor: list[EngineRun]) -> float:
    """Median over rounds of this engine's rate / the anchor's rate in the same round: on a
    shared machine, load that slows one round slows both sides of its ratio."""
    ratios = [
        ours.tasks_per_s / base.tasks_per_s
        for ours, base in zip(runs, anchor, strict=False)
        if base.tasks_per_s > 0
    ]
    return statistics.median(ratios) if ratios else float("nan")


def queue_section(runs: dict[str, list[EngineRun]], cfg: QueueBenchConfig) -> Section:
    anchor_runs = runs.get(PGQUEUER, [])
    rows = []
    for name in (PGQUEUER, OURS_PG, OURS_RABBIT):
        engine_runs = runs.get(name, [])
        rate = _median_rate(engine_runs)
        ratio = paired_ratio(engine_runs, anchor_runs)
        rows.append(
            (
                name,
                fmt(rate),
                " / ".join(fmt(r.tasks_per_s) for r in engine_runs) or "n/a",
                fmt(statistics.median(r.enqueue_s for r in engine_runs) * 1000, 0)
                if engine_runs
                else "n/a",
                f"{ratio:.2f}x" if engine_runs and not math.isnan(ratio) else "n/a",
            )
        )
    return Section(
        "Queue: end-to-end no-op tasks/s (enqueue → done)",
        (
            Paragraph(
                f"{cfg.tasks:,} no-op tasks per run, enqueued one at a time by {cfg.producers}"
                f" producers on their own connections while one worker with {cfg.concurrency}"
                " concurrent slots runs them, in one process; the clock runs from the first"
                f" enqueue to the last task done. Median of {cfg.rounds} alternating rounds"
                " after a warm-up; PgQueuer runs on the same Postgres server (its own database)."
                " The ratio is the median of per-round ratios (same-round anchor)."
            ),
            Table(
                ("engine", "tasks/s (median)", "rounds", "enqueue all (ms)", "vs PgQueuer"),
                tuple(rows),
            ),
            Bullets(
                (
                    "Ours does more per task than PgQueuer: a lease token per delivery,"
                    " fenced completion, result stored, task status kept for lookup by id.",
                    "RabbitMQ engine: the broker carries delivery, Postgres keeps status, so"
                    " each task also costs three status-row writes (queued, then running and"
                    " done, each shared by a batch of deliveries); acks go out as one multiple"
                    " ack per completion batch. Each enqueue waits for its status-row insert"
                    " and then for the broker's confirm of a persistent message, one after the"
                    " other: that latency bounds this run (enqueue all ≈ the whole run).",
                ),
            ),
        ),
    )


def run_queue_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """Measure the queue engines against PgQueuer. Raises SuiteError."""
    cfg = QueueBenchConfig(
        tasks=options.requests,
        concurrency=options.concurrency,
        run_cap_s=options.duration_cap_s,
    )
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        try:
            server = start_postgres(Path(tmp) / "pg", name="bench-queue")
        except EngineError as exc:
            raise SuiteError(f"cannot start Postgres: {exc}") from exc
        try:
            server.create_database("bench_queue")
            server.create_database("bench_pgqueuer")
            runs = asyncio.run(
                measure_queue_engines(
                    server.dsn("bench_queue"), server.dsn("bench_pgqueuer"), cfg, out
                )
            )
        except (QueueError, EngineError, OSError, asyncpg.PostgresError) as exc:
            raise SuiteError(f"queue bench: {exc}") from exc
        finally:
            server.stop()
    incomplete = [r for rs in runs.values() for r in rs if not r.complete]
    figures = {
        name: {
            "median_tasks_per_s": _median_rate(rs),
            "ratio_vs_pgqueuer": paired_ratio(rs, runs.get(PGQUEUER, [])),
            "rounds": [r.tasks_per_s for r in rs],
        }
        for name, rs in runs.items()
    }
    return SuiteResult(
        sections=(queue_section(runs, cfg),), figures=figures, failed=bool(incomplete)
    )
