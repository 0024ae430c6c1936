"""The directory's own database fails over (``_dirdb``), against real Postgres.

A synchronous directory database (primary + one standby) under two directory nodes, each
running the coordinator (for its lease) and the directory database watch. In order:

1. both nodes serve the map; a map version is published (acknowledged: the standby flushed it);
2. ``kill -9`` of the directory primary: both nodes see it down, the lowest-named one promotes
   the standby, generation 2 names it, both nodes move there, no map version is lost, a map
   change succeeds afterwards and a coordinator leads again (its lease lives there);
3. the old primary restarted *as it was* (a primary's PGDATA, generation 1 naming itself) is
   not written to: the nodes stay on generation 2 and the fence refuses it;
4. rejoined with ``follow`` (pg_rewind or a base backup) it is a standby of the new primary
   holding every map version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from fastapi import FastAPI

from photostack.blocks.storage import ReplicationMode, synchronous_standby_names
from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import PostgresServer, start_engine, start_postgres
from photostack.service.directory import Endpoint, PhysicalShard, initial_map
from photostack.service.directory._dirdb import FencedError, check_fence
from photostack.service.directory._dirdb_policy import PeerView
from photostack.service.directory._node import DirectoryNode, DirectorySettings
from tests.component.conftest import engine_unavailable

pytestmark = pytest.mark.component

NAMES = ("directory-1-primary", "directory-1-replica-1")
NODES = ("directory-1", "directory-2")
DB = "photostack"
DEADLINE_S = 30.0


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, f"condition not met within {deadline_s}s"
        await asyncio.sleep(0.05)


@pytest.fixture
def directory_db(tmp_path: Path) -> Iterator[list[PostgresServer]]:
    sync = synchronous_standby_names(ReplicationMode.SYNC, [NAMES[1], NAMES[0]])
    servers: list[PostgresServer] = []
    try:
        primary = start_postgres(tmp_path / "p", name=NAMES[0], synchronous_standby_names=sync)
        servers.append(primary)
        primary.create_database(DB)
        servers.append(
            start_postgres(
                tmp_path / "r",
                name=NAMES[1],
                primary=(primary.host, primary.port),
                synchronous_standby_names=sync,
            )
        )
    except EngineError as exc:
        for server in servers:
            server.stop()
        engine_unavailable(str(exc))
    yield servers
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


async def versions_on(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn, timeout=2.0)
    try:
        return [int(r["version"]) for r in await conn.fetch("SELECT version FROM shard_maps")]
    finally:
        await conn.close()


async def in_recovery(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2.0)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await conn.close()


async def until(check: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    async def checked() -> bool:
        return check()

    await eventually(checked, deadline_s)


def test_the_directory_database_fails_over_without_losing_a_map_version(
    directory_db: list[PostgresServer],
) -> None:
    primary, standby = directory_db
    dsns = (primary.dsn(DB), standby.dsn(DB))
    data = PhysicalShard(0, Endpoint("users-1-primary", "postgresql://postgres@127.0.0.1:9/x"))
    first = initial_map({"users": [data]})

    def settings(name: str) -> DirectorySettings:
        return DirectorySettings(
            name=name,
            primary_dsn=dsns[0],
            replica_dsns=dsns[1:],
            initial_map=first.to_json(),
            refresh_interval_s=0.2,
            replication={"users": {"replication": "async"}},
            observers=NODES,
            members=NAMES,
            dirdb={"probe_interval_s": 0.1, "down_after_s": 0.5},
        )

    nodes = [DirectoryNode(settings(name)) for name in NODES]
    by_name = {n.settings.name: n for n in nodes}

    async def peer_view(name: str) -> PeerView | None:  # what GET /v1/directory-db carries
        dirdb = by_name[name].dirdb
        assert dirdb is not None
        return dirdb.view()

    for node in nodes:
        assert node.dirdb is not None
        node.dirdb.fetch_view = peer_view

    def dirdbs() -> list[tuple[str | None, int]]:
        return [(n.dirdb.primary, n.dirdb.generation) for n in nodes if n.dirdb is not None]

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for node in nodes:
                await stack.enter_async_context(node.lifespan(FastAPI()))
            for node in nodes:
                await asyncio.wait_for(node.wait_ready(), DEADLINE_S)
            await until(lambda: dirdbs() == [(NAMES[0], 1)] * 2)
            # 1. an acknowledged map version (the standby flushed it: synchronous)
            await nodes[0].publish(first.successor())
            assert sorted(await versions_on(dsns[1])) == [1, 2]

            # both nodes saw the standby synchronous (two samples): it may be promoted
            await until(
                lambda: all(
                    n.dirdb is not None and n.dirdb.sync_standbys == NAMES[1:] for n in nodes
                )
            )

            # 2. kill -9 the directory primary
            killed_at = time.monotonic()
            await asyncio.to_thread(primary.process.kill)
            await until(lambda: dirdbs() == [(NAMES[1], 2)] * 2)
            promoted_s = time.monotonic() - killed_at
            assert promoted_s < 10.0
            assert not await in_recovery(dsns[1])
            assert nodes[0].dirdb is not None
            assert nodes[0].dirdb.promotions == 1  # the lowest name promotes
            assert sorted(await versions_on(dsns[1])) == [1, 2]  # none lost
            current = nodes[1].current()
            await nodes[1].publish(current.successor())  # a map change after the failover
            assert sorted(await versions_on(dsns[1])) == [1, 2, 3]
            await until(lambda: all(n.current().version == 3 for n in nodes))
            await until(
                lambda: any(n.coordinator is not None and n.coordinator.is_leader for n in nodes)
            )

            # 3. the old primary back as it was: generation 1 naming itself, never written to
            old = primary.engine
            proc = await asyncio.to_thread(start_engine, old, log_path=primary.process.log_path)
            try:
                conn = await asyncpg.connect(dsns[0], timeout=2.0)
                try:
                    async with conn.transaction():
                        with pytest.raises(FencedError):
                            await check_fence(conn, NAMES[1], 2)
                finally:
                    await conn.close()
                for node in nodes:
                    assert node.dirdb is not None
                    await node.dirdb.probe_once()
                assert dirdbs() == [(NAMES[1], 2)] * 2
                await nodes[0].publish(nodes[0].current().successor())
                assert 4 not in await versions_on(dsns[0])
                await asyncio.to_thread(proc.stop)

                # 4. rejoined as a standby of the new primary, with every map version
                old.follow(standby.host, standby.port)
                proc = await asyncio.to_thread(start_engine, old, log_path=primary.process.log_path)
                assert old.rejoined_by in ("pg_rewind", "pg_basebackup")

                async def caught_up() -> bool:
                    return await in_recovery(dsns[0]) and sorted(await versions_on(dsns[0])) == [
                        1,
                        2,
                        3,
                        4,
                    ]

                await eventually(caught_up)
                await until(
                    lambda: all(
                        s.in_recovery and s.streaming
                        for n in nodes
                        if n.dirdb is not None
                        for s in n.dirdb.samples
                        if s.name == NAMES[0]
                    )
                )
            finally:
                await asyncio.to_thread(proc.stop)

    asyncio.run(scenario())
