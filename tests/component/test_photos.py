"""Photo metadata end to end: web node -> in-process app client -> app node -> real Postgres.

Photos are created through the domain function the upload path will call
(``PhotoStore.create_photo_metadata``); reads, lists and deletes go through the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from photostack.blocks.storage import HashModPartitioner
from photostack.service import app as app_node
from photostack.service import web as web_node
from photostack.service._photos import InvalidPhotoError, PhotoStatus, PhotoStore
from photostack.service._store import UserNotFoundError
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

BASE = "http://static.test:9"


@pytest.fixture(scope="module")
def dbs(pg_server: Any) -> Databases:
    databases = make_databases(pg_server, f"ph{uuid.uuid4().hex[:8]}")

    async def apply_all() -> None:
        for group, shards in databases.storage.items():
            for shard in shards:
                await apply_schema(group, shard.primary)

    asyncio.run(apply_all())
    return databases


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "token_secret"
    path.write_bytes(b"p" * 32)
    return path


@contextlib.asynccontextmanager
async def stack(
    dbs: Databases, secret_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, PhotoStore, FastAPI]]:
    app = app_node.create_app(
        AppSettings(
            name="app-1",
            storage=dbs.storage,
            pool_max_size=4,
            static_base_url=BASE,
            jobs_enabled=False,
        )
    )
    app_client = ASGIAppClient(app, backend="app-1")
    web = web_node.create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret_path),
        app_client,
        unavailable_errors=(AppUnavailableError,),
        on_shutdown=app_client.aclose,
    )
    async with running(app), running(web):
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            yield client, app.state.node.photos, app


def test_a_photo_reads_back_in_the_contract_shape(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as (client, photos, _):
            alice = await new_user(client)
            made = await photos.create_photo_metadata(
                alice["id"], "sunset", content_type="image/jpeg", original_key="ab/cd.jpg"
            )
            assert made["id"].startswith(alice["id"] + "_")
            r = await client.get(f"/v1/photos/{made['id']}")
            assert r.status_code == 200, r.text
            photo = r.json()
            assert set(photo) == {"id", "owner_id", "caption", "created_at", "status", "urls"}
            assert photo["owner_id"] == alice["id"]
            assert photo["status"] == "processing"
            assert photo["urls"] == {"original": f"{BASE}/media/ab/cd.jpg", "thumbnail": None}
            assert r.headers["x-served-by"] == "web-1,app-1"
            assert r.headers["x-cache"] == "miss"
            again = await client.get(f"/v1/photos/{made['id']}")
            assert (again.headers["x-cache"], again.json()) == ("hit", photo)

            ready = await photos.set_status(
                made["id"], PhotoStatus.READY, thumbnail_key="ab/cd.thumb.jpg"
            )
            assert ready["urls"]["thumbnail"] == f"{BASE}/media/ab/cd.thumb.jpg"
            # the status change invalidated the cached copy: no stale "processing"
            after = await client.get(f"/v1/photos/{made['id']}")
            assert after.json()["status"] == "ready"
            with pytest.raises(InvalidPhotoError):
                await photos.set_status(made["id"], PhotoStatus.FAILED)

            user = (await client.get(f"/v1/users/{alice['id']}")).json()
            assert user["photos_count"] == 1
            for missing in ("nope", f"{alice['id']}_0000000000000000", "bad$id"):
                r = await client.get(f"/v1/photos/{missing}")
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "photo_not_found"

    asyncio.run(main())


def test_a_photo_lives_on_its_owners_shard(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as (client, photos, _):
            partitioner = HashModPartitioner(len(dbs.storage["photos"]))
            owners = [await new_user(client) for _ in range(6)]
            for owner in owners:
                made = await photos.create_photo_metadata(owner["id"], "")
                home = partitioner.shard_for(owner["id"])
                for index in range(len(dbs.storage["photos"])):
                    conn = await asyncpg.connect(dbs.dsn("photos", index))
                    try:
                        found = await conn.fetchval(
                            "SELECT count(*) FROM photos WHERE id = $1", made["id"]
                        )
                    finally:
                        await conn.close()
                    assert found == (1 if index == home else 0)

    asyncio.run(main())


def test_a_users_photos_newest_first_with_cursor(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as (client, photos, _):
            bob = await new_user(client)
            made = [
                (await photos.create_photo_metadata(bob["id"], f"p{i}"))["id"] for i in range(5)
            ]
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(5):
                params: dict[str, Any] = {"limit": 2}
                if cursor:
                    params["cursor"] = cursor
                r = await client.get(f"/v1/users/{bob['id']}/photos", params=params)
                assert r.status_code == 200, r.text
                body = r.json()
                seen += [p["id"] for p in body["items"]]
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            assert seen == list(reversed(made))

            carol = await new_user(client)
            r = await client.get(f"/v1/users/{carol['id']}/photos")
            assert r.json() == {"items": [], "next_cursor": None}
            r = await client.get("/v1/users/nobody0000000000/photos")
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "user_not_found"
            r = await client.get(f"/v1/users/{bob['id']}/photos", params={"cursor": "%%%"})
            assert r.status_code == 400
            r = await client.get(f"/v1/users/{bob['id']}/photos", params={"limit": 101})
            assert r.status_code == 422

    asyncio.run(main())


def test_only_the_owner_deletes_a_photo(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as (client, photos, _):
            owner, other = await new_user(client), await new_user(client)
            made = await photos.create_photo_metadata(owner["id"], "mine")
            path = f"/v1/photos/{made['id']}"
            assert (await client.delete(path)).status_code == 401
            r = await client.delete(path, headers=bearer(other))
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "forbidden"
            assert (await client.delete(path, headers=bearer(owner))).status_code == 204
            assert (await client.get(path)).status_code == 404
            assert (await client.delete(path, headers=bearer(owner))).status_code == 404
            r = await client.delete("/v1/photos/unknown", headers=bearer(owner))
            assert r.status_code == 404
            assert (await client.get(f"/v1/users/{owner['id']}")).json()["photos_count"] == 0

    asyncio.run(main())


def test_create_photo_metadata_refuses_bad_input(dbs: Databases, secret_path: Path) -> None:
    async def main() -> None:
        async with stack(dbs, secret_path) as (client, photos, _):
            owner = await new_user(client)
            with pytest.raises(InvalidPhotoError) as caught:
                await photos.create_photo_metadata(owner["id"], "x" * 2201)
            assert caught.value.code == "invalid_caption"
            with pytest.raises(UserNotFoundError):
                await photos.create_photo_metadata("ghost000000000000", "hi")
            with pytest.raises(InvalidPhotoError):
                await photos.create_photo_metadata(
                    owner["id"], "", photo_id="someoneelse_0123456789abcdef"
                )
            exact = await photos.create_photo_metadata(owner["id"], "x" * 2200)
            assert len(exact["caption"]) == 2200

    asyncio.run(main())
