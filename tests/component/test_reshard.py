"""Online resharding between real Postgres shards (one server, one database per shard).

The app side is the real one: ``MapRouting`` + ``MapGuard`` + ``UserStore`` (follow/unfollow are
guarded writes), with a transport that reads the map straight from the directory database.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import asyncpg
import pytest

from photostack.blocks.storage import logical_name
from photostack.cluster.engines.testing import PostgresServer
from photostack.service._reshard import ReshardConfig, ReshardExecutor
from photostack.service._reshard_plan import (
    CANCELLABLE,
    NEXT,
    MoveKind,
    MoveState,
    ReshardError,
)
from photostack.service._store import EdgeKind, UserStore
from photostack.service.directory import (
    ClusterMap,
    DirectoryClientConfig,
    Endpoint,
    MapGuard,
    MapRouting,
    PhysicalShard,
    claim_ownership,
    initial_map,
)
from photostack.service.directory._mapstore import MapStore, apply_directory_schema
from photostack.service.schema import apply_schema
from photostack.service.settings import Peer

pytestmark = pytest.mark.component

USERS = 80
EDGES = 400


class DbTransport:
    """The directory client's transport, answered from the directory database itself."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def get_json(self, peer: Peer, path: str, timeout_s: float) -> tuple[int, Any]:
        conn = await asyncpg.connect(self.dsn)
        try:
            current = await MapStore.current(conn)
        finally:
            await conn.close()
        assert current is not None
        if path == "/v1/map/version":
            return 200, {"version": current.version}
        return 200, json.loads(json.dumps(current.to_json()))


async def _setup(pg: PostgresServer) -> tuple[str, ClusterMap, str]:
    prefix = "rs" + uuid.uuid4().hex[:8]
    names = ["dir", "users_1", "photos_1", "social_1", "social_2", "social_3"]
    for name in names:
        await pg.acreate_database(f"{prefix}_{name}")

    def endpoint(name: str) -> Endpoint:
        return Endpoint(name, pg.dsn(f"{prefix}_{name}"))

    first = initial_map(
        {
            "users": [PhysicalShard(0, endpoint("users_1"))],
            "photos": [PhysicalShard(0, endpoint("photos_1"))],
            "social": [
                PhysicalShard(0, endpoint("social_1")),
                PhysicalShard(1, endpoint("social_2")),
            ],
        }
    )
    for name, group in first.groups.items():
        for shard in group.shards:
            await apply_schema(name, shard.primary.dsn)
            conn = await asyncpg.connect(shard.primary.dsn)
            try:
                await claim_ownership(conn, group.owned_by(shard.index), 1)
            finally:
                await conn.close()
    directory = pg.dsn(f"{prefix}_dir")
    conn = await asyncpg.connect(directory)
    try:
        await apply_directory_schema(conn)
        await MapStore.initialise(conn, first)
    finally:
        await conn.close()
    await apply_schema("social", pg.dsn(f"{prefix}_social_3"))
    return directory, first, pg.dsn(f"{prefix}_social_3")


class App:
    """The app's storage side: map-driven routing, the guard, the user store."""

    def __init__(self, directory: str) -> None:
        self.pools: list[Any] = []

        async def open_pool(group: str, dsn: str) -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
            self.pools.append(pool)
            return pool

        self.routing: MapRouting[Any] = MapRouting(
            (Peer("d", "127.0.0.1", 1),),
            DbTransport(directory),
            open_pool,
            DirectoryClientConfig(poll_interval_s=3600),  # only "wrong shard" refreshes
        )

    async def start(self) -> UserStore:
        router = await self.routing.start()
        self.guard = MapGuard(self.routing.current, self.routing.refresh)
        return UserStore(router, guard=self.guard)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()


async def _users(store: UserStore) -> list[str]:
    return [
        (await store.create_user(f"u{i}_{uuid.uuid4().hex[:6]}", None))["id"] for i in range(USERS)
    ]


async def _placement_check(
    directory: str, expected: set[tuple[str, str]], executor: ReshardExecutor
) -> None:
    """Every edge on exactly the shard the current map names, both ways, nothing else."""
    current = await executor.current_map()
    social = current.group("social")
    seen: dict[str, set[tuple[str, str]]] = {"following": set(), "followers": set()}
    for shard in social.shards:
        conn = await asyncpg.connect(shard.primary.dsn)
        try:
            for table, other in (("following", "target_id"), ("followers", "follower_id")):
                for row in await conn.fetch(f"SELECT user_id, {other} AS o FROM {table}"):  # noqa: S608
                    assert social.physical_of(row["user_id"]) == shard.index, (table, row)
                    pair = (row["user_id"], row["o"])
                    assert pair not in seen[table], f"{pair} in {table} twice"
                    seen[table].add(pair)
            triggers = await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'photostack_reshard_capture'"
            )
            assert triggers == 0
        finally:
            await conn.close()
    assert seen["following"] == expected
    assert seen["followers"] == {(b, a) for a, b in expected}


async def _write_loop(
    store: UserStore, users: list[str], expected: set[tuple[str, str]], stop: asyncio.Event
) -> int:
    """Follow/unfollow at random until ``stop`` (bounded); every call must succeed."""
    rng = random.Random(7)
    done = 0
    while not stop.is_set() and done < 5000:
        a, b = rng.sample(users, 2)
        if (a, b) in expected and rng.random() < 0.4:
            await store.unfollow(a, b)
            expected.discard((a, b))
        else:
            await store.follow(a, b)
            expected.add((a, b))
        done += 1
        await asyncio.sleep(0)
    return done


def test_add_shard_under_concurrent_writes(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, _, new_dsn = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            users = await _users(store)
            expected: set[tuple[str, str]] = set()
            rng = random.Random(1)
            while len(expected) < EDGES:
                a, b = rng.sample(users, 2)
                await store.follow(a, b)
                expected.add((a, b))
            executor = ReshardExecutor(directory, ReshardConfig(batch_rows=50, grace_s=0.2))
            # the new shard's replica (here an alias of its database) is published with it
            replica = Endpoint("social_3_replica", new_dsn)
            rec = await executor.plan(
                MoveKind.ADD_SHARD,
                "social",
                new_endpoint=Endpoint("social_3", new_dsn),
                new_replicas=(replica,),
            )
            assert len(rec.moves) == 128 // 3  # 42 of 128 logical shards: floor(L / (n + 1))
            stop = asyncio.Event()
            writes = asyncio.create_task(_write_loop(store, users, expected, stop))
            done = await executor.run(rec)
            stop.set()
            count = await writes
            assert count > 0
            assert done.state is MoveState.DONE
            assert done.progress["moved_vs_ideal"] <= 1.25  # rows: ~400 rows are noisy
            assert len(done.moves) / 128 <= 1.05 / 3
            assert app.routing.installed_version == 2
            current = await executor.current_map()
            assert len(current.group("social").shards) == 3
            added = current.group("social").shards[2]
            assert (added.primary.name, added.replicas) == ("social_3", (replica,))
            await _placement_check(directory, expected, executor)
            # reads through the store see every edge on the new placement
            for a in users[:20]:
                page = await store.list_edges(EdgeKind.FOLLOWING, a, 100, None)
                assert {u["id"] for u in page.items} == {b for x, b in expected if x == a}
        finally:
            await app.close()

    asyncio.run(main())


def test_resume_from_every_step_and_cancel(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, _, new_dsn = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            users = await _users(store)
            expected: set[tuple[str, str]] = set()
            rng = random.Random(2)
            while len(expected) < 150:
                a, b = rng.sample(users, 2)
                await store.follow(a, b)
                expected.add((a, b))
            config = ReshardConfig(batch_rows=20, grace_s=0.0)

            # cancel before the cut-over: the old placement stays, the target holds nothing
            executor = ReshardExecutor(directory, config)
            rec = await executor.plan(
                MoveKind.ADD_SHARD, "social", new_endpoint=Endpoint("social_3", new_dsn)
            )
            rec = await executor.run(rec, stop_at=MoveState.CATCHING_UP)
            await store.follow(users[0], users[1])  # a write between steps is still captured
            expected.add((users[0], users[1]))
            cancelled = await ReshardExecutor(directory, config).cancel(rec)
            assert cancelled.state is MoveState.CANCELLED
            assert (await executor.current_map()).version == 1
            conn = await asyncpg.connect(new_dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM following") == 0
            finally:
                await conn.close()
            await _placement_check(directory, expected, executor)

            # a fresh executor per step: every persisted phase resumes where it stopped
            rec = await executor.plan(
                MoveKind.ADD_SHARD, "social", new_endpoint=Endpoint("social_3", new_dsn)
            )
            with pytest.raises(ReshardError, match="in progress"):
                await executor.plan(
                    MoveKind.ADD_SHARD, "social", new_endpoint=rec_endpoint(new_dsn)
                )
            state = rec.state
            while state is not MoveState.DONE:
                nxt = NEXT[state]
                resumed = await ReshardExecutor(directory, config).active()
                assert resumed is not None
                assert resumed.state is state
                rec = await ReshardExecutor(directory, config).run(resumed, stop_at=nxt)
                assert rec.state is nxt
                if nxt in CANCELLABLE or nxt is MoveState.FENCING:
                    await store.follow(users[2], users[3 + len(expected) % 50])
                    expected.add((users[2], users[3 + len(expected) % 50]))
                if nxt is MoveState.CLAIMING:
                    with pytest.raises(ReshardError, match="past its cut-over"):
                        await executor.cancel(rec)
                state = nxt
            await _placement_check(directory, expected, executor)
        finally:
            await app.close()

    asyncio.run(main())


def rec_endpoint(dsn: str) -> Endpoint:
    return Endpoint("social_3", dsn)


def test_bad_input_changes_nothing(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, first, new_dsn = await _setup(pg_server)
        executor = ReshardExecutor(directory)
        with pytest.raises(ReshardError, match="unknown group 'nope'"):
            await executor.plan(MoveKind.ADD_SHARD, "nope", new_endpoint=rec_endpoint(new_dsn))
        with pytest.raises(ReshardError, match="users has one shard; it cannot be removed"):
            await executor.plan(MoveKind.REMOVE_SHARD, "users", shard=1)
        with pytest.raises(ReshardError, match="no shard 9"):
            await executor.plan(MoveKind.REMOVE_SHARD, "social", shard=9)
        assert await executor.moves() == []
        assert (await executor.current_map()).version == 1
        assert logical_name(0) in first.group("social").placement.entries

    asyncio.run(main())


def test_hot_shard_moves_logical_shards_to_the_coolest(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, _, _ = await _setup(pg_server)
        app = App(directory)
        store = await app.start()
        try:
            users = await _users(store)
            expected: set[tuple[str, str]] = set()
            rng = random.Random(3)
            while len(expected) < 100:
                a, b = rng.sample(users, 2)
                await store.follow(a, b)
                expected.add((a, b))
            executor = ReshardExecutor(directory, ReshardConfig(batch_rows=30, grace_s=0.0))
            rec = await executor.plan(MoveKind.HOT_SHARD, "social", loads=[90.0, 10.0])
            assert set(rec.moves.values()) == {1}
            assert len(rec.moves) == 28  # (90 - 10) / 2 / (90 / 64) = 28.4
            stop = asyncio.Event()
            writes = asyncio.create_task(_write_loop(store, users, expected, stop))
            done = await executor.run(rec)
            stop.set()
            await writes
            assert done.state is MoveState.DONE
            social = (await executor.current_map()).group("social")
            assert len(social.owned_by(0)) == 64 - 28
            await _placement_check(directory, expected, executor)
        finally:
            await app.close()

    asyncio.run(main())


async def _ownership(dsn: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["logical_shard"] for r in await conn.fetch("SELECT * FROM shard_ownership")}
    finally:
        await conn.close()


async def _rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM following) + (SELECT count(*) FROM followers)"
            )
        )
    finally:
        await conn.close()


def test_remove_middle_shard_under_concurrent_writes(pg_server: PostgresServer) -> None:
    """3 shards (two from the topology, one added), then the middle one removed while writes
    go on: the third is renumbered 2, every edge is on its one owner, the ownership rows match
    the map, the removed shard holds nothing, and a resumed cleaning deletes from the right
    database (by member name, not by the renumbered position)."""

    async def main() -> None:
        directory, first, new_dsn = await _setup(pg_server)
        middle_dsn = first.group("social").shards[1].primary.dsn
        app = App(directory)
        store = await app.start()
        try:
            users = await _users(store)
            expected: set[tuple[str, str]] = set()
            rng = random.Random(4)
            while len(expected) < 250:
                a, b = rng.sample(users, 2)
                await store.follow(a, b)
                expected.add((a, b))
            config = ReshardConfig(batch_rows=40, grace_s=0.2)
            executor = ReshardExecutor(directory, config)
            added = await executor.run(
                await executor.plan(
                    MoveKind.ADD_SHARD, "social", new_endpoint=rec_endpoint(new_dsn)
                )
            )
            assert added.state is MoveState.DONE
            for bad, reason in ((4, "no shard 4 .shards 1..3."), (0, "no shard 0")):
                with pytest.raises(ReshardError, match=reason):
                    await executor.plan(MoveKind.REMOVE_SHARD, "social", shard=bad)
            with pytest.raises(ReshardError, match="one shard; it cannot be removed"):
                await executor.plan(MoveKind.REMOVE_SHARD, "photos", shard=1)
            assert len(await executor.moves()) == 1  # refused: nothing recorded

            rec = await executor.plan(MoveKind.REMOVE_SHARD, "social", shard=2)
            owned_before = set((await executor.current_map()).group("social").owned_by(1))
            assert set(rec.moves) == owned_before
            assert set(rec.moves.values()) == {0, 2}  # to the others, numbered as planned
            assert rec.to_json()["removed_shard"] == {"number": 2, "name": "social_2"}
            stop = asyncio.Event()
            writes = asyncio.create_task(_write_loop(store, users, expected, stop))
            rec = await executor.run(rec, stop_at=MoveState.CLEANING)
            # the map is renumbered: social_3 is shard 2 now; the old copies are still there
            social = (await executor.current_map()).group("social")
            assert [s.primary.name for s in social.shards] == ["social_1", "social_3"]
            assert await _rows(middle_dsn) > 0
            done = await ReshardExecutor(directory, config).run(rec)  # resumed cleaning
            stop.set()
            assert await writes > 0
            assert done.state is MoveState.DONE
            assert done.retired_nodes() == ["social_2"]
            await _placement_check(directory, expected, executor)
            assert await _rows(middle_dsn) == 0
            assert await _ownership(middle_dsn) == set()
            social = (await executor.current_map()).group("social")
            assert len(social.owned_by(0)) + len(social.owned_by(1)) == 128
            for shard in social.shards:
                assert await _ownership(shard.primary.dsn) == set(social.owned_by(shard.index))
            for a in users[:20]:
                page = await store.list_edges(EdgeKind.FOLLOWING, a, 100, None)
                assert {u["id"] for u in page.items} == {b for x, b in expected if x == a}
            with pytest.raises(ReshardError, match="no shard 3"):
                await executor.plan(MoveKind.REMOVE_SHARD, "social", shard=3)
        finally:
            await app.close()

    asyncio.run(main())


def test_cancel_a_removal_leaves_the_shard_in_place(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, first, _ = await _setup(pg_server)
        removed_dsn = first.group("social").shards[1].primary.dsn
        app = App(directory)
        store = await app.start()
        try:
            users = await _users(store)
            expected: set[tuple[str, str]] = set()
            rng = random.Random(6)
            while len(expected) < 120:
                a, b = rng.sample(users, 2)
                await store.follow(a, b)
                expected.add((a, b))
            config = ReshardConfig(batch_rows=25, grace_s=0.0)
            executor = ReshardExecutor(directory, config)
            rec = await executor.plan(MoveKind.REMOVE_SHARD, "social", shard=2)
            rows_before = await _rows(removed_dsn)
            rec = await executor.run(rec, stop_at=MoveState.CATCHING_UP)
            await store.follow(users[0], users[1])  # still captured, still on its owner
            expected.add((users[0], users[1]))
            cancelled = await ReshardExecutor(directory, config).cancel(rec)
            assert cancelled.state is MoveState.CANCELLED
            assert (await executor.current_map()).version == 1
            assert len((await executor.current_map()).group("social").shards) == 2
            assert await _rows(removed_dsn) >= rows_before
            assert await _ownership(removed_dsn) == set(first.group("social").owned_by(1))
            await _placement_check(directory, expected, executor)  # nothing left on social_1
        finally:
            await app.close()

    asyncio.run(main())
