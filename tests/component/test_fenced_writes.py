"""Event appends and job repairs behind the ownership fence (service/_fenced.py).

A logical shard is moved the way a reshard's cut-over does it (ownership row deleted on the old
owner, inserted on the new one, the next map version published) while the app still routes by
the old map. Every write must then land on the new owner: the old one answers "wrong shard",
the app refreshes its map and retries there. Without the guard the same write lands on the old
owner, where the move would lose it — the control case shows the test can tell the difference.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from photostack.blocks.storage import logical_name
from photostack.cluster.engines.testing import PostgresServer
from photostack.service._events import EventStore
from photostack.service._jobs import JobBusyError, JobName, Jobs, LeaseMovedError
from photostack.service._store import UserStore
from photostack.service.directory import (
    NO_GUARD,
    ClusterMap,
    Endpoint,
    PhysicalShard,
    claim_ownership,
    initial_map,
)
from photostack.service.directory._mapstore import MapStore, apply_directory_schema
from photostack.service.schema import apply_schema
from tests.component.test_reshard import App

pytestmark = pytest.mark.component


async def _setup(pg: PostgresServer) -> tuple[str, dict[str, str]]:
    """users and social on one shard each; a spare database per group to move a key to."""
    prefix = "fw" + uuid.uuid4().hex[:8]
    dsns = {}
    for name in ("dir", "users_1", "users_2", "photos_1", "social_1", "social_2"):
        await pg.acreate_database(f"{prefix}_{name}")
        dsns[name] = pg.dsn(f"{prefix}_{name}")
    first = initial_map(
        {
            group: [PhysicalShard(0, Endpoint(f"{group}_1", dsns[f"{group}_1"]))]
            for group in ("users", "photos", "social")
        }
    )
    for name, group in first.groups.items():
        for shard in group.shards:
            await apply_schema(name, shard.primary.dsn)
            conn = await asyncpg.connect(shard.primary.dsn)
            try:
                await claim_ownership(conn, group.owned_by(0), 1)
            finally:
                await conn.close()
    await apply_schema("users", dsns["users_2"])
    await apply_schema("social", dsns["social_2"])
    conn = await asyncpg.connect(dsns["dir"])
    try:
        await apply_directory_schema(conn)
        await MapStore.initialise(conn, first)
    finally:
        await conn.close()
    return dsns["dir"], dsns


async def _cut_over(directory: str, group: str, key: str, old: str, new: str) -> int:
    """Move ``key``'s logical shard from database ``old`` to ``new`` as a cut-over does (no row
    copied: the test only looks at where new writes land). Returns the logical shard."""
    conn = await asyncpg.connect(directory)
    try:
        current = await MapStore.current(conn)
        assert current is not None
        placed = current.group(group)
        logical = placed.logical_of(key)
        endpoint = Endpoint(f"{group}_2", new)
        shards = [*placed.shards]
        if all(s.primary.dsn != new for s in shards):
            shards.append(PhysicalShard(len(shards), endpoint))
        target = next(s.index for s in shards if s.primary.dsn == new)
        for dsn, sql in (
            (old, "DELETE FROM shard_ownership WHERE logical_shard = $1"),
            (new, "INSERT INTO shard_ownership (logical_shard, map_version) VALUES ($1, $2)"),
        ):
            shard = await asyncpg.connect(dsn)
            try:
                args = (logical,) if dsn == old else (logical, current.version + 1)
                await shard.execute(sql, *args)
            finally:
                await shard.close()
        proposed: ClusterMap = current.successor(
            placements={group: {logical_name(logical): target}}, shards={group: shards}
        )
        await MapStore.publish(conn, proposed)
        return logical
    finally:
        await conn.close()


async def _count(dsn: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def test_event_appends_follow_the_fence(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            guarded = EventStore(app.routing.router, guard=app.guard)
            unguarded = EventStore(app.routing.router)
            user = (await store.create_user(f"ev_{uuid.uuid4().hex[:8]}", None))["id"]
            assert await guarded.produce(user, "photo.ready", {"n": 0}) is not None
            await _cut_over(directory, "users", user, dsns["users_1"], dsns["users_2"])
            assert app.routing.installed_version == 1  # the app has not seen the move

            # without the fence the append commits on the old owner: the move would lose it
            await unguarded.produce(user, "photo.ready", {"n": 1})
            on_old = "SELECT count(*) FROM events WHERE user_id = $1"
            assert await _count(dsns["users_1"], on_old, user) == 2
            # behind the fence: "wrong shard", map refreshed, the append lands on the new owner
            event = await guarded.produce(user, "photo.ready", {"n": 2})
            assert event is not None
            assert event.seq == 1  # the new owner's first seq (the test copied no rows)
            assert app.routing.installed_version == 2
            assert app.guard.wrong_shard_answers >= 1
            assert await _count(dsns["users_2"], on_old, user) == 1
            assert await _count(dsns["users_1"], on_old, user) == 2
        finally:
            await app.close()

    asyncio.run(main())


async def _two_users(app: App, store: UserStore) -> tuple[str, str]:
    """Two users on different social logical shards (moving b's must not move a's)."""
    social = app.routing.current().group("social")
    a = (await store.create_user(f"u_{uuid.uuid4().hex[:10]}", None))["id"]
    for _ in range(20):
        b = (await store.create_user(f"u_{uuid.uuid4().hex[:10]}", None))["id"]
        if social.logical_of(a) != social.logical_of(b):
            return a, b
    raise AssertionError("20 users on one logical shard of 64")


async def _copy_user(src: str, dst: str, user_id: str) -> None:
    """The user's row onto ``dst`` (what a reshard's backfill would have copied)."""
    source = await asyncpg.connect(src)
    target = await asyncpg.connect(dst)
    try:
        row = await source.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
        assert row is not None
        columns = list(row.keys())
        await target.execute(
            f"INSERT INTO users ({', '.join(columns)}) "  # noqa: S608 - the table's own columns
            f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})",
            *row.values(),
        )
    finally:
        await source.close()
        await target.close()


def test_job_repairs_and_deletions_follow_the_fence(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            a, b = await _two_users(app, store)
            await store.follow(a, b)
            # a half-written follow: the reverse edge (on b's shard) is missing
            conn = await asyncpg.connect(dsns["social_1"])
            try:
                await conn.execute("DELETE FROM followers WHERE user_id = $1", b)
            finally:
                await conn.close()
            await _cut_over(directory, "social", b, dsns["social_1"], dsns["social_2"])
            assert app.routing.installed_version == 1  # the app has not seen the move

            jobs = Jobs(app.routing.router, guard=app.guard)
            report = await jobs.run("reconcile-follows")
            assert report["reverse_added"] == 1
            reverse = "SELECT count(*) FROM followers WHERE user_id = $1 AND follower_id = $2"
            assert await _count(dsns["social_2"], reverse, b, a) == 1  # on the new owner
            assert await _count(dsns["social_1"], reverse, b, a) == 0  # never on the old one
            assert app.routing.installed_version == 2

            # a deletion requested through a stale map is recorded on the user's new owner
            await _copy_user(dsns["users_1"], dsns["users_2"], b)
            await _cut_over(directory, "users", b, dsns["users_1"], dsns["users_2"])
            assert app.routing.installed_version == 2
            done = await jobs.delete_user(b)
            assert done["user_id"] == b
            deletions = "SELECT count(*) FROM user_deletions WHERE user_id = $1"
            assert await _count(dsns["users_2"], deletions, b) == 1
            assert await _count(dsns["users_1"], deletions, b) == 0
            users = "SELECT count(*) FROM users WHERE id = $1"
            assert await _count(dsns["users_2"], users, b) == 0
            # the cleanup's stage writes go there too, and finish the deletion
            await jobs.run("user-cleanup")
            finished = "SELECT count(*) FROM user_deletions WHERE user_id = $1 AND stage = 'done'"
            assert await _count(dsns["users_2"], finished, b) == 1
            assert await _count(dsns["social_1"], "SELECT count(*) FROM following") == 0
        finally:
            await app.close()

    asyncio.run(main())


def test_unguarded_jobs_would_write_to_the_old_owner(pg_server: PostgresServer) -> None:
    """The control case: without the guard, a repair follows the stale map to the old owner."""

    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            a, b = await _two_users(app, store)
            await store.follow(a, b)
            conn = await asyncpg.connect(dsns["social_1"])
            try:
                await conn.execute("DELETE FROM followers WHERE user_id = $1", b)
            finally:
                await conn.close()
            await _cut_over(directory, "social", b, dsns["social_1"], dsns["social_2"])
            report = await Jobs(app.routing.router, guard=NO_GUARD).run("reconcile-follows")
            assert report["reverse_added"] == 1
            reverse = "SELECT count(*) FROM followers WHERE user_id = $1 AND follower_id = $2"
            assert await _count(dsns["social_1"], reverse, b, a) == 1
            assert await _count(dsns["social_2"], reverse, b, a) == 0
        finally:
            await app.close()

    asyncio.run(main())


def test_job_leases_and_state_follow_the_fence(pg_server: PostgresServer) -> None:
    """A job's lease and saved state live on the users shard owning the job's name: once a
    cut-over moved that name, the old holder's checkpoints are refused (nothing written on the
    old owner) and the next lease, taken through the stale map, lands on the new owner."""

    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        app = App(directory)
        await app.start()
        try:
            name = JobName.RECONCILE_FOLLOWS.value
            jobs = Jobs(app.routing.router, guard=app.guard)
            state = "SELECT state::text FROM job_state WHERE job = $1"
            async with jobs.lease(name) as held:
                await held.save({"cursor": 1})
                assert await _text(dsns["users_1"], state, name) == '{"cursor": 1}'
                await _copy_row(dsns["users_1"], dsns["users_2"], "job_state", "job", name)
                await _cut_over(directory, "users", name, dsns["users_1"], dsns["users_2"])
                with pytest.raises(LeaseMovedError):
                    await held.save({"cursor": 2})
                with pytest.raises(LeaseMovedError):
                    await held.check()
                assert app.routing.installed_version == 1  # the app has not seen the move
            assert await _text(dsns["users_1"], state, name) == '{"cursor": 1}'
            # the next lease: the stale map's shard answers "wrong shard", the new owner takes it
            async with Jobs(app.routing.router, guard=app.guard).lease(name) as moved:
                assert app.routing.installed_version == 2
                assert await moved.load() == {"cursor": 1}
                await moved.save({"0:following": ["", ""]})  # a pass in progress
                with pytest.raises(JobBusyError):  # one holder at a time, on the new owner too
                    async with jobs.lease(name):
                        pass
            assert await _text(dsns["users_2"], state, name) == '{"0:following": ["", ""]}'
            assert await _text(dsns["users_1"], state, name) == '{"cursor": 1}'
            await jobs.run(name)  # a whole run checkpoints on the new owner: the pass finished
            assert await _text(dsns["users_2"], state, name) == "{}"
            assert await _text(dsns["users_1"], state, name) == '{"cursor": 1}'
        finally:
            await app.close()

    asyncio.run(main())


async def _text(dsn: str, sql: str, *args: Any) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        value: str | None = await conn.fetchval(sql, *args)
        return value
    finally:
        await conn.close()


async def _copy_row(src: str, dst: str, table: str, key: str, value: str) -> None:
    """One row onto ``dst`` (what a reshard's backfill would have copied)."""
    source = await asyncpg.connect(src)
    target = await asyncpg.connect(dst)
    try:
        row = await source.fetchrow(f"SELECT * FROM {table} WHERE {key} = $1", value)  # noqa: S608
        assert row is not None
        columns = list(row.keys())
        await target.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - the table's own columns
            f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})",
            *row.values(),
        )
    finally:
        await source.close()
        await target.close()
