"""The distributed cache over real nodes: three redis-servers (and our cache node behind a
cuttable TCP forwarder) placed with the consistent-hash ring.

Losing a node moves only its keys, its reads fall back to the loader (the database) with one
load per key however many readers miss at once, and a node that flaps — a redis-server
restarted with its old data, or our node partitioned away and back, never restarted — serves
no value written before the flap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from photostack.blocks.cache import (
    CacheNodeAddress,
    CacheServer,
    FailureMode,
    GlobalReadThrough,
    NodeConfig,
    ReadThroughConfig,
    RingCache,
    RingCacheConfig,
)
from photostack.cluster.engines import EngineError
from photostack.cluster.engines.redis import RedisConfig, RedisEngine
from photostack.cluster.engines.testing import (
    EngineProcess,
    free_port,
    start_engine,
    start_engine_async,
)
from tests.conftest import engine_missing

pytestmark = pytest.mark.component

CONFIG = RingCacheConfig(op_timeout_s=0.5, probe_interval_s=0.05)
RT = ReadThroughConfig(ttl_s=60.0, beta=0.0)


@dataclass
class Db:
    """The system of record: a dict, counting loads per key."""

    data: dict[str, bytes] = field(default_factory=dict)
    loads: Counter[str] = field(default_factory=Counter)

    async def load(self, key: str) -> bytes | None:
        self.loads[key] += 1
        await asyncio.sleep(0.01)  # a query's worth of time, so concurrent misses overlap
        return self.data.get(key)


@dataclass
class Node:
    name: str
    engine: RedisEngine
    proc: EngineProcess

    def address(self, mode: FailureMode = FailureMode.REMAP) -> CacheNodeAddress:
        return CacheNodeAddress(self.name, "127.0.0.1", self.engine.config.port, mode)

    async def restart(self) -> None:
        self.proc = await start_engine_async(self.engine, log_path=self.engine.config.log_path)


def _start(root: Path, name: str, *, persistence: bool = False) -> Node:
    config = RedisConfig(
        name=name,
        port=free_port(),
        data_dir=root / name,
        log_path=root / f"{name}.log",
        persistence=persistence,
    )
    engine = RedisEngine(config)
    try:
        proc = start_engine(engine, log_path=config.log_path)
    except EngineError as exc:
        engine_missing(str(exc))
        raise
    return Node(name, engine, proc)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        for i in (1, 2, 3):
            started.append(_start(tmp_path, f"cache-{i}", persistence=True))
        yield started
    finally:
        for node in started:
            node.proc.stop()


@contextlib.asynccontextmanager
async def ring_of(
    addresses: list[CacheNodeAddress], config: RingCacheConfig = CONFIG
) -> AsyncIterator[RingCache]:
    ring = RingCache(addresses, config)
    await ring.start()
    try:
        yield ring
    finally:
        await ring.aclose()


async def until(check: object, deadline_s: float = 10.0) -> None:
    """Poll ``check()`` under a deadline (the prober runs on its own schedule)."""
    assert callable(check)
    async with asyncio.timeout(deadline_s):
        while not check():  # noqa: ASYNC110  (another task's state, under a deadline)
            await asyncio.sleep(0.02)


def test_keys_spread_over_the_ring_and_mget_splits_per_node(nodes: list[Node]) -> None:
    async def scenario() -> None:
        async with ring_of([n.address() for n in nodes]) as ring:
            keys = [f"k{i}" for i in range(300)]
            for key in keys:
                assert await ring.set(key, key.encode(), 60)
            found = await ring.mget([*keys, "absent"])
            assert found == {k: k.encode() for k in keys}
            owners = Counter(ring.ring.node_for(k) for k in keys)
            for node in nodes:  # each node holds exactly the keys the ring gives it
                size = await ring.client(node.name).dbsize()
                assert size == owners[node.name]  # no epoch key until a first flap
                assert owners[node.name] > 50
            await ring.delete(keys[:10])
            assert set(await ring.mget(keys[:10])) == set()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", [FailureMode.REMAP, FailureMode.FAIL_CLOSED])
def test_losing_a_node_moves_only_its_keys_and_misses_load_once(
    nodes: list[Node], mode: FailureMode
) -> None:
    db = Db({f"k{i}": b"v%d" % i for i in range(300)})
    victim = nodes[1]

    async def scenario() -> None:
        addresses = [n.address(mode if n is victim else FailureMode.REMAP) for n in nodes]
        async with ring_of(addresses) as ring:
            cache = GlobalReadThrough(ring, db.load, RT)
            for key in db.data:
                await cache.lookup(key)
            assert sum(db.loads.values()) == 300
            db.loads.clear()
            owner = {k: ring.ring.node_for(k) for k in db.data}
            lost = [k for k, o in owner.items() if o == victim.name]

            victim.proc.kill()
            # N concurrent misses of one lost key: one load
            results = await asyncio.gather(*(cache.lookup(lost[0]) for _ in range(50)))
            assert {r.value for r in results} == {db.data[lost[0]]}
            assert db.loads[lost[0]] == 1
            assert not ring.health[victim.name].up

            for key in db.data:
                assert (await cache.lookup(key)).value == db.data[key]
            # only the victim's keys were loaded again; every other key stayed put and hit
            assert set(db.loads) == set(lost)
            for key, was in owner.items():
                where = ring.route(key)
                if was != victim.name:
                    assert where.node == was
                    assert not where.remapped
                elif mode is FailureMode.REMAP:
                    assert where.node != victim.name
                    assert where.remapped
                else:
                    assert where.node is None
            if mode is FailureMode.REMAP:  # remapped keys are cached on their new node
                db.loads.clear()
                for key in lost:
                    await cache.lookup(key)
                assert not db.loads
            else:  # fail closed: every read of a lost key goes to the database
                before = sum(db.loads.values())
                for key in lost:
                    await cache.lookup(key)
                assert sum(db.loads.values()) == before + len(lost)

    asyncio.run(scenario())


def test_redis_restarted_with_old_data_serves_nothing_stale(nodes: list[Node]) -> None:
    """A node stops, the database changes meanwhile, the node restarts with its old data: the
    client that saw the failure and a client that did not both read the new value."""
    db = Db({"profile": b"old"})

    async def scenario() -> None:
        addresses = [n.address() for n in nodes]
        async with ring_of(addresses) as watcher, ring_of(addresses) as idle:
            cache = GlobalReadThrough(watcher, db.load, RT)
            idle_cache = GlobalReadThrough(idle, db.load, RT)
            assert (await cache.lookup("profile")).value == b"old"
            assert (await idle_cache.lookup("profile")).value == b"old"  # idle has connections
            owner = next(n for n in nodes if n.name == watcher.ring.node_for("profile"))

            owner.proc.stop()  # SIGTERM: the AOF keeps "profile" = old
            db.data["profile"] = b"new"
            await cache.invalidate(["profile"])  # the owner is down: this cannot reach it
            assert not watcher.health[owner.name].up
            assert (await cache.lookup("profile")).value == b"new"  # remapped, loaded again

            await owner.restart()
            raw = await watcher.client(owner.name).get("profile")
            assert raw is not None
            assert raw.endswith(b"old")
            await until(lambda: watcher.health[owner.name].up)
            assert watcher.route("profile").node == owner.name
            assert (await cache.lookup("profile")).value == b"new"
            # the idle client never saw the failure: its reconnect bumps the epoch
            assert (await idle_cache.lookup("profile")).value == b"new"

    asyncio.run(scenario())


class Forwarder:
    """A TCP forwarder to a node that can be cut (every connection dropped, new ones refused)
    and healed: a partition without a restart."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def heal(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_partitioned_cache_node_comes_back_without_stale_reads(nodes: list[Node]) -> None:
    db = Db({f"p{i}": b"old" for i in range(40)})

    async def scenario() -> None:
        server = CacheServer(NodeConfig(port=0))
        await server.start()
        forwarder = Forwarder(server.port)
        await forwarder.heal()
        ours = CacheNodeAddress("ours", "127.0.0.1", forwarder.port)
        try:
            async with ring_of([ours, nodes[0].address()]) as ring:
                cache = GlobalReadThrough(ring, db.load, RT)
                keys = [k for k in db.data if ring.ring.node_for(k) == "ours"]
                assert keys
                for key in keys:
                    assert (await cache.lookup(key)).value == b"old"

                await forwarder.cut()
                for key in keys:
                    db.data[key] = b"new"
                await cache.invalidate(keys)  # cannot reach "ours": the old values stay there
                assert (await cache.lookup(keys[0])).value == b"new"
                assert not ring.health["ours"].up

                await forwarder.heal()
                await until(lambda: ring.health["ours"].up)
                assert all(server.core.cache.peek(k.encode()) is not None for k in keys)
                for key in keys:
                    assert (await cache.lookup(key)).value == b"new"
                assert ring.stats.epoch_misses >= len(keys)
        finally:
            with contextlib.suppress(AssertionError):
                await forwarder.cut()
            await server.aclose()

    asyncio.run(scenario())
