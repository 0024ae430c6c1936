"""Cross-shard jobs on real Postgres: reconciliation of half-written follow pairs, user deletion
cleaned up across shards (and resumed after a failure), the orphan sweeper, leases, and
scatter-gather reporting a stalled shard within its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from photostack.blocks.storage import HashModPartitioner
from photostack.service import app as app_node
from photostack.service import web as web_node
from photostack.service._jobs import JobConfig, Jobs
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, WebSettings
from photostack.service.testing import AppUnavailableError, ASGIAppClient, running
from tests.component.test_service_users_follows import (
    Databases,
    bearer,
    make_databases,
    new_user,
)

pytestmark = pytest.mark.component


@pytest.fixture
def dbs(pg_server: Any) -> Databases:
    """Fresh databases per test: the jobs scan whole tables."""
    databases = make_databases(pg_server, f"jb{uuid.uuid4().hex[:8]}")

    async def apply_all() -> None:
        for group, shards in databases.storage.items():
            for shard in shards:
                await apply_schema(group, shard.primary)

    asyncio.run(apply_all())
    return databases


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "token_secret"
    path.write_bytes(b"j" * 32)
    return path


class Stack:
    def __init__(self, web: httpx.AsyncClient, internal: httpx.AsyncClient, node: Any) -> None:
        self.web, self.internal, self.node = web, internal, node

    async def run(self, job: str) -> dict[str, Any]:
        r = await self.internal.post(f"/internal/v1/jobs/{job}/run")
        assert r.status_code == 200, r.text
        report: dict[str, Any] = r.json()
        return report


@contextlib.asynccontextmanager
async def stack(dbs: Databases, secret_path: Path) -> AsyncIterator[Stack]:
    app = app_node.create_app(
        AppSettings(name="app-1", storage=dbs.storage, pool_max_size=4, jobs_enabled=False)
    )
    app_client = ASGIAppClient(app, backend="app-1")
    web = web_node.create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret_path),
        app_client,
        unavailable_errors=(AppUnavailableError,),
        on_shutdown=app_client.aclose,
    )
    async with (
        running(app),
        running(web),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://w") as w,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as a,
    ):
        yield Stack(w, a, app.state.node)


async def sql(dbs: Databases, group: str, key: str, query: str, *args: Any) -> Any:
    """Run ``query`` on the shard of ``group`` that owns ``key``."""
    index = HashModPartitioner(len(dbs.storage[group])).shard_for(key)
    conn = await asyncpg.connect(dbs.dsn(group, index))
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def ids(client: httpx.AsyncClient, user_id: str, which: str) -> list[str]:
    r = await client.get(f"/v1/users/{user_id}/{which}")
    assert r.status_code == 200, r.text
    return [u["id"] for u in r.json()["items"]]


def test_reconciliation_repairs_half_written_pairs_idempotently(
    dbs: Databases, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            a, b, c, d = [await new_user(s.web) for _ in range(4)]
            # a -> b: forward edge only (the follow died before the reverse edge)
            await sql(dbs, "social", a["id"], "INSERT INTO following (user_id, target_id) "
                      "VALUES ($1, $2)", a["id"], b["id"])  # fmt: skip
            # d -> c: reverse edge only (no forward edge: d does not follow c)
            await sql(dbs, "social", c["id"], "INSERT INTO followers (user_id, follower_id) "
                      "VALUES ($1, $2)", c["id"], d["id"])  # fmt: skip
            assert await ids(s.web, b["id"], "followers") == []
            assert await ids(s.web, c["id"], "followers") == [d["id"]]

            report = await s.run("reconcile-follows")
            assert (report["reverse_added"], report["reverse_dropped"]) == (1, 1)
            assert report["shards"]["complete"] is True
            assert await ids(s.web, b["id"], "followers") == [a["id"]]
            assert await ids(s.web, c["id"], "followers") == []
            forward = await sql(dbs, "social", a["id"], "SELECT created_at FROM following "
                                "WHERE user_id = $1", a["id"])  # fmt: skip
            reverse = await sql(dbs, "social", b["id"], "SELECT created_at FROM followers "
                                "WHERE user_id = $1", b["id"])  # fmt: skip
            assert forward[0]["created_at"] == reverse[0]["created_at"]

            again = await s.run("reconcile-follows")
            assert (again["reverse_added"], again["reverse_dropped"]) == (0, 0)
            assert again["scanned"] == 2

    asyncio.run(main())


def test_reconciliation_in_small_batches_resumes_from_its_cursor(
    dbs: Databases, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            users = [await new_user(s.web) for _ in range(6)]
            for u in users[1:]:
                await sql(
                    dbs,
                    "social",
                    users[0]["id"],
                    "INSERT INTO following (user_id, target_id) VALUES ($1, $2)",
                    users[0]["id"],
                    u["id"],
                )
            pools = {
                g: [await asyncpg.create_pool(sh.primary, min_size=1, max_size=2) for sh in shs]
                for g, shs in dbs.storage.items()
            }
            try:
                from photostack.blocks.storage import ShardRouter

                jobs = Jobs(ShardRouter(pools), JobConfig(batch_size=2))  # type: ignore[arg-type]
                report = await jobs.run("reconcile-follows")
                assert report["reverse_added"] == 5
                assert await jobs._load_state(jobs_name()) == {}  # finished passes reset
            finally:
                for shard_pools in pools.values():
                    for pool in shard_pools:
                        await pool.close()
            assert len(await ids(s.web, users[0]["id"], "following")) == 5
            for u in users[1:]:
                assert await ids(s.web, u["id"], "followers") == [users[0]["id"]]

    asyncio.run(main())


def jobs_name() -> Any:
    from photostack.service._jobs import JobName

    return JobName.RECONCILE_FOLLOWS


def test_deleting_a_user_cleans_every_shard_and_resumes_after_a_failure(
    dbs: Databases, secret_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            gone = await new_user(s.web)
            friends = [await new_user(s.web) for _ in range(4)]
            for f in friends[:2]:
                r = await s.web.put(f"/v1/users/{gone['id']}/following/{f['id']}",
                                    headers=bearer(gone))  # fmt: skip
                assert r.status_code == 204
            for f in friends[2:]:
                r = await s.web.put(f"/v1/users/{f['id']}/following/{gone['id']}",
                                    headers=bearer(f))  # fmt: skip
                assert r.status_code == 204
            photos = s.node.photos
            for i in range(3):
                await photos.create_photo_metadata(gone["id"], f"p{i}")

            r = await s.internal.delete(f"/internal/v1/users/{gone['id']}")
            assert r.status_code == 202, r.text
            assert r.json()["stage"] == "username"
            assert (await s.web.get(f"/v1/users/{gone['id']}")).status_code == 404
            again = await s.internal.delete(f"/internal/v1/users/{gone['id']}")
            assert again.status_code == 202  # idempotent
            missing = await s.internal.delete("/internal/v1/users/nobody00000000")
            assert missing.status_code == 404

            calls = 0
            real = Jobs._delete_edges

            async def crash_once(self: Jobs, edge: Any, user_id: str) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ConnectionResetError("the social shard went away")
                await real(self, edge, user_id)

            monkeypatch.setattr(Jobs, "_delete_edges", crash_once)
            r = await s.internal.post("/internal/v1/jobs/user-cleanup/run")
            assert r.status_code == 503  # a storage error mid-way
            rows = await sql(dbs, "users", gone["id"], "SELECT stage, done_at FROM "
                             "user_deletions WHERE user_id = $1", gone["id"])  # fmt: skip
            assert rows[0]["stage"] == "following"
            assert rows[0]["done_at"] is None
            assert await sql(dbs, "photos", gone["id"], "SELECT id FROM photos "
                             "WHERE owner_id = $1", gone["id"]) == []  # fmt: skip

            report = await s.run("user-cleanup")
            assert report["finished"] == 1
            rows = await sql(dbs, "users", gone["id"], "SELECT stage, done_at FROM "
                             "user_deletions WHERE user_id = $1", gone["id"])  # fmt: skip
            assert rows[0]["stage"] == "done"
            assert rows[0]["done_at"] is not None
            for f in friends[:2]:
                assert await ids(s.web, f["id"], "followers") == []
            for f in friends[2:]:
                assert await ids(s.web, f["id"], "following") == []
                view = (await s.web.get(f"/v1/users/{f['id']}")).json()
                assert view["following_count"] == 0
            for group, column in (("social", "user_id"), ("users", "user_id")):
                table = "following" if group == "social" else "events"
                assert await sql(dbs, group, gone["id"], f"SELECT 1 FROM {table} "  # noqa: S608
                                 f"WHERE {column} = $1", gone["id"]) == []  # fmt: skip
            r = await s.web.post("/v1/users", json={"username": gone["username"]})
            assert r.status_code == 201  # the username is free again
            assert (await s.run("user-cleanup"))["finished"] == 0

            sweep = await s.run("orphan-sweep")
            assert sweep["dangling"] == {"following": 0, "followers": 0, "photos": 0}

    asyncio.run(main())


def test_the_sweeper_counts_dangling_references(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            real = await new_user(s.web)
            ghost = "ghost" + uuid.uuid4().hex[:11]
            await sql(dbs, "social", real["id"], "INSERT INTO following (user_id, target_id) "
                      "VALUES ($1, $2)", real["id"], ghost)  # fmt: skip
            await sql(dbs, "social", real["id"], "INSERT INTO followers (user_id, follower_id) "
                      "VALUES ($1, $2)", real["id"], ghost)  # fmt: skip
            await sql(dbs, "photos", ghost, "INSERT INTO photos (id, owner_id) VALUES ($1, $2)",
                      f"{ghost}_0000000000000000", ghost)  # fmt: skip
            report = await s.run("orphan-sweep")
            assert report["dangling"] == {"following": 1, "followers": 1, "photos": 1}
            assert report["shards"]["complete"] is True
            assert set(report["shards"]["answered"]) == {"social-0", "social-1", "photos-0",
                                                         "photos-1"}  # fmt: skip

    asyncio.run(main())


def test_a_job_runs_on_one_node_at_a_time(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            other = Jobs(s.node.jobs._router)
            async with other.lease("orphan-sweep"):
                r = await s.internal.post("/internal/v1/jobs/orphan-sweep/run")
                assert r.status_code == 409
                assert r.json()["error"]["code"] == "job_busy"
            assert (await s.internal.post("/internal/v1/jobs/orphan-sweep/run")).status_code == 200
            r = await s.internal.post("/internal/v1/jobs/nope/run")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "unknown_job"
            listing = (await s.internal.get("/internal/v1/jobs")).json()
            assert "orphan-sweep" in listing["last"]

    asyncio.run(main())


def test_a_stalled_shard_is_reported_within_the_deadline(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as s:
            jobs = Jobs(s.node.jobs._router, JobConfig(shard_deadline_s=1.0))
            blocker = await asyncpg.connect(dbs.dsn("social", 1))
            try:
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("LOCK TABLE following IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                report = await jobs.sweep_orphans()
                elapsed = time.monotonic() - started
                await tx.rollback()
            finally:
                await blocker.close()
            assert elapsed < 3.0
            shards = report["shards"]
            assert shards["complete"] is False
            assert shards["missing"]["social-1"]["outcome"] == "timed_out"
            assert set(shards["answered"]) == {"social-0", "photos-0", "photos-1"}

    asyncio.run(main())
