"""The Postgres engine against real servers: primary, streaming replica, failures."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from photostack.cluster.engines import (
    EngineError,
    PostgresConfig,
    PostgresEngine,
    PostgresInstall,
    discard_postgres_data,
    ensure_port_free,
    postgres_data_home,
    prepare_postgres_install,
    replication_state,
)
from photostack.cluster.engines._pginstall import data_home_key
from photostack.cluster.engines._sysuser import STATE_ROOT
from photostack.cluster.engines.testing import (
    PostgresServer,
    free_port,
    start_engine,
    start_postgres,
)

pytestmark = pytest.mark.component

DEADLINE_S = 30.0


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = DEADLINE_S) -> None:
    """Poll ``check`` until true; fail at the deadline (replication is asynchronous)."""
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, f"condition not met within {deadline_s}s"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_data_left_behind(tmp_path: Path) -> Iterator[None]:
    """As root, data lives under the shared state root: every test must remove what it made.

    Only this test's data homes are checked: other test runs may share the state root.
    """
    yield
    data_dirs = [tmp_path / "data", tmp_path / "primary" / "data", tmp_path / "replica" / "data"]
    left = [d for d in data_dirs if (STATE_ROOT / "data" / data_home_key(d)).exists()]
    assert left == [], f"postgres data left behind for {left}"


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_pg_server_fixture_serves_queries_and_creates_databases(pg_server: PostgresServer) -> None:
    async def scenario() -> None:
        assert await pg_server.acreate_database("engines_fixture_db") is True
        assert await pg_server.acreate_database("engines_fixture_db") is False
        conn = await asyncpg.connect(pg_server.dsn("engines_fixture_db"))
        try:
            assert await conn.fetchval("select current_database()") == "engines_fixture_db"
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert asyncio.run(pg_server.engine.probe(timeout_s=2.0)) is True


def test_replica_streams_rows_written_on_the_primary(
    tmp_path: Path, new_engine_processes: Callable[[], list[psutil.Process]]
) -> None:
    primary = start_postgres(tmp_path / "primary", name="shard-1a")
    try:
        replica = start_postgres(
            tmp_path / "replica", name="shard-1b", primary=(primary.host, primary.port)
        )
    except BaseException:
        primary.stop()
        raise
    try:

        async def scenario() -> None:
            conn = await asyncpg.connect(primary.dsn())
            try:
                await conn.execute("create table t (id int primary key, v text)")
                await conn.execute("insert into t values (1, 'written on primary')")
            finally:
                await conn.close()

            standby = await asyncpg.connect(replica.dsn())
            try:
                assert await standby.fetchval("select pg_is_in_recovery()") is True

                async def row_visible() -> bool:
                    exists = await standby.fetchval("select to_regclass('t') is not null")
                    return (
                        bool(exists)
                        and (await standby.fetchval("select v from t where id = 1"))
                        == "written on primary"
                    )

                await eventually(row_visible)
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await standby.execute("insert into t values (2, 'x')")
            finally:
                await standby.close()

            async def streaming() -> bool:
                rows = await replication_state(primary.dsn())
                return [(r["application_name"], r["state"]) for r in rows] == [
                    ("shard-1b", "streaming")
                ]

            await eventually(streaming)

        asyncio.run(scenario())
    finally:
        primary.stop()  # primary first: the standby receives its shutdown checkpoint
        replica.stop()
    assert new_engine_processes() == []


def test_restart_keeps_data_and_rewrites_settings(tmp_path: Path) -> None:
    first = start_postgres(tmp_path, name="restart")
    try:
        asyncio.run(first.acreate_database("kept"))
    finally:
        first.stop(discard=False)

    second = start_postgres(tmp_path, name="restart")  # new port: photostack.conf rewritten
    try:
        settings = (second.engine.config.pgdata / "photostack.conf").read_text()
        assert f"port = {second.port}\n" in settings
        assert second.create_database("kept") is False
        conf = (second.engine.config.pgdata / "postgresql.conf").read_text()
        assert conf.count("include_if_exists = 'photostack.conf'") == 1
    finally:
        second.stop()
    assert not (tmp_path / "data" / "pg").exists()


def test_port_in_use_is_one_line_and_leaves_nothing_running(
    tmp_path: Path,
    listening_socket: socket.socket,
    new_engine_processes: Callable[[], list[psutil.Process]],
) -> None:
    port = listening_socket.getsockname()[1]
    install = prepare_postgres_install()
    data_dir = tmp_path / "data"
    engine = PostgresEngine(
        PostgresConfig(
            name="busy",
            install=install,
            pgdata=postgres_data_home(data_dir),
            port=port,
            log_path=tmp_path / "busy.log",
        )
    )

    try:
        with pytest.raises(EngineError) as info:
            start_engine(engine, log_path=tmp_path / "busy.log", deadline_s=DEADLINE_S)
    finally:
        discard_postgres_data(data_dir)

    assert str(info.value) == f"port 127.0.0.1:{port} is already in use"
    assert new_engine_processes() == []
    with pytest.raises(EngineError, match="already in use"):
        ensure_port_free("127.0.0.1", port)


def test_free_port_passes_the_port_check() -> None:
    ensure_port_free("127.0.0.1", free_port())


def test_probe_is_false_when_nothing_listens(tmp_path: Path) -> None:
    engine = PostgresEngine(
        PostgresConfig(
            name="absent",
            install=prepare_postgres_install(),
            pgdata=tmp_path / "pg",
            port=free_port(),
            log_path=tmp_path / "absent.log",
        )
    )

    assert asyncio.run(engine.probe(timeout_s=1.0)) is False


def test_missing_binaries_are_reported_in_one_line(tmp_path: Path) -> None:
    install = PostgresInstall(bin_dir=tmp_path / "nowhere", lib_dir=tmp_path / "nowhere")
    engine = PostgresEngine(
        PostgresConfig(
            name="nobin",
            install=install,
            pgdata=tmp_path / "pg",
            port=free_port(),
            log_path=tmp_path / "nobin.log",
        )
    )

    with pytest.raises(EngineError) as info:
        engine.prepare()

    assert str(info.value) == (
        f"postgres binaries not found at {tmp_path / 'nowhere'}; reinstall the project"
    )


def test_initdb_failure_reports_its_last_stderr_line(tmp_path: Path) -> None:
    pgdata = tmp_path / "not-empty"
    pgdata.mkdir(mode=0o777)
    pgdata.chmod(0o777)
    (pgdata / "stray").write_text("x")
    engine = PostgresEngine(
        PostgresConfig(
            name="badinit",
            install=prepare_postgres_install(),
            pgdata=pgdata,
            port=free_port(),
            log_path=tmp_path / "badinit.log",
        )
    )

    with pytest.raises(EngineError) as info:
        engine.prepare()

    message = str(info.value)
    assert message.startswith("initdb failed for badinit: ")
    assert "\n" not in message
    assert (pgdata / "stray").exists()  # initdb never wipes a directory it did not create


def test_base_backup_from_an_absent_primary_fails_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pgdata = postgres_data_home(data_dir)
    engine = PostgresEngine(
        PostgresConfig(
            name="orphan",
            install=prepare_postgres_install(),
            pgdata=pgdata,
            port=free_port(),
            log_path=tmp_path / "orphan.log",
            primary=("127.0.0.1", free_port()),
        )
    )
    try:
        with pytest.raises(EngineError) as info:
            engine.prepare()
        assert str(info.value).startswith("pg_basebackup failed for orphan: ")
        assert "\n" not in str(info.value)
        assert not (pgdata / "PG_VERSION").exists()
        assert not pgdata.with_name(pgdata.name + ".basebackup").exists()
    finally:
        discard_postgres_data(data_dir)


def test_install_is_prepared_once_under_concurrent_calls() -> None:
    results: list[PostgresInstall] = []
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            results.append(prepare_postgres_install())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(set(results)) == 1
    assert results[0].binary("postgres").is_file()
