"""Start real engines in tests: spawn, wait for readiness against a deadline, always clean up.

Typical use::

    with start_engine(engine, log_path=tmp_path / "pg.log") as proc:
        ...  # engine is ready; proc.stop() runs on exit, even on failure

    async with running(engine, log_path=tmp_path / "redis.log") as proc:
        ...

    server = start_postgres(tmp_path / "pg")  # a ready primary with .dsn(), .create_database()
    server.stop()

Processes get their own session (process group), so stopping never leaves a Postgres backend
behind, and any failure while starting kills what was spawned before the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from photostack.cluster.engines._pginstall import (
    discard_postgres_data,
    postgres_data_home,
    prepare_postgres_install,
)
from photostack.cluster.engines._sysuser import last_line, run_as
from photostack.cluster.engines.base import Engine, EngineError, ProcessSpec
from photostack.cluster.engines.postgres import (
    PostgresConfig,
    PostgresEngine,
    ensure_database,
    postgres_dsn,
)
from photostack.cluster.engines.redis import RedisConfig, RedisEngine

__all__ = [
    "EngineProcess",
    "PostgresServer",
    "RedisServer",
    "engine_processes",
    "free_port",
    "running",
    "spawn",
    "start_engine",
    "start_engine_async",
    "start_postgres",
    "start_redis",
    "wait_ready",
]

POLL_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 1.0
_TAIL_BYTES = 4096


ENGINE_PROCESS_NAMES = frozenset({"postgres", "redis-server"})


def engine_processes() -> list[psutil.Process]:
    """Live Postgres or Redis processes descended from this process: should be ``[]`` after
    every test that stopped what it started."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() in ENGINE_PROCESS_NAMES and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out for ``host`` (free now; racy by nature, fine in tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _log_tail(log_path: Path) -> str:
    try:
        with log_path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            return last_line(handle.read().decode(errors="replace"))
    except OSError:
        return ""


def spawn(spec: ProcessSpec, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``spec`` in its own session with stdout and stderr appended to ``log_path``.

    Raises EngineError when the program cannot be executed.
    """
    ident = run_as(spec.user)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {spec.argv[0]}: {exc.strerror}") from exc


class EngineProcess:
    """A spawned engine process. ``stop()`` is idempotent; use it as a context manager."""

    def __init__(
        self, engine: Engine, spec: ProcessSpec, process: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.process = process
        self.log_path = log_path

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.process.returncode}"
        return f"<EngineProcess {self.engine.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        """Last line of the engine's log: usually why it died."""
        return _log_tail(self.log_path)

    def stop(self) -> int:
        """Graceful stop with the spec's signal, SIGKILL after ``stop_timeout_s``; the exit code.

        Whatever is left of the process group is killed too, so no child outlives the test.
        """
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.spec.stop_signal)
            try:
                self.process.wait(timeout=self.spec.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the process and its group now (crash tests use this too)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self._kill_group()
        self.process.wait()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def wait_ready(
    proc: EngineProcess, *, deadline_s: float, poll_interval_s: float = POLL_INTERVAL_S
) -> None:
    """Probe until ready. Raises EngineError if the process exits or ``deadline_s`` passes."""
    deadline = time.monotonic() + deadline_s
    name = proc.engine.name
    while True:
        code = proc.process.poll()
        if code is not None:
            tail = proc.log_tail() or "no log output"
            raise EngineError(f"{name} exited with status {code} while starting: {tail}")
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise EngineError(f"{name} not ready within {deadline_s:g}s: {proc.log_tail()}")
        if await proc.engine.probe(min(PROBE_TIMEOUT_S, remaining_s)):
            return
        await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))


def start_engine(engine: Engine, *, log_path: Path, deadline_s: float = 60.0) -> EngineProcess:
    """Prepare, spawn and wait until ``engine`` is ready (from sync code). Raises EngineError.

    On any failure the process is stopped before the error propagates.
    """
    engine.prepare()
    spec = engine.process_spec()
    proc = EngineProcess(engine, spec, spawn(spec, log_path), log_path)
    try:
        asyncio.run(wait_ready(proc, deadline_s=deadline_s))
    except BaseException:
        proc.kill()
        raise
    return proc


async def start_engine_async(
    engine: Engine, *, log_path: Path, deadline_s: float = 60.0
) -> EngineProcess:
    """Async :func:`start_engine`; the blocking prepare runs in a worker thread."""
    await asyncio.to_thread(engine.prepare)
    spec = engine.process_spec()
    proc = EngineProcess(engine, spec, spawn(spec, log_path), log_path)
    try:
        await wait_ready(proc, deadline_s=deadline_s)
    except BaseException:
        proc.kill()
        raise
    return proc


@contextlib.asynccontextmanager
async def running(
    engine: Engine, *, log_path: Path, deadline_s: float = 60.0
) -> AsyncIterator[EngineProcess]:
    """``async with running(engine, log_path=...) as proc``: ready inside, stopped after."""
    proc = await start_engine_async(engine, log_path=log_path, deadline_s=deadline_s)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


@dataclass(frozen=True)
class PostgresServer:
    """A running Postgres node for tests: where it listens and how to reach its databases."""

    engine: PostgresEngine
    process: EngineProcess
    data_dir: Path

    @property
    def host(self) -> str:
        return self.engine.config.host

    @property
    def port(self) -> int:
        return self.engine.config.port

    def dsn(self, dbname: str = "postgres") -> str:
        return postgres_dsn(self.host, self.port, dbname)

    async def acreate_database(self, name: str) -> bool:
        """Create database ``name`` if missing; True when created. Raises EngineError."""
        return await ensure_database(self.host, self.port, name)

    def create_database(self, name: str) -> bool:
        """Sync :meth:`acreate_database` (not from inside a running event loop)."""
        return asyncio.run(self.acreate_database(name))

    def stop(self, *, discard: bool = True) -> None:
        """Stop the server; with ``discard`` also remove its data (which may live outside
        ``data_dir`` when running as root)."""
        self.process.stop()
        if discard:
            discard_postgres_data(self.data_dir)


def start_postgres(
    workdir: Path,
    *,
    name: str = "pg-test",
    port: int | None = None,
    primary: tuple[str, int] | None = None,
    synchronous_standby_names: str = "",
    deadline_s: float = 120.0,
) -> PostgresServer:
    """A ready Postgres primary (or replica of ``primary``) with its files under ``workdir``.

    Works as root (runs the server as the ``photostack`` system user) and as a normal user.
    Raises EngineError.
    """
    install = prepare_postgres_install()
    data_dir = workdir / "data"
    config = PostgresConfig(
        name=name,
        install=install,
        pgdata=postgres_data_home(data_dir),
        port=port if port is not None else free_port(),
        log_path=workdir / f"{name}.log",
        primary=primary,
        synchronous_standby_names=synchronous_standby_names,
    )
    engine = PostgresEngine(config)
    try:
        proc = start_engine(engine, log_path=config.log_path, deadline_s=deadline_s)
    except BaseException:
        discard_postgres_data(data_dir)
        raise
    return PostgresServer(engine=engine, process=proc, data_dir=data_dir)


@dataclass(frozen=True)
class RedisServer:
    """A running Redis node for tests."""

    engine: RedisEngine
    process: EngineProcess

    @property
    def host(self) -> str:
        return self.engine.config.host

    @property
    def port(self) -> int:
        return self.engine.config.port

    @property
    def url(self) -> str:
        return self.engine.url

    def stop(self) -> None:
        self.process.stop()


def start_redis(
    workdir: Path, *, name: str = "redis-test", port: int | None = None, deadline_s: float = 30.0
) -> RedisServer:
    """A ready, non-persistent Redis with its files under ``workdir``. Raises EngineError."""
    config = RedisConfig(
        name=name,
        port=port if port is not None else free_port(),
        data_dir=workdir / "data",
        log_path=workdir / f"{name}.log",
    )
    engine = RedisEngine(config)
    proc = start_engine(engine, log_path=config.log_path, deadline_s=deadline_s)
    return RedisServer(engine=engine, process=proc)
