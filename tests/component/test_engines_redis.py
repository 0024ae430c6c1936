"""The Redis engine against real servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis.asyncio

from photostack.cluster.engines import EngineError, RedisConfig, RedisEngine
from photostack.cluster.engines.testing import (
    RedisServer,
    free_port,
    running,
    start_engine,
)

pytestmark = pytest.mark.component

DEADLINE_S = 30.0


def test_redis_server_fixture_answers_set_and_get(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            assert await client.ping() is True
            await client.set("engines:k", "v")
            assert await client.get("engines:k") == b"v"
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_start_ping_set_get_stop(
    tmp_path: Path, new_engine_processes: Callable[[], list[psutil.Process]]
) -> None:
    engine = RedisEngine(
        RedisConfig(
            name="cache-t", port=free_port(), data_dir=tmp_path, log_path=tmp_path / "r.log"
        )
    )

    async def scenario() -> int:
        async with running(engine, log_path=tmp_path / "r.log", deadline_s=DEADLINE_S) as proc:
            client = redis.asyncio.Redis.from_url(engine.url)
            try:
                await client.set("k", "v")
                assert await client.get("k") == b"v"
            finally:
                await client.aclose()
            return proc.pid

    pid = asyncio.run(scenario())

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert asyncio.run(engine.probe(timeout_s=1.0)) is False
    assert new_engine_processes() == []


def test_persistent_node_keeps_writes_across_restart(tmp_path: Path) -> None:
    config = RedisConfig(
        name="cache-p",
        port=free_port(),
        data_dir=tmp_path,
        log_path=tmp_path / "r.log",
        persistence=True,
    )
    engine = RedisEngine(config)

    async def write() -> None:
        client = redis.asyncio.Redis.from_url(engine.url)
        try:
            await client.set("durable", "yes")
        finally:
            await client.aclose()

    async def read() -> bytes | str | None:
        client = redis.asyncio.Redis.from_url(engine.url)
        try:
            value: bytes | str | None = await client.get("durable")
        finally:
            await client.aclose()
        return value

    with start_engine(engine, log_path=config.log_path, deadline_s=DEADLINE_S):
        asyncio.run(write())
    with start_engine(engine, log_path=config.log_path, deadline_s=DEADLINE_S):
        assert asyncio.run(read()) == b"yes"


def test_port_in_use_is_one_line_and_leaves_nothing_running(
    tmp_path: Path, new_engine_processes: Callable[[], list[psutil.Process]]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        engine = RedisEngine(
            RedisConfig(name="cache-b", port=port, data_dir=tmp_path, log_path=tmp_path / "r.log")
        )

        with pytest.raises(EngineError) as info:
            start_engine(engine, log_path=tmp_path / "r.log", deadline_s=DEADLINE_S)

    assert str(info.value) == f"port 127.0.0.1:{port} is already in use"
    assert new_engine_processes() == []


def test_a_server_that_dies_while_starting_is_reported_with_its_log(
    tmp_path: Path, new_engine_processes: Callable[[], list[psutil.Process]]
) -> None:
    engine = RedisEngine(
        RedisConfig(
            name="cache-x",
            port=free_port(),
            data_dir=tmp_path,
            log_path=tmp_path / "r.log",
            maxmemory_policy="no-such-policy",
        )
    )

    with pytest.raises(EngineError) as info:
        start_engine(engine, log_path=tmp_path / "r.log", deadline_s=DEADLINE_S)

    assert str(info.value).startswith("cache-x exited with status 1 while starting: ")
    assert "\n" not in str(info.value)
    assert new_engine_processes() == []
