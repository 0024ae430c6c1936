"""The worker as a process: ready line, /healthz and /metrics, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from photostack.blocks.queue import PostgresQueue, QueueConfig, TaskContext, TaskRegistry
from photostack.blocks.queue.worker import EXIT_ENGINE_UNAVAILABLE, EXIT_OK
from photostack.cluster.engines.testing import PostgresServer, free_port

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = TaskRegistry()


@REGISTRY.task("noop")
async def _noop(ctx: TaskContext) -> Any:
    return ctx.payload


@REGISTRY.task("hang")
async def _hang(ctx: TaskContext) -> Any:
    await asyncio.Event().wait()  # only a stop ends it


def _worker(dsn: str, queue: str, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "photostack.blocks.queue.worker",
        "--dsn",
        dsn,
        "--queue",
        queue,
        "--tasks",
        "tests.component.test_queue_worker_process:REGISTRY",
        "--port",
        str(port),
        "--poll-interval-s",
        "0.1",
        *extra,
    ]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> httpx.Response:
    until = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode}: {log.read_text()}")
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            if time.monotonic() > until:
                pytest.fail(f"worker never served {url}: {log.read_text()}")
            time.sleep(0.05)


def _poll(check: Any, what: str) -> None:
    until = time.monotonic() + 20
    while not check():
        if time.monotonic() > until:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_worker_process_serves_health_and_metrics_and_stops_gracefully(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    pg_server.create_database("queue_process")
    dsn = pg_server.dsn("queue_process")
    config = QueueConfig(name="proc")

    async def enqueue(kind: str, payload: Any) -> str:
        queue = PostgresQueue(dsn, config)
        await queue.start()
        try:
            return await queue.enqueue(kind, payload)
        finally:
            await queue.aclose()

    async def state(task_id: str) -> tuple[str, int]:
        queue = PostgresQueue(dsn, config)
        await queue.start()
        try:
            info = await queue.status(task_id)
        finally:
            await queue.aclose()
        return info.state.value, info.attempts

    port = free_port()
    log = tmp_path / "worker.log"
    proc = _worker(dsn, "proc", port, log, "--stop-deadline-s", "0.5")
    try:
        health = _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        until = time.monotonic() + 20
        # The admin port may answer before the worker loop starts: 503 "new" means not ready yet.
        while health.status_code == 503 and health.json()["status"] == "new":
            if time.monotonic() > until:
                pytest.fail("worker never left state 'new'")
            time.sleep(0.05)
            health = _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        assert health.status_code == 200
        assert health.json()["status"] == "ok"

        done = asyncio.run(enqueue("noop", {"x": 1}))
        _poll(lambda: asyncio.run(state(done))[0] == "succeeded", "noop task")
        hung = asyncio.run(enqueue("hang", {}))
        _poll(lambda: asyncio.run(state(hung))[0] == "running", "hang task to start")

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'photostack_queue_succeeded_total{kind="noop",queue="proc"} 1.0' in metrics
        assert 'photostack_queue_running{queue="proc"} 1.0' in metrics
        for name in ("depth", "oldest_age_seconds", "dead_letters"):
            assert f'photostack_queue_{name}{{queue="proc"}}' in metrics
        assert 'photostack_worker_busy{queue="proc"} 1.0' in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "ready: worker" in log.read_text()
    assert asyncio.run(state(hung)) == ("queued", 0)  # released at stop, attempt not counted


def test_unreachable_engine_exits_with_its_code(tmp_path: Path) -> None:
    dead_port = free_port()
    log = tmp_path / "worker.log"
    proc = _worker(f"postgresql://u@127.0.0.1:{dead_port}/x", "proc", free_port(), log)
    assert proc.wait(30) == EXIT_ENGINE_UNAVAILABLE
    assert "error:" in log.read_text()
