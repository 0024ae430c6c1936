"""``/healthz`` and ``/metrics`` of a worker process over HTTP, for the supervisor's probes.

Served by uvicorn inside the worker's event loop; uvicorn's own signal handling is switched off
so SIGTERM stays with the worker's phased stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.blocks.queue._metrics import QueueMetrics
from photostack.blocks.queue._worker import Worker, WorkerState

__all__ = ["AdminHttp", "create_admin_app"]


def create_admin_app(worker: Worker, metrics: QueueMetrics) -> Starlette:
    async def healthz(_: Request) -> Response:
        ok = worker.state is WorkerState.RUNNING
        body = {
            "status": "ok" if ok else worker.state.value,
            "worker": worker.config.worker_id,
            "queue": metrics.queue,
            "busy": worker.busy,
            "concurrency": worker.config.concurrency,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        await metrics.refresh(worker.backend, busy=worker.busy)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics_endpoint)])


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the worker owns SIGTERM/SIGINT


class AdminHttp:
    """The admin app on ``host:port``; ``start()`` returns once it listens."""

    def __init__(self, worker: Worker, metrics: QueueMetrics, host: str, port: int) -> None:
        config = uvicorn.Config(
            create_admin_app(worker, metrics),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it (e.g. port taken: SystemExit)
                raise OSError("admin HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
