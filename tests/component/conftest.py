"""Real engines for component tests, started once per session.

``pg_server``: a Postgres primary (``.host``, ``.port``, ``.dsn(dbname)``,
``.create_database(name)`` and ``await .acreate_database(name)``). ``redis_server``: a Redis
node (``.host``, ``.port``, ``.url``). Both work whether the tests run as root (CI) or as a
normal user.

An engine that cannot start fails the tests under CI=true and skips them elsewhere, with the
one-line reason either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import (
    PostgresServer,
    RedisServer,
    engine_processes,
    start_postgres,
    start_redis,
)


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = 20.0) -> None:
    """Poll ``check`` until it is true; fail at the deadline (replication is asynchronous)."""
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, f"condition not met within {deadline_s}s"
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def streaming_pair(
    root: Path, primary_name: str, replica_name: str
) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A Postgres primary and one streaming replica of it (``pg_basebackup -R``), under ``root``;
    both stopped afterwards. An engine that cannot start: see :func:`engine_unavailable`."""
    servers: list[PostgresServer] = []
    try:
        primary = start_postgres(root / "p", name=primary_name)
        servers.append(primary)
        servers.append(
            start_postgres(root / "r", name=replica_name, primary=(primary.host, primary.port))
        )
    except EngineError as exc:
        for server in servers:
            server.stop()
        engine_unavailable(str(exc))
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()


def engine_unavailable(reason: str) -> NoReturn:
    """Fail in CI (a missing engine there is a broken build); skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"engine unavailable: {reason}", pytrace=False)
    pytest.skip(f"engine unavailable: {reason}")


@pytest.fixture(scope="session", autouse=True)
def _no_engine_left_behind() -> Iterator[None]:
    """After the session's fixtures are torn down, no engine process of ours may survive."""
    yield
    leftovers = engine_processes()
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"engine processes left running: {leftovers}"


@pytest.fixture
def new_engine_processes() -> Callable[[], list[psutil.Process]]:
    """Engine processes started since this test began (session servers excluded)."""
    baseline = {proc.pid for proc in engine_processes()}

    def new() -> list[psutil.Process]:
        return [proc for proc in engine_processes() if proc.pid not in baseline]

    return new


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    try:
        server = start_postgres(tmp_path_factory.mktemp("pg_server"), name="pg-session")
    except EngineError as exc:
        engine_unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = start_redis(tmp_path_factory.mktemp("redis_server"), name="redis-session")
    except EngineError as exc:
        engine_unavailable(str(exc))
    yield server
    server.stop()
