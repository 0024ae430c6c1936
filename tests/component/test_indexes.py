"""Indexes tied to queries (issue 4, item 5).

Drives the app's stores against real Postgres databases (one per storage group) with a recording
pool, so the statements checked are exactly the ones the app sends. Then, on tables loaded with
enough rows (and ANALYZEd) that the planner has a real choice, EXPLAIN (FORMAT JSON) of each
statement must use an index that :data:`photostack.service.schema.INDEX_QUERIES` registers for
it; every index in the databases must be registered; every registered statement must be one the
app runs.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from photostack.blocks.storage import ShardRouter
from photostack.cluster.engines.testing import PostgresServer
from photostack.service import schema
from photostack.service._events import EventStore
from photostack.service._jobs import JobConfig, Jobs
from photostack.service._photos import PhotoForbiddenError, PhotoStatus, PhotoStore
from photostack.service._store import EdgeKind, UsernameTakenError, UserStore
from photostack.service.directory import (
    Endpoint,
    MapGuard,
    PhysicalShard,
    claim_ownership,
    initial_map,
)

pytestmark = [pytest.mark.component, pytest.mark.timeout(240)]

USERS = 20_000  # users rows and username claims
EDGE_USERS, EDGES_EACH = 4_000, 25  # 100k following + 100k followers rows
EVENT_USERS, EVENTS_EACH = 4_000, 25  # 100k events
PHOTOS = 100_000


def normalize(sql: str) -> str:
    return " ".join(sql.split())


class Recorder:
    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], tuple[Any, ...]] = {}  # (group, sql) -> first args

    def note(self, group: str, sql: str, args: tuple[Any, ...]) -> None:
        self.calls.setdefault((group, normalize(sql)), args)


class _Recording:
    """The asyncpg methods the stores use, recorded then forwarded."""

    def __init__(self, target: Any, group: str, recorder: Recorder) -> None:
        self._target, self._group, self._rec = target, group, recorder

    async def fetch(self, sql: str, *args: Any) -> Any:
        self._rec.note(self._group, sql, args)
        return await self._target.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self._rec.note(self._group, sql, args)
        return await self._target.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self._rec.note(self._group, sql, args)
        return await self._target.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self._rec.note(self._group, sql, args)
        return await self._target.execute(sql, *args)

    def transaction(self) -> Any:
        return self._target.transaction()


class RecordingPool(_Recording):
    def acquire(self) -> Any:
        pool, group, rec = self._target, self._group, self._rec

        class _Acquire:
            async def __aenter__(self) -> _Recording:
                self._cm = pool.acquire()
                return _Recording(await self._cm.__aenter__(), group, rec)

            async def __aexit__(self, *exc: object) -> None:
                await self._cm.__aexit__(*exc)

        return _Acquire()


def plan_indexes(plan: Any) -> set[str]:
    """Every index a plan reads or arbitrates conflicts with."""
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.add(plan["Index Name"])
        found.update(plan.get("Conflict Arbiter Indexes", []))
        for value in plan.values():
            found |= plan_indexes(value)
    elif isinstance(plan, list):
        for item in plan:
            found |= plan_indexes(item)
    return found


def _registered() -> dict[str, set[str]]:
    """normalized sql -> the indexes registered for it."""
    out: dict[str, set[str]] = {}
    for index, queries in schema.INDEX_QUERIES.items():
        for sql in queries:
            out.setdefault(normalize(sql), set()).add(index)
    return out


async def _load(dsn: dict[str, str]) -> None:
    now = dt.datetime.now(dt.UTC)
    users = await asyncpg.connect(dsn["users"])
    social = await asyncpg.connect(dsn["social"])
    photos = await asyncpg.connect(dsn["photos"])
    try:
        ids = [f"u{i:07d}" for i in range(USERS)]
        await users.copy_records_to_table(
            "users",
            records=[(u, f"name{u}", None, now) for u in ids],
            columns=["id", "username", "display_name", "created_at"],
        )
        await users.copy_records_to_table(
            "usernames", records=[(f"name{u}", u, now) for u in ids],
            columns=["username", "user_id", "created_at"],
        )  # fmt: skip
        await users.copy_records_to_table(
            "event_seqs", records=[(u, EVENTS_EACH) for u in ids[:EVENT_USERS]],
            columns=["user_id", "last_seq"],
        )  # fmt: skip
        await users.copy_records_to_table(
            "events",
            records=[
                (u, s, "follower.new", "{}", now - dt.timedelta(seconds=s), None)
                for u in ids[:EVENT_USERS]
                for s in range(1, EVENTS_EACH + 1)
            ],
            columns=["user_id", "seq", "type", "data", "at", "dedupe_key"],
        )
        edges = [
            (ids[i], ids[(i * 7 + j * 13 + 1) % USERS], now - dt.timedelta(seconds=j))
            for i in range(EDGE_USERS)
            for j in range(EDGES_EACH)
        ]
        for table, other in (("following", "target_id"), ("followers", "follower_id")):
            await social.copy_records_to_table(
                table, records=edges, columns=["user_id", other, "created_at"]
            )
        await photos.copy_records_to_table(
            "photos",
            records=[(f"p{i:08d}", ids[i % USERS], now) for i in range(PHOTOS)],
            columns=["id", "owner_id", "created_at"],
        )
        for conn in (users, social, photos):
            await conn.execute("ANALYZE")
    finally:
        for conn in (users, social, photos):
            await conn.close()


async def _drive(store: UserStore, events: EventStore) -> None:
    """Every user-facing path of the stores, including the rarer branches."""
    alice = await store.create_user("alice", "Alice")
    bob = await store.create_user("bob", None)
    carol = await store.create_user("carol", None)
    with pytest.raises(UsernameTakenError):
        await store.create_user("alice", None)
    await store.get_user(alice["id"])
    await store.get_user_by_username("bob")
    await store.follow(alice["id"], bob["id"])
    await store.follow(alice["id"], bob["id"])  # repeat: reads the existing edge's time
    await store.follow(alice["id"], carol["id"])
    await store.follow(bob["id"], carol["id"])
    for kind in EdgeKind:
        for user in (alice, carol):
            page = await store.list_edges(kind, user["id"], 1, None)
            if page.next_cursor is not None:
                await store.list_edges(kind, user["id"], 1, page.next_cursor)
    await store.unfollow(alice["id"], bob["id"])
    await events.read(carol["id"], 0, limit=10, fresh=True)
    await events.trim_by_age()


@pytest.fixture(scope="module")
def databases(pg_server: PostgresServer) -> dict[str, str]:
    dsn = {}
    for group in schema.GROUPS:
        name = f"indexes_{group}"
        pg_server.create_database(name)
        dsn[group] = pg_server.dsn(name)
    return dsn


async def _record(databases: dict[str, str], scratch: dict[str, str]) -> Recorder:
    for group, dsn in databases.items():
        await schema.apply_schema(group, dsn)
    await _load(databases)
    await _load_directory_and_jobs(databases)
    recorder = Recorder()
    pools = {g: await asyncpg.create_pool(d, min_size=1, max_size=2) for g, d in databases.items()}
    try:
        router = ShardRouter({g: [RecordingPool(p, g, recorder)] for g, p in pools.items()})
        events = EventStore(router)  # type: ignore[arg-type]
        await _drive(UserStore(router, events=events), events)  # type: ignore[arg-type]
        await _drive_photos_and_jobs(router, recorder, databases, scratch)
    finally:
        for pool in pools.values():
            await pool.close()
    return recorder


async def _load_directory_and_jobs(dsn: dict[str, str]) -> None:
    """Ownership rows (1024 logical shards: the most a 16-shard group has) on every group and
    20k user deletions (19k finished) on users, so their plans are the loaded ones."""
    now = dt.datetime.now(dt.UTC)
    for group, target in dsn.items():
        conn = await asyncpg.connect(target)
        try:
            await claim_ownership(conn, range(1024), 1)
            if group == "users":
                await conn.copy_records_to_table(
                    "user_deletions",
                    records=[
                        (f"d{i:07d}", f"gone{i}", "done" if i >= 1000 else "photos",
                         now - dt.timedelta(seconds=i), now if i >= 1000 else None)
                        for i in range(20_000)
                    ],
                    columns=["user_id", "username", "stage", "requested_at", "done_at"],
                )  # fmt: skip
            await conn.execute("ANALYZE")
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def scratch_databases(pg_server: PostgresServer) -> dict[str, str]:
    dsn = {}
    for group in schema.GROUPS:
        name = f"indexes_scratch_{group}"
        pg_server.create_database(name)
        dsn[group] = pg_server.dsn(name)
    return dsn


async def _drive_photos_and_jobs(
    router: ShardRouter[Any], recorder: Recorder, loaded: dict[str, str], scratch: dict[str, str]
) -> None:
    """Photos on the loaded databases (guarded by ownership); the jobs on small scratch copies
    (they scan whole tables), recorded the same way and EXPLAINed on the loaded ones."""
    current = initial_map(
        {g: [PhysicalShard(0, Endpoint(f"{g}-1-primary", d))] for g, d in loaded.items()}
    )

    async def no_refresh(seen: int) -> bool:
        return False

    guard = MapGuard(lambda: current, no_refresh)
    users = UserStore(router)
    owner = await users.create_user("photo_owner", None)
    other = await users.create_user("photo_other", None)
    photos = PhotoStore(router, static_base_url="http://s", guard=guard)
    made = [await photos.create_photo_metadata(owner["id"], f"p{i}") for i in range(3)]
    await photos.get_photo(made[0]["id"])
    page = await photos.list_photos(owner["id"], 2, None)
    assert page.next_cursor is not None
    await photos.list_photos(owner["id"], 2, page.next_cursor)
    await photos.set_status(made[0]["id"], PhotoStatus.READY, thumbnail_key="t")
    await photos.set_status(made[2]["id"], PhotoStatus.FAILED, reason="undecodable")
    assert await photos.referenced_keys(["t", "absent"]) == {"t"}  # the cleanup's lookup
    with pytest.raises(PhotoForbiddenError):
        await photos.delete_photo(made[1]["id"], other["id"])
    await photos.delete_photo(made[1]["id"], owner["id"])

    for group in schema.GROUPS:
        await schema.apply_schema(group, scratch[group])
    pools = {g: await asyncpg.create_pool(d, min_size=1, max_size=2) for g, d in scratch.items()}
    try:
        small = ShardRouter({g: [RecordingPool(p, g, recorder)] for g, p in pools.items()})
        s_users = UserStore(small)  # type: ignore[arg-type]
        a, b, c = [await s_users.create_user(n, None) for n in ("ja", "jb", "jc")]
        await s_users.follow(a["id"], b["id"])
        await s_users.follow(c["id"], a["id"])
        s_photos = PhotoStore(small, static_base_url="http://s")  # type: ignore[arg-type]
        await s_photos.create_photo_metadata(a["id"], "")
        social = pools["social"]  # a half-written pair each way, for the reconciler
        await social.execute(
            "INSERT INTO following (user_id, target_id) VALUES ($1, $2)", b["id"], c["id"]
        )
        await social.execute(
            "INSERT INTO followers (user_id, follower_id) VALUES ($1, $2)", a["id"], b["id"]
        )
        jobs = Jobs(small, JobConfig(batch_size=2))  # type: ignore[arg-type]
        await jobs.run("reconcile-follows")
        await jobs.delete_user(a["id"])
        await jobs.run("user-cleanup")
        await jobs.run("orphan-sweep")
    finally:
        for pool in pools.values():
            await pool.close()


@pytest.fixture(scope="module")
def recorded(databases: dict[str, str], scratch_databases: dict[str, str]) -> Recorder:
    return asyncio.run(_record(databases, scratch_databases))


async def _explain(dsn: str, sql: str, args: tuple[Any, ...]) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:  # plain EXPLAIN plans without executing; the rollback is belt and braces
            return json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def _index_names(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
            "AND tablename <> 'schema_version'"
        )
    finally:
        await conn.close()
    return {r["indexname"] for r in rows}


def test_every_hot_query_uses_its_index(recorded: Recorder, databases: dict[str, str]) -> None:
    registered = _registered()
    unregistered = [sql for _, sql in recorded.calls if sql not in registered]
    assert unregistered == [], "queries the app runs that name no index in schema.INDEX_QUERIES"
    failures = []
    for (group, sql), args in sorted(recorded.calls.items()):
        expected = registered[sql]
        if expected == {schema.NO_INDEX}:
            continue
        used = plan_indexes(asyncio.run(_explain(databases[group], sql, args)))
        if not used & expected:
            failures.append(f"{sql!r}: registered {sorted(expected)}, plan uses {sorted(used)}")
    assert failures == []
    assert len(recorded.calls) >= 20  # the drive reached every path


def _service_literals() -> set[str]:
    """Every string constant in the service package, normalized (adjacent literals are one)."""
    out: set[str] = set()
    for path in Path(schema.__file__).parent.glob("*.py"):
        if path.name == "schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(normalize(node.value))
    return out


def test_every_index_is_registered_and_every_registered_query_is_real(
    recorded: Recorder, databases: dict[str, str]
) -> None:
    found: set[str] = set()
    for dsn in databases.values():
        found |= asyncio.run(_index_names(dsn))
    assert found == set(schema.INDEX_QUERIES) - {schema.NO_INDEX}

    # Statements on paths the drive cannot reach (a compensation after a failed write) must
    # still be the app's own text and still use their index (EXPLAINed with stand-in values).
    ran = {sql for _, sql in recorded.calls}
    literals = _service_literals()
    groups = {
        "usernames": "users", "users": "users", "events": "users", "event_seqs": "users",
        "following": "social", "followers": "social", "photos": "photos",
    }  # fmt: skip
    checked = 0
    for sql, expected in _registered().items():
        if sql in ran or expected == {schema.NO_INDEX}:
            continue
        assert sql in literals, f"registered but not in the service's code: {sql!r}"
        table = next(t for t in groups if f" {t} " in f" {sql} ")
        params = ("x",) * max(int(n) for n in re.findall(r"\$(\d+)", sql))  # text parameters
        plan = asyncio.run(_explain(databases[groups[table]], sql, params))
        assert plan_indexes(plan) & expected, sql
        checked += 1
    assert checked <= 2  # nearly everything is checked on the real path, with real values
