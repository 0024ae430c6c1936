"""Users and follows end to end: web node -> in-process app client -> app node -> real Postgres.

Five databases on the session's Postgres stand in for the storage groups: users (1 shard),
social (2 shards), photos (2 shards).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from photostack.blocks.storage import HashModPartitioner
from photostack.service import app as app_node
from photostack.service import web as web_node
from photostack.service._tokens import TokenSigner
from photostack.service.schema import SCHEMA_VERSION, apply_schema
from photostack.service.settings import AppSettings, ShardDsns, WebSettings
from photostack.service.testing import AppUnavailableError, ASGIAppClient, running

pytestmark = pytest.mark.component

DB_LAYOUT = {"users": 1, "social": 2, "photos": 2}
SECRET = b"c" * 32


@dataclass(frozen=True)
class Databases:
    storage: dict[str, tuple[ShardDsns, ...]]

    def dsn(self, group: str, index: int) -> str:
        return self.storage[group][index].primary


def make_databases(pg_server: Any, prefix: str, layout: dict[str, int] = DB_LAYOUT) -> Databases:
    storage = {}
    for group, count in layout.items():
        shards = []
        for index in range(count):
            name = f"{prefix}_{group}_{index + 1}"
            pg_server.create_database(name)
            shards.append(ShardDsns(index, pg_server.dsn(name)))
        storage[group] = tuple(shards)
    return Databases(storage)


@pytest.fixture(scope="module")
def dbs(pg_server: Any) -> Databases:
    databases = make_databases(pg_server, f"svc{uuid.uuid4().hex[:8]}")

    async def apply_all() -> None:
        for group, shards in databases.storage.items():
            for shard in shards:
                assert await apply_schema(group, shard.primary) == SCHEMA_VERSION[group]

    asyncio.run(apply_all())
    return databases


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "token_secret"
    path.write_bytes(SECRET)
    return path


def make_app(dbs: Databases, name: str = "app-1") -> FastAPI:
    return app_node.create_app(AppSettings(name=name, storage=dbs.storage, pool_max_size=4))


@contextlib.asynccontextmanager
async def stack(
    dbs: Databases, secret_path: Path, app_name: str = "app-1"
) -> AsyncIterator[httpx.AsyncClient]:
    """A running app node and web node; yields an HTTP client for the web node."""
    app = make_app(dbs, app_name)
    app_client = ASGIAppClient(app, backend=app_name)
    web = web_node.create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret_path),
        app_client,
        unavailable_errors=(AppUnavailableError,),
        on_shutdown=app_client.aclose,
    )
    async with running(app), running(web):
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            yield client


def unique_name(tag: str = "u") -> str:
    return f"{tag}_{uuid.uuid4().hex[:12]}"


async def new_user(client: httpx.AsyncClient, display_name: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"username": unique_name()}
    if display_name is not None:
        body["display_name"] = display_name
    r = await client.post("/v1/users", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def bearer(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


async def follow(client: httpx.AsyncClient, user: dict[str, Any], target_id: str) -> int:
    r = await client.put(f"/v1/users/{user['id']}/following/{target_id}", headers=bearer(user))
    return r.status_code


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json()["error"]["code"] == code


def test_create_and_read_users(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            r = await client.post("/v1/users", json={"username": (name := unique_name())})
            assert r.status_code == 201
            assert r.headers["x-served-by"] == "web-1,app-1"
            created = r.json()
            assert set(created) == {"id", "username", "display_name", "created_at", "token"}
            assert created["username"] == name
            assert created["display_name"] is None
            assert created["created_at"].endswith("Z")
            assert TokenSigner(SECRET).verify(created["token"]) == created["id"]

            expected = {k: v for k, v in created.items() if k != "token"} | {
                "followers_count": 0,
                "following_count": 0,
                "photos_count": 0,
            }
            r = await client.get(f"/v1/users/{created['id']}")
            assert (r.status_code, r.json()) == (200, expected)
            assert r.headers["x-served-by"] == "web-1,app-1"
            r = await client.get(f"/v1/users/by-username/{name}")
            assert (r.status_code, r.json()) == (200, expected)

            named = await new_user(client, display_name="Zoë Ünïcode")
            r = await client.get(f"/v1/users/{named['id']}")
            assert r.json()["display_name"] == "Zoë Ünïcode"

    asyncio.run(main())


def test_user_errors(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            user = await new_user(client)
            r = await client.post("/v1/users", json={"username": user["username"]})
            assert_error(r, 409, "username_taken")
            assert_error(await client.get("/v1/users/0000000000000000"), 404, "user_not_found")
            assert_error(
                await client.get("/v1/users/by-username/nobody_here"), 404, "user_not_found"
            )
            r = await client.post(
                "/v1/users", content=b"{", headers={"content-type": "application/json"}
            )
            assert_error(r, 400, "malformed_json")
            assert_error(
                await client.post("/v1/users", json={"username": "x"}), 422, "invalid_username"
            )
            r = await client.post(
                "/v1/users", json={"username": unique_name(), "display_name": "d" * 65}
            )
            assert_error(r, 422, "invalid_display_name")

    asyncio.run(main())


def test_follow_errors(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            alice, bob = await new_user(client), await new_user(client)
            path = f"/v1/users/{alice['id']}/following/{bob['id']}"
            assert_error(await client.put(path), 401, "missing_token")
            assert_error(
                await client.put(path, headers={"Authorization": "Bearer x"}), 401, "invalid_token"
            )
            assert_error(await client.put(path, headers=bearer(bob)), 403, "forbidden")
            assert_error(await client.delete(path, headers=bearer(bob)), 403, "forbidden")
            r = await client.put(
                f"/v1/users/{alice['id']}/following/{alice['id']}", headers=bearer(alice)
            )
            assert_error(r, 422, "self_follow")
            r = await client.put(
                f"/v1/users/{alice['id']}/following/0000000000000000", headers=bearer(alice)
            )
            assert_error(r, 404, "user_not_found")
            # a validly signed token for a user that does not exist
            ghost = {
                "id": "0000000000000001",
                "token": TokenSigner(SECRET).issue("0000000000000001"),
            }
            assert_error(
                await client.put(
                    f"/v1/users/{ghost['id']}/following/{bob['id']}", headers=bearer(ghost)
                ),
                404,
                "user_not_found",
            )
            for which in ("following", "followers"):
                r = await client.get(f"/v1/users/0000000000000000/{which}")
                assert_error(r, 404, "user_not_found")
                assert_error(
                    await client.get(f"/v1/users/{alice['id']}/{which}?limit=0"),
                    422,
                    "invalid_limit",
                )
                assert_error(
                    await client.get(f"/v1/users/{alice['id']}/{which}?limit=101"),
                    422,
                    "invalid_limit",
                )
                assert_error(
                    await client.get(f"/v1/users/{alice['id']}/{which}?cursor=zzz"),
                    400,
                    "invalid_cursor",
                )

    asyncio.run(main())


def test_follow_is_idempotent_and_counted(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            alice = await new_user(client)
            bob = await new_user(client)
            carol = await new_user(client)
            for _ in range(3):
                assert await follow(client, alice, bob["id"]) == 204
            assert await follow(client, carol, bob["id"]) == 204
            assert await follow(client, alice, carol["id"]) == 204

            async def counts(user: dict[str, Any]) -> tuple[int, int]:
                body = (await client.get(f"/v1/users/{user['id']}")).json()
                return body["followers_count"], body["following_count"]

            assert await counts(alice) == (0, 2)
            assert await counts(bob) == (2, 0)
            assert await counts(carol) == (1, 1)

            # forward edge on the follower's shard, reverse edge on the followee's
            await assert_edge_placement(dbs, alice["id"], bob["id"], present=True)

            path = f"/v1/users/{alice['id']}/following/{bob['id']}"
            for _ in range(2):
                r = await client.delete(path, headers=bearer(alice))
                assert (r.status_code, r.content) == (204, b"")
            assert await counts(alice) == (0, 1)
            assert await counts(bob) == (1, 0)
            await assert_edge_placement(dbs, alice["id"], bob["id"], present=False)
            r = await client.get(f"/v1/users/{bob['id']}/followers")
            assert [u["id"] for u in r.json()["items"]] == [carol["id"]]

    asyncio.run(main())


async def assert_edge_placement(
    dbs: Databases, follower: str, followee: str, *, present: bool
) -> None:
    social = HashModPartitioner(DB_LAYOUT["social"])
    for index in range(DB_LAYOUT["social"]):
        conn = await asyncpg.connect(dbs.dsn("social", index))
        try:
            forward = await conn.fetchval(
                "SELECT count(*) FROM following WHERE user_id = $1 AND target_id = $2",
                follower,
                followee,
            )
            reverse = await conn.fetchval(
                "SELECT count(*) FROM followers WHERE user_id = $1 AND follower_id = $2",
                followee,
                follower,
            )
        finally:
            await conn.close()
        assert forward == int(present and index == social.shard_for(follower))
        assert reverse == int(present and index == social.shard_for(followee))


def test_pagination_has_no_gaps_or_duplicates(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            star = await new_user(client)
            fans = [await new_user(client) for _ in range(23)]
            for fan in fans:
                assert await follow(client, fan, star["id"]) == 204
                assert await follow(client, star, fan["id"]) == 204
            newest_first = [fan["id"] for fan in reversed(fans)]

            for which in ("followers", "following"):
                seen: list[str] = []
                cursor: str | None = None
                pages = 0
                while True:
                    params: dict[str, Any] = {"limit": 5}
                    if cursor is not None:
                        params["cursor"] = cursor
                    r = await client.get(f"/v1/users/{star['id']}/{which}", params=params)
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert set(body) == {"items", "next_cursor"}
                    assert len(body["items"]) <= 5
                    seen += [item["id"] for item in body["items"]]
                    pages += 1
                    cursor = body["next_cursor"]
                    if cursor is None:
                        break
                assert seen == newest_first
                assert pages == 5
                first = (await client.get(f"/v1/users/{star['id']}/{which}")).json()
                assert len(first["items"]) == 20  # default limit
                item = first["items"][0]
                assert set(item) == {
                    "id",
                    "username",
                    "display_name",
                    "created_at",
                    "followers_count",
                    "following_count",
                    "photos_count",
                }
                assert item["followers_count"] == 1
                assert item["following_count"] == 1
                full = (await client.get(f"/v1/users/{star['id']}/{which}?limit=100")).json()
                assert [u["id"] for u in full["items"]] == newest_first
                assert full["next_cursor"] is None

    asyncio.run(main())


def test_usernames_are_unique_under_concurrent_creation(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        name = unique_name("race")
        async with stack(dbs, secret_path, "app-1") as one, stack(dbs, secret_path, "app-2") as two:
            results = await asyncio.gather(
                *(client.post("/v1/users", json={"username": name}) for client in [one, two] * 8)
            )
            statuses = sorted(r.status_code for r in results)
            assert statuses == [201] + [409] * 15
            winner = next(r.json() for r in results if r.status_code == 201)
            r = await one.get(f"/v1/users/by-username/{name}")
            assert r.json()["id"] == winner["id"]
        conn = await asyncpg.connect(dbs.dsn("users", 0))
        try:
            assert await conn.fetchval("SELECT count(*) FROM users WHERE username = $1", name) == 1
        finally:
            await conn.close()

    asyncio.run(main())


def test_photos_count_is_a_real_count(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as client:
            user = await new_user(client)
            shard = HashModPartitioner(DB_LAYOUT["photos"]).shard_for(user["id"])
            conn = await asyncpg.connect(dbs.dsn("photos", shard))
            try:
                for i in range(3):
                    await conn.execute(
                        "INSERT INTO photos (id, owner_id, caption) VALUES ($1, $2, $3)",
                        f"{user['id']}p{i}",
                        user["id"],
                        f"photo {i}",
                    )
            finally:
                await conn.close()
            r = await client.get(f"/v1/users/{user['id']}")
            assert r.json()["photos_count"] == 3

    asyncio.run(main())


def test_app_nodes_apply_the_schema_on_fresh_databases(pg_server: Any) -> None:
    fresh = make_databases(pg_server, f"svcfresh{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        apps = [make_app(fresh, f"app-{i}") for i in range(3)]
        async with contextlib.AsyncExitStack() as stack_:
            await asyncio.gather(*(stack_.enter_async_context(running(a)) for a in apps))
            for a in apps:
                transport = httpx.ASGITransport(app=a)
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                    r = await client.get("/healthz")
                    assert r.status_code == 200
                    assert r.headers["x-served-by"] == a.state.node.settings.name
        for group, shards in fresh.storage.items():
            for shard in shards:
                assert await apply_schema(group, shard.primary) == SCHEMA_VERSION[group]
                conn = await asyncpg.connect(shard.primary)
                try:
                    rows = await conn.fetch(
                        "SELECT group_name, version FROM schema_version ORDER BY version"
                    )
                finally:
                    await conn.close()
                expected = [(group, v) for v in range(1, SCHEMA_VERSION[group] + 1)]
                assert [tuple(r) for r in rows] == expected

    asyncio.run(main())


def test_app_is_unready_until_its_shards_are_reachable() -> None:
    dead = "postgresql://postgres@127.0.0.1:1/none"
    storage = {g: tuple(ShardDsns(i, dead) for i in range(n)) for g, n in DB_LAYOUT.items()}
    app = app_node.create_app(AppSettings(name="app-9", storage=storage))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                r = await client.get("/healthz")
                assert r.status_code == 503
                assert r.headers["x-served-by"] == "app-9"
                r = await client.get("/internal/v1/users/abc")
                assert_error(r, 503, "app_unavailable")
                assert "starting" in r.json()["error"]["message"]
                assert r.headers["retry-after"] == "1"

    asyncio.run(main())


def test_dead_app_tier_is_503(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        app = make_app(dbs)
        app_client = ASGIAppClient(app, backend="app-1")
        web = web_node.create_app(
            WebSettings(name="web-1", app_nodes=(), token_secret_path=secret_path),
            app_client,
            unavailable_errors=(AppUnavailableError,),
        )
        async with running(app), running(web):
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
                user = await new_user(client)
                app_client.available = False
                r = await client.get(f"/v1/users/{user['id']}")
                assert_error(r, 503, "app_unavailable")
                assert r.headers["retry-after"]
                app_client.available = True
                assert (await client.get(f"/v1/users/{user['id']}")).status_code == 200
        await app_client.aclose()

    asyncio.run(main())


def test_failing_shard_is_503_storage_unavailable(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        app = make_app(dbs)
        async with running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for pool in app.state.node._pools:  # every shard connection drops at once
                    pool.terminate()
                r = await client.get("/internal/v1/users/0000000000000000")
                assert_error(r, 503, "storage_unavailable")
                assert r.headers["retry-after"] == "1"
                metrics = (await client.get("/metrics")).text
                assert "photostack_storage_errors_total" in metrics

    asyncio.run(main())


def test_users_sharded_across_two_databases(pg_server: Any, secret_path: Path) -> None:
    """Username claim and user row on different shards: unique names, lookups, no orphan claims."""
    layout = {"users": 2, "social": 1, "photos": 1}
    split = make_databases(pg_server, f"svcsplit{uuid.uuid4().hex[:8]}", layout)
    users: list[dict[str, Any]] = []

    async def main() -> None:
        async with stack(split, secret_path) as client:
            users[:] = [await new_user(client) for _ in range(4)]
            shard = HashModPartitioner(2).shard_for
            # until one user's row and name claim sit on different shards (p = 1/2 per user)
            while all(shard(u["id"]) == shard(u["username"]) for u in users) and len(users) < 64:
                users.append(await new_user(client))
            assert any(shard(u["id"]) != shard(u["username"]) for u in users)
            for user in users:
                r = await client.get(f"/v1/users/by-username/{user['username']}")
                assert r.json()["id"] == user["id"]
                r = await client.post("/v1/users", json={"username": user["username"]})
                assert_error(r, 409, "username_taken")
            assert await follow(client, users[0], users[1]["id"]) == 204
            r = await client.get(f"/v1/users/{users[1]['id']}/followers")
            assert [u["id"] for u in r.json()["items"]] == [users[0]["id"]]
        per_shard = []
        for index in range(2):
            conn = await asyncpg.connect(split.dsn("users", index))
            try:
                per_shard.append(await conn.fetchval("SELECT count(*) FROM users"))
                claims = await conn.fetch("SELECT username FROM usernames")
            finally:
                await conn.close()
            assert all(HashModPartitioner(2).shard_for(r["username"]) == index for r in claims)
        assert sum(per_shard) == len(users)

    asyncio.run(main())
