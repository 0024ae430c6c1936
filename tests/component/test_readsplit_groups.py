"""Replica reads of the social and photos groups, through the stores, on real Postgres.

One primary and one streaming replica hold a database per group (``users``, ``social``,
``photos``). With the replica's replay paused, a follow and a photo are written: a follower page
(social) and a photo page and photo (photos) read without a token come from the replica (they
do not see the writes); with the read-your-writes token of those writes they come from the
primary (they do); once the replica replays past the token, the same reads use it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from photostack.blocks.storage import ShardRouter
from photostack.cluster.engines.testing import PostgresServer
from photostack.service import schema
from photostack.service._photos import PhotoNotFoundError, PhotoStore
from photostack.service._replication import Replication, _read_after
from photostack.service._store import EdgeKind, UserStore
from photostack.service.directory import Endpoint, PhysicalShard, initial_map
from photostack.service.directory._routing import epoch_dsn
from tests.component.conftest import eventually, streaming_pair

pytestmark = pytest.mark.component

GROUPS = ("users", "social", "photos")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with streaming_pair(tmp_path, "g-1-primary", "g-1-replica-1") as servers:
        yield servers


def test_social_and_photos_reads_use_the_replica_and_honour_the_token(
    pair: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, replica = pair

    async def scenario() -> None:
        for group in GROUPS:
            await primary.acreate_database(f"{group}_db")
            await schema.apply_schema(group, primary.dsn(f"{group}_db"))
        pools: list[Any] = []

        async def open_pool(_: str, dsn: str) -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=2.0)
            pools.append(pool)
            return pool

        try:
            await run(primary, replica, open_pool)
        finally:
            for pool in pools:
                pool.terminate()

    asyncio.run(scenario())


async def run(
    primary: PostgresServer,
    replica: PostgresServer,
    open_pool: Callable[[str, str], Awaitable[Any]],
) -> None:
    shard_map = initial_map(
        {
            g: [
                PhysicalShard(
                    0,
                    Endpoint(f"{g}-1-primary", primary.dsn(f"{g}_db")),
                    (Endpoint(f"{g}-1-replica-1", replica.dsn(f"{g}_db")),),
                )
            ]
            for g in GROUPS
        }
    )
    registry = CollectorRegistry()
    layer = Replication(
        {g: {"consistency": "cp", "max_replica_lag_s": 60.0} for g in GROUPS}, open_pool, registry
    )
    dsns = {g: epoch_dsn(primary.dsn(f"{g}_db"), 1) for g in GROUPS}
    writes = {g: await open_pool(g, dsns[g]) for g in GROUPS}
    await layer.install(shard_map, {dsns[g]: writes[g] for g in GROUPS})
    assert layer.router is not None
    router = ShardRouter({g: [writes[g]] for g in GROUPS})
    users = UserStore(router, reads=layer.router)
    photos = PhotoStore(router, static_base_url="http://static", reads=layer.router)

    def replica_reads() -> float:
        return registry.get_sample_value("photostack_reads_total", {"target": "replica"}) or 0.0

    a = await users.create_user("reader_a", None)
    b = await users.create_user("reader_b", None)
    on_replica = await asyncpg.connect(replica.dsn("users_db"))
    try:

        async def replayed_users() -> bool:
            return await on_replica.fetchval("SELECT count(*) FROM users") == 2

        await eventually(replayed_users)
        await on_replica.execute("SELECT pg_wal_replay_pause()")
        await users.follow(a["id"], b["id"])
        photo = await photos.create_photo_metadata(a["id"], "on the primary only")
        token = await layer.token_for({dsns["social"], dsns["photos"]})
        assert set(token) == {"social-1", "photos-1"}
        await layer.sample_once()

        # no token: the replica answers (it has not replayed the follow and the photo)
        before = replica_reads()
        page = await users.list_edges(EdgeKind.FOLLOWING, a["id"], 10, None)
        assert page.items == []
        assert (await photos.list_photos(a["id"], 10, None, replica=True)).items == []
        with pytest.raises(PhotoNotFoundError):
            await photos.get_photo(photo["id"], replica=True)
        assert replica_reads() >= before + 3
        # without replica=True a photo read is the primary's (workers, the feed)
        assert (await photos.get_photo(photo["id"]))["id"] == photo["id"]

        # the writes' token: the primary answers, the writes are seen
        mark = _read_after.set(token)
        try:
            before = replica_reads()
            page = await users.list_edges(EdgeKind.FOLLOWING, a["id"], 10, None)
            assert [u["id"] for u in page.items] == [b["id"]]
            listed = await photos.list_photos(a["id"], 10, None, replica=True)
            assert [p["id"] for p in listed.items] == [photo["id"]]
            assert (await photos.get_photo(photo["id"], replica=True))["id"] == photo["id"]
            # the token has no users-1 part: list_edges' two users lookups stay on the replica
            assert replica_reads() - before == 2
        finally:
            _read_after.reset(mark)

        # replayed past the token: the same reads, with the token, use the replica again
        await on_replica.execute("SELECT pg_wal_replay_resume()")

        async def caught_up() -> bool:
            await layer.sample_once()
            mark = _read_after.set(token)
            try:
                before = replica_reads()
                listed = await photos.list_photos(a["id"], 10, None, replica=True)
                return [p["id"] for p in listed.items] == [photo["id"]] and (
                    replica_reads() == before + 1
                )
            finally:
                _read_after.reset(mark)

        await eventually(caught_up)
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await on_replica.execute("SELECT pg_wal_replay_resume()")
        await on_replica.close()
