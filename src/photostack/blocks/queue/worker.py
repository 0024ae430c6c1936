"""``python -m photostack.blocks.queue.worker``: one supervised worker process.

Leases tasks from a queue (Postgres or RabbitMQ engine), runs the handlers of a
:class:`TaskRegistry` named by ``--tasks module:attribute``, serves ``/healthz`` and
``/metrics`` on ``--port``, and on SIGTERM/SIGINT stops in phases: stop leasing, let running
tasks finish within ``--stop-deadline-s``, release the rest. Exit codes are named below.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from dataclasses import replace

import click

from photostack.blocks.queue._backend import QueueBackend
from photostack.blocks.queue._errors import QueueError, QueueUnavailable
from photostack.blocks.queue._http import AdminHttp
from photostack.blocks.queue._metrics import QueueMetrics
from photostack.blocks.queue._model import QueueConfig
from photostack.blocks.queue._postgres import PostgresQueue
from photostack.blocks.queue._rabbit import RabbitQueue
from photostack.blocks.queue._worker import TaskRegistry, Worker, WorkerConfig

__all__ = [
    "EXIT_ADMIN_PORT",
    "EXIT_ENGINE_UNAVAILABLE",
    "EXIT_OK",
    "build_backend",
    "load_registry",
    "main",
    "serve",
]

EXIT_OK = 0
EXIT_ENGINE_UNAVAILABLE = 3  # the engine could not be reached, or failed for too long
EXIT_ADMIN_PORT = 4  # the /healthz + /metrics port could not be bound


def load_registry(spec: str) -> TaskRegistry:
    """The TaskRegistry at ``module:attribute``. Raises ValueError with one line."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--tasks wants module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--tasks: cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attribute, None)
    if not isinstance(registry, TaskRegistry):
        raise ValueError(f"--tasks: {spec} is not a TaskRegistry")
    return registry


def build_backend(engine: str, dsn: str, amqp_url: str | None, config: QueueConfig) -> QueueBackend:
    if engine == "postgres":
        return PostgresQueue(dsn, config)
    if amqp_url is None:
        raise ValueError("--engine rabbitmq needs --amqp-url")
    return RabbitQueue(amqp_url, dsn, config)


async def serve(
    backend: QueueBackend,
    registry: TaskRegistry,
    config: WorkerConfig,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit code."""
    metrics = QueueMetrics(backend.config.name)
    worker = Worker(backend, registry, config, hooks=metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    admin = AdminHttp(worker, metrics, host, port) if port is not None else None
    try:
        try:
            await backend.start()
        except QueueUnavailable as exc:
            click.echo(f"error: {exc}", err=True)
            return EXIT_ENGINE_UNAVAILABLE
        if admin is not None:
            try:
                await admin.start()
            except (OSError, SystemExit):
                click.echo(f"error: cannot serve admin HTTP on {host}:{port}", err=True)
                return EXIT_ADMIN_PORT
        where = f" http=http://{host}:{port}" if port is not None else ""
        click.echo(
            f"ready: worker {config.worker_id} queue={backend.config.name}"
            f" concurrency={config.concurrency}{where}"
        )
        sys.stdout.flush()
        try:
            await worker.run()
        except QueueError as exc:
            click.echo(f"error: {exc}", err=True)
            return EXIT_ENGINE_UNAVAILABLE
        return EXIT_OK
    finally:
        if admin is not None:
            await admin.aclose()
        await backend.aclose()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Choice(["postgres", "rabbitmq"]), default="postgres")
@click.option("--dsn", required=True, help="Queue database (postgres) or status store (rabbitmq).")
@click.option("--amqp-url", default=None, help="RabbitMQ URL (rabbitmq engine).")
@click.option("--queue", "queue_name", required=True, help="Queue name.")
@click.option("--tasks", "tasks_spec", required=True, help="module:attribute of a TaskRegistry.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--visibility-timeout-s", type=click.FloatRange(min=0.1), default=30.0)
@click.option("--poll-interval-s", type=click.FloatRange(min=0.01), default=1.0)
@click.option("--stop-deadline-s", type=click.FloatRange(min=0), default=10.0)
@click.option("--max-length", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="/healthz, /metrics.")
@click.option("--worker-id", default=None)
def cli(
    *,
    engine: str,
    dsn: str,
    amqp_url: str | None,
    queue_name: str,
    tasks_spec: str,
    concurrency: int,
    visibility_timeout_s: float,
    poll_interval_s: float,
    stop_deadline_s: float,
    max_length: int,
    host: str,
    port: int | None,
    worker_id: str | None,
) -> None:
    """Run a queue worker until SIGTERM."""
    try:
        registry = load_registry(tasks_spec)
        config = QueueConfig(name=queue_name, max_length=max_length, policies=registry.policies())
        backend = build_backend(engine, dsn, amqp_url, config)
    except (ValueError, QueueError) as exc:
        raise click.UsageError(str(exc)) from exc
    worker_config = WorkerConfig(
        concurrency=concurrency,
        visibility_timeout_s=visibility_timeout_s,
        poll_interval_s=poll_interval_s,
        stop_deadline_s=stop_deadline_s,
    )
    if worker_id:
        worker_config = replace(worker_config, worker_id=worker_id)
    code = asyncio.run(serve(backend, registry, worker_config, host=host, port=port))
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="photostack-worker", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
