"""Online resharding of the ``users`` group between real Postgres shards, under load.

Sign-ups (one- and two-shard: the name's claim and the user row may sit on different shards),
profile reads by id and by name, follows (each appends a ``follower.new`` event to the followee)
and event appends go on while ``users`` gains a third shard and then loses its *first* one (the
position the jobs' state and leases used to live on). Meanwhile the cross-shard jobs run under
their leases. Every request must succeed; afterwards every user is readable by id and by name,
every row sits on exactly the shard the map names, each user's events are 1..n with no gap or
duplicate, and the jobs' saved state moved with its name (service/_jobs_lease.py).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import asyncpg
import pytest

from photostack.blocks.storage import logical_name
from photostack.cluster.engines.testing import PostgresServer
from photostack.service._events import EventStore
from photostack.service._jobs import JobBusyError, JobName, Jobs
from photostack.service._reshard import ReshardConfig, ReshardExecutor
from photostack.service._reshard_plan import GROUP_TABLES, MoveKind, MoveState
from photostack.service._reshard_sql import MoveRecord
from photostack.service._store import UserStore
from photostack.service.directory import (
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
from tests.component.test_reshard import DbTransport

pytestmark = pytest.mark.component

USERS = 60
LOAD_OPS = 4000  # per move, at most (the loop also stops when the move is done)
LOAD_DEADLINE_S = 120.0


async def _setup(pg: PostgresServer) -> tuple[str, dict[str, str]]:
    """users on two shards (a third database ready to be added), photos and social on one."""
    prefix = "ru" + uuid.uuid4().hex[:8]
    dsns: dict[str, str] = {}
    for name in ("dir", "users_1", "users_2", "users_3", "photos_1", "social_1"):
        await pg.acreate_database(f"{prefix}_{name}")
        dsns[name] = pg.dsn(f"{prefix}_{name}")
    first = initial_map(
        {
            "users": [
                PhysicalShard(0, Endpoint("users_1", dsns["users_1"])),
                PhysicalShard(1, Endpoint("users_2", dsns["users_2"])),
            ],
            "photos": [PhysicalShard(0, Endpoint("photos_1", dsns["photos_1"]))],
            "social": [PhysicalShard(0, Endpoint("social_1", dsns["social_1"]))],
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
    await apply_schema("users", dsns["users_3"])
    conn = await asyncpg.connect(dsns["dir"])
    try:
        await apply_directory_schema(conn)
        await MapStore.initialise(conn, first)
    finally:
        await conn.close()
    return dsns["dir"], dsns


class App:
    """An app node's storage side: map routing that polls the directory (as apps do, every
    0.2 s here unless told), the guard, the stores and the jobs."""

    def __init__(self, directory: str, poll_s: float = 0.2) -> None:
        self.pools: list[Any] = []

        async def open_pool(group: str, dsn: str) -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=6)
            self.pools.append(pool)
            return pool

        self.routing: MapRouting[Any] = MapRouting(
            (Peer("d", "127.0.0.1", 1),),
            DbTransport(directory),
            open_pool,
            DirectoryClientConfig(poll_interval_s=poll_s),
        )

    async def start(self) -> None:
        router = await self.routing.start()
        self.poller = asyncio.create_task(self.routing.poll_forever())
        self.guard = MapGuard(self.routing.current, self.routing.refresh)
        self.events = EventStore(router, guard=self.guard)
        self.store = UserStore(router, self.events, guard=self.guard)
        self.jobs = Jobs(router, guard=self.guard)

    async def close(self) -> None:
        self.poller.cancel()
        await asyncio.gather(self.poller, return_exceptions=True)
        for pool in self.pools:
            await pool.close()


class Model:
    """What the load wrote: users (id -> name), follows, each user's event seqs in order."""

    def __init__(self) -> None:
        self.users: dict[str, str] = {}
        self.follows: set[tuple[str, str]] = set()
        self.seqs: dict[str, list[int]] = {}

    async def sign_up(self, app: App, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        user = await app.store.create_user(name, None)
        self.users[user["id"]] = name
        return str(user["id"])

    async def follow(self, app: App, a: str, b: str) -> None:
        if (a, b) in self.follows:
            return  # a repeat follow produces no second event
        self.follows.add((a, b))  # before the await: a concurrent loop skips the same pair
        await app.store.follow(a, b)
        self.seqs.setdefault(b, []).append(-1)  # follower.new to b; its seq is read back

    async def event(self, app: App, user: str) -> None:
        made = await app.events.produce(user, "photo.ready", {"n": len(self.seqs.get(user, []))})
        assert made is not None
        self.seqs.setdefault(user, []).append(made.seq)


async def _load(app: App, model: Model, stop: asyncio.Event, seed: int) -> tuple[int, int]:
    """Sign-ups, profile reads (by id and by name), follows and event appends until ``stop``
    (bounded in count and time). Any failure propagates. Returns (requests, job runs)."""
    rng = random.Random(seed)
    ops, runs = 0, 0
    deadline = time.monotonic() + LOAD_DEADLINE_S
    while not stop.is_set() and ops < LOAD_OPS and time.monotonic() < deadline:
        ids = list(model.users)
        roll = rng.random()
        if roll < 0.15:
            await model.sign_up(app, f"s{seed}")
        elif roll < 0.45:
            user = rng.choice(ids)
            assert (await app.store.get_user(user))["id"] == user
            by_name = await app.store.get_user_by_username(model.users[user])
            assert by_name["id"] == user
        elif roll < 0.7:
            a, b = rng.sample(ids, 2)
            await model.follow(app, a, b)
        else:
            await model.event(app, rng.choice(ids))
        ops += 1
        if ops % 100 == 0:  # the jobs under their leases, moving with the job's name
            for job in (JobName.RECONCILE_FOLLOWS, JobName.USER_CLEANUP):
                try:
                    await app.jobs.run(job.value)
                    runs += 1
                except JobBusyError:
                    pass  # another loop holds the lease, or a move took it (LeaseMovedError)
        await asyncio.sleep(0)
    return ops, runs


async def _move_under_load(
    app: App, model: Model, executor: ReshardExecutor, rec: MoveRecord, seed: int
) -> MoveRecord:
    stop = asyncio.Event()
    loads = [asyncio.create_task(_load(app, model, stop, seed + i)) for i in range(3)]
    try:
        done = await executor.run(rec)
    finally:
        stop.set()
        results = await asyncio.gather(*loads)  # a failed request fails the test here
    ops, runs = sum(r[0] for r in results), sum(r[1] for r in results)
    assert ops > 50
    assert done.state is MoveState.DONE
    print(  # noqa: T201 - the figures, for the report
        f"users {done.kind.value}: {len(done.moves)}/{done.plan['logical_shards']} logical, "
        f"rows moved {done.progress['rows_moved']}; {ops} requests, 0 failed; {runs} job runs; "
        f"cut-over {done.progress.get('cutover_s')}s; wrong-shard answers so far "
        f"{app.guard.wrong_shard_answers}"
    )
    return done


async def _check_everything(
    app: App, model: Model, executor: ReshardExecutor, dsns: dict[str, str]
) -> None:
    current = await executor.current_map()
    assert app.routing.installed_version == current.version
    users = current.group("users")
    keys = {t.name: t.key for t in GROUP_TABLES["users"]}
    seen: dict[str, set[str]] = {name: set() for name in keys}
    for shard in users.shards:
        conn = await asyncpg.connect(shard.primary.dsn)
        try:
            for table, key in keys.items():
                for row in await conn.fetch(f"SELECT {key} AS k FROM {table}"):  # noqa: S608
                    assert users.physical_of(row["k"]) == shard.index, (table, row["k"])
                    if table != "events":
                        assert row["k"] not in seen[table], f"{row['k']} in {table} twice"
                        seen[table].add(row["k"])
            owned = {r["logical_shard"] for r in await conn.fetch("SELECT * FROM shard_ownership")}
            assert owned == set(users.owned_by(shard.index))
            assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = $1",
                                       "photostack_reshard_capture") == 0  # fmt: skip
        finally:
            await conn.close()
    assert seen["users"] == set(model.users)
    assert seen["usernames"] == set(model.users.values())
    for user, name in model.users.items():  # every user readable, by id and by name
        assert (await app.store.get_user(user))["username"] == name
        assert (await app.store.get_user_by_username(name))["id"] == user
    for user, produced in model.seqs.items():  # events: 1..n, no gap, no duplicate, in order
        read = await app.events.read(user, 0, limit=500, fresh=True)
        seqs = [e.seq for e in read.events]
        if seqs != list(range(1, len(produced) + 1)):
            where = await _event_rows(dsns, user)
            raise AssertionError(f"{user}: read {seqs}, produced {produced}; {where}")
        known = [s for s in produced if s != -1]  # each append's own seq, read back
        assert len(set(known)) == len(known)
        assert set(known) <= set(seqs)


def test_users_add_then_remove_the_first_shard_under_load(pg_server: PostgresServer) -> None:
    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        app = App(directory)
        await app.start()
        try:
            model = Model()
            for _ in range(USERS):
                await model.sign_up(app, "pre")
            ids = list(model.users)
            rng = random.Random(1)
            for _ in range(120):
                await model.follow(app, *rng.sample(ids, 2))
            for user in ids[:30]:
                await model.event(app, user)
            await app.jobs.run(JobName.RECONCILE_FOLLOWS.value)
            marker = {"marker": uuid.uuid4().hex}
            await app.jobs._save_state(JobName.ORPHAN_SWEEP, marker)

            # grace: old copies stay readable ~7 polls (0.2 s) after the publish (apps: 3 s, 1 s)
            config = ReshardConfig(batch_rows=40, grace_s=1.5)
            executor = ReshardExecutor(directory, config)
            rec = await executor.plan(
                MoveKind.ADD_SHARD, "users", new_endpoint=Endpoint("users_3", dsns["users_3"])
            )
            assert len(rec.moves) == 128 // 3  # 42 of 128 logical shards: floor(L / (n + 1))
            added = await _move_under_load(app, model, executor, rec, seed=10)
            assert added.progress["rows_moved"] > 0
            assert len((await executor.current_map()).group("users").shards) == 3
            await _check_everything(app, model, executor, dsns)

            # the first shard, where the jobs' state and leases used to live, goes away
            rec = await executor.plan(MoveKind.REMOVE_SHARD, "users", shard=1)
            assert rec.to_json()["removed_shard"] == {"number": 1, "name": "users_1"}
            await _move_under_load(app, model, executor, rec, seed=20)
            users = (await executor.current_map()).group("users")
            assert [s.primary.name for s in users.shards] == ["users_2", "users_3"]
            await _check_everything(app, model, executor, dsns)
            conn = await asyncpg.connect(dsns["users_1"])
            try:
                for table in ("users", "usernames", "events", "job_state"):
                    count = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
                    assert count == 0, table
            finally:
                await conn.close()
            # the jobs' saved state moved with the job's name; its lease is taken there now
            assert await app.jobs._load_state(JobName.ORPHAN_SWEEP) == marker
            async with app.jobs.lease(JobName.ORPHAN_SWEEP.value) as held:
                assert await held.load() == marker
            report = await app.jobs.run(JobName.ORPHAN_SWEEP.value)
            assert report["dangling"] == {"following": 0, "followers": 0, "photos": 0}
        finally:
            await app.close()

    asyncio.run(main())


FAIL_INSERTS = """
CREATE OR REPLACE FUNCTION photostack_test_refuse_user() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(4242);  -- held by the test until the cut-over is done
    RAISE EXCEPTION 'user row refused (test)';
END $$;
CREATE TRIGGER photostack_test_refuse_user BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION photostack_test_refuse_user();
"""
WAITING = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


async def _cut_over_to(directory: str, logical: int, source: str, target: str, index: int) -> None:
    """Move one users logical shard between existing shards, as a cut-over does (ownership row
    deleted on the source, inserted on the target, the next map version published)."""
    conn = await asyncpg.connect(directory)
    try:
        current = await MapStore.current(conn)
        assert current is not None
        for dsn, sql, args in (
            (source, "DELETE FROM shard_ownership WHERE logical_shard = $1", (logical,)),
            (target, "INSERT INTO shard_ownership (logical_shard, map_version) VALUES ($1, $2)",
             (logical, current.version + 1)),
        ):  # fmt: skip
            shard = await asyncpg.connect(dsn)
            try:
                await shard.execute(sql, *args)
            finally:
                await shard.close()
        await MapStore.publish(
            conn, current.successor(placements={"users": {logical_name(logical): index}})
        )
    finally:
        await conn.close()


def test_a_failed_sign_ups_claim_release_follows_the_fence(pg_server: PostgresServer) -> None:
    """A two-shard sign-up claims the name, then its user row fails; in between, a cut-over
    moves the name's logical shard (the claim copied to the new owner, as the backfill does).
    The release is fenced, so it deletes the claim on the new owner: the name is free again
    (a bare delete through the old map would have left it taken on the new owner forever)."""

    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        gates = [await asyncpg.connect(dsns[n]) for n in ("users_1", "users_2")]
        app = App(directory, poll_s=3600)  # only "wrong shard" refreshes: the map stays stale
        await app.start()
        try:
            for gate in gates:
                await gate.execute(FAIL_INSERTS)
                await gate.execute("SELECT pg_advisory_lock(4242)")
            name = ""
            for _ in range(20):  # until the name and the new id fall on different shards
                name = f"rel_{uuid.uuid4().hex[:10]}"
                signing = asyncio.create_task(app.store.create_user(name, None))
                deadline = time.monotonic() + 10.0
                while await gates[0].fetchval(WAITING) == 0:  # the user row waits at the gate
                    assert time.monotonic() < deadline, "the sign-up never reached the gate"
                    await asyncio.sleep(0.01)
                users = app.routing.current().group("users")
                owner = users.physical_of(name)
                source, target = dsns[f"users_{owner + 1}"], dsns[f"users_{2 - owner}"]
                claimed = await _text(source, "SELECT user_id FROM usernames WHERE username = $1",
                                      name)  # fmt: skip
                if claimed is not None:  # committed on its own: the two-shard path
                    break
                for gate in gates:  # one shard: claim and row roll back together; next name
                    await gate.execute("SELECT pg_advisory_unlock(4242)")
                with pytest.raises(asyncpg.RaiseError):
                    await signing
                for gate in gates:
                    await gate.execute("SELECT pg_advisory_lock(4242)")
            else:
                raise AssertionError("20 sign-ups, every one on a single shard")
            logical = users.logical_of(name)
            copy = "INSERT INTO usernames (username, user_id) VALUES ($1, $2)"
            await _execute(target, copy, name, claimed)
            await _cut_over_to(directory, logical, source, target, 1 - owner)
            for gate in gates:
                await gate.execute("SELECT pg_advisory_unlock(4242)")
            with pytest.raises(asyncpg.RaiseError, match="user row refused"):
                await signing
            claim = "SELECT user_id FROM usernames WHERE username = $1"
            assert await _text(target, claim, name) is None  # released on the new owner
            assert app.routing.installed_version == 2  # learnt from the old owner's refusal
            for gate in gates:
                await gate.execute("DROP TRIGGER photostack_test_refuse_user ON users")
            again = await app.store.create_user(name, None)  # the name is free
            assert (await app.store.get_user_by_username(name))["id"] == again["id"]
        finally:
            await app.close()
            for gate in gates:
                await gate.close()

    asyncio.run(main())


async def _text(dsn: str, sql: str, *args: Any) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        value: str | None = await conn.fetchval(sql, *args)
        return value
    finally:
        await conn.close()


async def _execute(dsn: str, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _event_rows(dsns: dict[str, str], user: str) -> str:
    """Where ``user``'s event rows and seq are, on every users database (for a failure)."""
    out = []
    for name in ("users_1", "users_2", "users_3"):
        db = await asyncpg.connect(dsns[name])
        try:
            rows = await db.fetch(
                "SELECT seq, type, dedupe_key FROM events WHERE user_id = $1 ORDER BY seq", user
            )
            last = await db.fetchval("SELECT last_seq FROM event_seqs WHERE user_id = $1", user)
            out.append(f"{name}: last_seq={last} {[tuple(r) for r in rows]}")
        finally:
            await db.close()
    return "; ".join(out)


def test_a_change_committed_out_of_id_order_is_replayed(pg_server: PostgresServer) -> None:
    """The change log's ids are taken at insert, not at commit: a writer holding a lower id can
    commit after a higher one was replayed. Replay consumes entries instead of following an id
    cursor, so that late change still reaches the new owner (with a cursor it was lost)."""

    async def main() -> None:
        directory, dsns = await _setup(pg_server)
        executor = ReshardExecutor(directory, ReshardConfig(batch_rows=40, grace_s=0.0))
        rec = await executor.plan(
            MoveKind.ADD_SHARD, "users", new_endpoint=Endpoint("users_3", dsns["users_3"])
        )
        users = (await executor.current_map()).group("users")
        moving = [f"late_{i}" for i in range(4000)]
        moving = [k for k in moving if users.logical_of(k) in rec.moves]
        late, early = [k for k in moving if users.physical_of(k) == 0][:2]
        rec = await executor.run(rec, stop_at=MoveState.CATCHING_UP)  # captured, backfilled
        insert = "INSERT INTO users (id, username) VALUES ($1, $1)"
        slow = await asyncpg.connect(dsns["users_1"])
        try:
            tx = slow.transaction()
            await tx.start()
            await slow.execute(insert, late)  # takes the lower log id, commits last
            await _execute(dsns["users_1"], insert, early)  # a higher id, committed first
            rec = await executor.run(rec, stop_at=MoveState.FENCING)  # replays `early` only
            await tx.commit()
        finally:
            await slow.close()
        done = await executor.run(rec)
        assert done.state is MoveState.DONE
        row = "SELECT count(*) FROM users WHERE id = $1"
        for key in (early, late):
            assert await _text(dsns["users_3"], "SELECT id FROM users WHERE id = $1", key) == key
            assert await _count(dsns["users_1"], row, key) == 0  # cleaned from the source

    asyncio.run(main())


async def _count(dsn: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()
