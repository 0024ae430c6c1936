"""Real engines for component tests, started once per session.

``pg_server``: a Postgres primary (``.host``, ``.port``, ``.dsn(dbname)``,
``.create_database(name)`` and ``await .acreate_database(name)``). ``redis_server``: a Redis
node (``.host``, ``.port``, ``.url``). Both work whether the tests run as root (CI) or as a
normal user.

An engine that cannot start fails the tests under CI=true and skips them elsewhere, with the
one-line reason either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
