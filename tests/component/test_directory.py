"""Directory nodes and their client on real Postgres and real sockets: the first map, versions
that only increase, convergence of two nodes, failover, a restart that keeps the map, and a
"wrong shard" answer that makes an app refresh its map and retry once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from photostack.blocks.storage import logical_name
from photostack.cluster.engines.testing import PostgresServer
from photostack.service._photos import PhotoStore
from photostack.service.directory import (
    ClusterMap,
    DirectoryClientConfig,
    DirectorySettings,
    Endpoint,
    HttpTransport,
    MapGuard,
    MapRouting,
    PhysicalShard,
    claim_ownership,
    create_directory_app,
    initial_map,
)
from photostack.service.schema import apply_schema
from photostack.service.settings import Peer

pytestmark = pytest.mark.component

DEADLINE_S = 20.0


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[Peer]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", ws="none"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    end = time.monotonic() + DEADLINE_S
    while not server.started:
        assert not task.done(), "uvicorn stopped while starting"
        assert time.monotonic() < end, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield Peer(str(app.title).rsplit(" ", 1)[-1], "127.0.0.1", sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


async def until(predicate: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not await predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def data_map(pg: PostgresServer, prefix: str, port: int | None = None) -> ClusterMap:
    def shard(group: str, i: int) -> PhysicalShard:
        dsn = pg.dsn(f"{prefix}_{group}_{i + 1}")
        if port is not None:
            dsn = dsn.replace(f":{pg.port}/", f":{port}/")
        return PhysicalShard(i, Endpoint(f"{group}-{i + 1}-primary", dsn))

    return initial_map({g: [shard(g, i) for i in range(n)] for g, n in LAYOUT.items()})


LAYOUT = {"users": 1, "social": 1, "photos": 2}


@pytest.fixture
def directory_db(pg_server: PostgresServer) -> str:
    name = f"dir{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    return pg_server.dsn(name)


def settings(name: str, dsn: str, first: ClusterMap) -> DirectorySettings:
    return DirectorySettings(
        name=name, primary_dsn=dsn, initial_map=first.to_json(), refresh_interval_s=0.05
    )


async def get(peer: Peer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{peer.host}:{peer.port}") as client:
        return await client.get(path)


async def put(peer: Peer, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{peer.host}:{peer.port}") as client:
        return await client.put("/v1/map", json=body)


def test_two_nodes_serve_one_versioned_map(pg_server: PostgresServer, directory_db: str) -> None:
    first = data_map(pg_server, "x")

    async def main() -> None:
        async with (
            serve(create_directory_app(settings("directory-1", directory_db, first))) as one,
            serve(create_directory_app(settings("directory-2", directory_db, first))) as two,
        ):
            for peer in (one, two):
                await until(lambda p=peer: _ready(p), f"{peer.name} ready")
                r = await get(peer, "/v1/map")
                assert r.status_code == 200
                assert ClusterMap.from_json(r.json()) == first
                assert (await get(peer, "/v1/map/version")).json()["version"] == 1

            second = first.successor({"photos": {"logical-0": 1}})
            r = await put(one, second.to_json())
            assert r.status_code == 200
            assert r.json() == {"version": 2}

            async def two_has_v2() -> bool:
                return bool((await get(two, "/v1/map/version")).json()["version"] == 2)

            await until(two_has_v2, "the second node to see version 2")
            stale = await put(two, second.to_json())
            assert stale.status_code == 409
            assert stale.json()["error"]["code"] == "stale_version"
            older = await put(two, first.to_json())
            assert older.status_code == 409
            bad = await put(one, {"version": 3, "groups": {"photos": {}}})
            assert bad.status_code == 422
            assert bad.json()["error"]["code"] == "invalid_map"
            assert (await get(one, "/v1/map/version")).json()["version"] == 2

        # A restart keeps the map; a restart on other ports keeps the placement, new addresses.
        moved = data_map(pg_server, "x", port=pg_server.port + 1)
        async with serve(create_directory_app(settings("directory-1", directory_db, moved))) as p:
            await until(lambda: _ready(p), "restarted node ready")
            served = ClusterMap.from_json((await get(p, "/v1/map")).json())
            assert served.version == 3
            assert served.group("photos").placement.entries["logical-0"] == 1
            dsn = served.group("users").shards[0].primary.dsn
            assert f":{pg_server.port + 1}/" in dsn

    asyncio.run(main())


async def _ready(peer: Peer) -> bool:
    return (await get(peer, "/healthz")).status_code == 200


def test_the_client_survives_losing_a_directory_node(
    pg_server: PostgresServer, directory_db: str
) -> None:
    first = data_map(pg_server, "y")

    async def main() -> None:
        async with serve(create_directory_app(settings("directory-2", directory_db, first))) as two:
            await until(lambda: _ready(two), "directory-2 ready")
            async with serve(
                create_directory_app(settings("directory-1", directory_db, first))
            ) as one:
                await until(lambda: _ready(one), "directory-1 ready")
                opened: list[str] = []

                async def open_pool(group: str, dsn: str) -> str:
                    opened.append(dsn)
                    return dsn

                transport = HttpTransport()
                routing: MapRouting[str] = MapRouting(
                    (one, two), transport, open_pool, DirectoryClientConfig(0.05, 0.5)
                )
                await routing.start()
                assert routing.installed_version == 1
            # directory-1 is gone: the next poll and a publish through directory-2 still work
            second = first.successor({"photos": {"logical-1": 0}})
            assert (await put(two, second.to_json())).status_code == 200
            assert await routing.refresh(2) is True
            assert routing.installed_version == 2
            assert routing.client.failovers >= 1
            assert routing.router.partitioner("photos").shard_count == 2
            await transport.aclose()

    asyncio.run(main())


def test_a_wrong_shard_answer_refreshes_the_map_and_retries_once(
    pg_server: PostgresServer, directory_db: str
) -> None:
    prefix = f"w{uuid.uuid4().hex[:6]}"
    for group, count in LAYOUT.items():
        for i in range(count):
            pg_server.create_database(f"{prefix}_{group}_{i + 1}")
    first = data_map(pg_server, prefix)

    async def main() -> None:
        for name, group in first.groups.items():
            for shard in group.shards:
                await apply_schema(name, shard.primary.dsn)
                conn = await asyncpg.connect(shard.primary.dsn)
                try:
                    await claim_ownership(conn, group.owned_by(shard.index), 1)
                finally:
                    await conn.close()
        node = create_directory_app(settings("directory-1", directory_db, first))
        pools: list[asyncpg.Pool[Any]] = []

        async def open_pool(group: str, dsn: str) -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
            pools.append(pool)
            return pool

        async with serve(node) as peer:
            await until(lambda: _ready(peer), "directory ready")
            transport = HttpTransport()
            # a long poll interval: only the wrong-shard answer can refresh this app's map
            routing: MapRouting[Any] = MapRouting(
                (peer,), transport, open_pool, DirectoryClientConfig(poll_interval_s=3600)
            )
            router = await routing.start()
            guard = MapGuard(routing.current, routing.refresh)
            photos = PhotoStore(router, static_base_url="http://s", guard=guard)
            users = router.shards("users")[0]
            owner = "owner" + uuid.uuid4().hex[:11]
            await users.execute("INSERT INTO users (id, username) VALUES ($1, $2)", owner, owner)
            group = first.group("photos")
            logical, old = group.logical_of(owner), group.physical_of(owner)
            new = 1 - old

            # The cut-over of a reshard: ownership moves, then the directory publishes v2.
            second = first.successor({"photos": {logical_name(logical): new}})
            old_conn = await asyncpg.connect(group.shards[old].primary.dsn)
            new_conn = await asyncpg.connect(group.shards[new].primary.dsn)
            try:
                await old_conn.execute(
                    "DELETE FROM shard_ownership WHERE logical_shard = $1", logical
                )
                await new_conn.execute("INSERT INTO shard_ownership VALUES ($1, 2)", logical)
                assert (await put(peer, second.to_json())).status_code == 200

                made = await photos.create_photo_metadata(owner, "moved")
                assert guard.wrong_shard_answers == 1
                assert routing.installed_version == 2
                assert (
                    await new_conn.fetchval("SELECT count(*) FROM photos WHERE id = $1", made["id"])
                    == 1
                )
                assert (
                    await old_conn.fetchval("SELECT count(*) FROM photos WHERE id = $1", made["id"])
                    == 0
                )
                assert (await photos.get_photo(made["id"]))["caption"] == "moved"
            finally:
                await old_conn.close()
                await new_conn.close()
                await transport.aclose()
                for pool in pools:
                    await pool.close()

    asyncio.run(main())
