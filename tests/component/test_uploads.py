"""Uploads end to end on real Postgres (shards + the queue's database) and Redis: web node ->
in-process app node -> queue -> an in-process worker running the real task registry -> media
origins as two directories -> the follower's feed and events."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from PIL import Image

from photostack.blocks.queue import (
    PostgresQueue,
    QueueConfig,
    RetryPolicy,
    TaskContext,
    Worker,
    WorkerConfig,
)
from photostack.service import app as app_node
from photostack.service import tasks
from photostack.service import web as web_node
from photostack.service._uploads import DirMediaStore, media_store_from
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, Peer, WebSettings
from photostack.service.testing import AppUnavailableError, ASGIAppClient, running
from tests.component.test_service_users_follows import (
    Databases,
    assert_error,
    bearer,
    follow,
    make_databases,
    new_user,
)

pytestmark = [pytest.mark.component, pytest.mark.timeout(180)]

BASE = "http://static.test:9"


@pytest.fixture(scope="module")
def dbs(pg_server: Any) -> tuple[Databases, str]:
    prefix = f"up{uuid.uuid4().hex[:8]}"
    databases = make_databases(pg_server, prefix)
    pg_server.create_database(f"{prefix}_queue")

    async def apply_all() -> None:
        for group, shards in databases.storage.items():
            for shard in shards:
                await apply_schema(group, shard.primary)

    asyncio.run(apply_all())
    return databases, pg_server.dsn(f"{prefix}_queue")


class FlakyMedia(DirMediaStore):
    """The origins, with injected read failures (a forced, retryable task failure)."""

    fail_gets = 0

    async def get(self, key: str) -> bytes:
        if self.fail_gets:
            self.fail_gets -= 1
            raise OSError("origin down (injected)")
        return await super().get(key)


@dataclass
class Stack:
    client: httpx.AsyncClient
    app: FastAPI
    media: Any  # FlakyMedia, or the origins' store when the stack runs real origins
    roots: tuple[Path, Path]
    queue_dsn: str
    queue_name: str
    redis: aioredis.Redis

    @contextlib.asynccontextmanager
    async def worker(self, retry_base_s: float = 0.02) -> AsyncIterator[PostgresQueue]:
        """A worker over the real registry; retries fast (the worker's policy sets backoff)."""
        policies = {
            kind: RetryPolicy(max_attempts=5, base_delay_s=retry_base_s, max_delay_s=0.1)
            for kind in tasks.registry.kinds()
        }
        backend = PostgresQueue(self.queue_dsn, QueueConfig(self.queue_name, policies=policies))
        await backend.start()
        client = ASGIAppClient(self.app, backend="app-1")
        tasks.configure(tasks.TaskDeps(app=client, media=self.media))
        worker = Worker(
            backend,
            tasks.registry,
            WorkerConfig(concurrency=4, visibility_timeout_s=5.0, poll_interval_s=0.1),
        )
        run = asyncio.create_task(worker.run())
        try:
            yield backend
        finally:
            worker.stop()
            await run
            tasks.configure(None)
            await client.aclose()
            await backend.aclose()


@contextlib.asynccontextmanager
async def stack(
    dbs: tuple[Databases, str],
    redis_server: Any,
    tmp_path: Path,
    *,
    max_bytes: int = 10 * 1024 * 1024,
    queue_max_length: int = 100_000,
    fanout_limit: int = 1000,
    media_config: dict[str, Any] | None = None,
    static_base_url: str = BASE,
) -> AsyncIterator[Stack]:
    """``media_config`` (web node and worker) replaces the two origin directories."""
    databases, queue_dsn = dbs
    queue_name = f"q{uuid.uuid4().hex[:10]}"
    roots = (tmp_path / "origin-1", tmp_path / "origin-2")
    secret = tmp_path / "secret"
    secret.write_bytes(b"u" * 32)
    app = app_node.create_app(
        AppSettings(
            name="app-1",
            storage=databases.storage,
            cache_nodes=(Peer("cache-1", redis_server.host, redis_server.port),),
            pool_max_size=4,
            static_base_url=static_base_url,
            jobs_enabled=False,
            queue_dsn=queue_dsn,
            queue_name=queue_name,
            queue_max_length=queue_max_length,
            feed={"fanout_limit": fanout_limit},
        )
    )
    app_client = ASGIAppClient(app, backend="app-1")
    if media_config is None:
        media_config = {"engine": "dir", "roots": [str(r) for r in roots], "base_url": BASE}
        worker_media: Any = FlakyMedia(list(roots), BASE)
    else:
        worker_media = media_store_from(media_config)
    web = web_node.create_app(
        WebSettings(
            name="web-1",
            app_nodes=(),
            token_secret_path=secret,
            upload_max_bytes=max_bytes,
            media=media_config,
        ),
        app_client,
        unavailable_errors=(AppUnavailableError,),
        on_shutdown=app_client.aclose,
    )
    r = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    async with running(app), running(web):
        await wait_queue_ready(app)
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            try:
                yield Stack(client, app, worker_media, roots, queue_dsn, queue_name, r)
            finally:
                await worker_media.aclose()
    await r.aclose()


async def wait_queue_ready(app: FastAPI) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if app.state.node.uploads._queue_ready:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the app never reached its queue")


def jpeg(size: tuple[int, int] = (640, 480), orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    exif[0x010F] = "Camera"
    Image.new("RGB", size, (30, 90, 200)).save(out, "JPEG", exif=exif)
    return out.getvalue()


async def upload(
    s: Stack, user: dict[str, Any], data: bytes, caption: str = "hi", name: str = "a.jpg"
) -> httpx.Response:
    return await s.client.post(
        "/v1/photos",
        headers=bearer(user),
        files={"file": (name, data, "image/jpeg")},
        data={"caption": caption},
    )


async def wait_task(s: Stack, user: dict[str, Any], task_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await s.client.get(f"/v1/tasks/{task_id}", headers=bearer(user))
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in states:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {states}: {body}")


async def events_of(s: Stack, user: dict[str, Any]) -> list[dict[str, Any]]:
    r = await s.client.get("/v1/events?after=0", headers=bearer(user))
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def files(roots: tuple[Path, Path]) -> list[set[str]]:
    return [{p.name for p in root.iterdir() if not p.name.startswith(".")} for root in roots]


def test_upload_thumbnail_ready_then_in_a_followers_feed(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path) as s:
            alice, bob, carol = [await new_user(s.client) for _ in range(3)]
            assert await follow(s.client, bob, alice["id"]) == 204

            # no worker is running: the upload is still accepted (seed scenario 4)
            r = await upload(s, alice, jpeg(orientation=6), caption="sunset")
            assert r.status_code == 202, r.text
            body = r.json()
            photo, task = body["photo"], body["task"]
            assert photo["status"] == "processing"
            assert photo["urls"]["thumbnail"] is None
            assert photo["caption"] == "sunset"
            assert photo["owner_id"] == alice["id"]
            assert task["status_url"] == f"/v1/tasks/{task['id']}"
            queued = (await s.client.get(task["status_url"], headers=bearer(alice))).json()
            assert queued == {
                "id": task["id"], "kind": "thumbnail", "status": "queued", "attempts": 0,
                "result": None,
            }  # fmt: skip
            original = photo["urls"]["original"].rsplit("/", 1)[1]
            assert all(original in names for names in files(s.roots))  # on both origins

            async with s.worker():
                done = await wait_task(s, alice, task["id"], "succeeded")
                fanout_id = done["result"]["fanout_task"]
                await wait_task(s, alice, fanout_id, "succeeded")

            assert done["attempts"] == 1
            ready = (await s.client.get(f"/v1/photos/{photo['id']}")).json()
            assert ready["status"] == "ready"
            thumb = ready["urls"]["thumbnail"].rsplit("/", 1)[1]
            assert all(thumb in names for names in files(s.roots))
            with Image.open(s.roots[1] / thumb) as image:
                assert image.size == (240, 320)  # upright (EXIF 6) and bounded
                assert not image.getexif()

            feed = (await s.client.get("/v1/feed", headers=bearer(bob))).json()
            assert [p["id"] for p in feed["items"]] == [photo["id"]]
            assert feed["next_cursor"] is None
            assert feed["items"][0]["urls"]["thumbnail"] == ready["urls"]["thumbnail"]
            assert (await s.client.get("/v1/feed", headers=bearer(carol))).json()["items"] == []
            assert [e["type"] for e in await events_of(s, alice)] == ["follower.new", "photo.ready"]
            posted = [e for e in await events_of(s, bob) if e["type"] == "photo.posted"]
            assert [e["data"]["photo"]["id"] for e in posted] == [photo["id"]]

            # a redelivered thumbnail task (its worker died after finishing) repeats nothing
            async with s.worker():
                tasks.configure(tasks.TaskDeps(app=ASGIAppClient(s.app), media=s.media))
                again = await tasks.thumbnail(
                    TaskContext(task["id"], "thumbnail", {"photo_id": photo["id"]}, 2, True)
                )
                assert again["thumbnail"] == ready["urls"]["thumbnail"]  # type: ignore[index]
            assert [e["type"] for e in await events_of(s, alice)] == ["follower.new", "photo.ready"]
            assert len([e for e in await events_of(s, bob) if e["type"] == "photo.posted"]) == 1

            r = await s.client.get(f"/v1/tasks/{uuid.uuid4()}", headers=bearer(alice))
            assert_error(r, 404, "task_not_found")
            assert_error(await s.client.get("/v1/tasks/x", headers=bearer(alice)), 404,
                         "task_not_found")  # fmt: skip
            assert (await s.client.get(f"/v1/tasks/{task['id']}")).status_code == 401
            assert (await s.client.get("/v1/feed")).status_code == 401

    asyncio.run(main())


def test_bad_uploads_are_refused_and_leave_nothing(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path, max_bytes=20_000) as s:
            alice = await new_user(s.client)
            r = await upload(s, alice, b"<html>not an image</html>", name="cat.jpg")
            assert_error(r, 415, "unsupported_media_type")
            r = await upload(s, alice, jpeg((2000, 2000)) + b"\0" * 30_000)
            assert_error(r, 413, "payload_too_large")
            r = await s.client.post(
                "/v1/photos",
                headers={**bearer(alice), "content-type": "application/json"},
                content=b"{}",
            )
            assert_error(r, 415, "unsupported_media_type")
            r = await upload(s, alice, jpeg((10, 10)), caption="x" * 2201)
            assert_error(r, 422, "invalid_caption")
            no_auth = await s.client.post("/v1/photos", files={"file": ("a.jpg", jpeg())})
            assert no_auth.status_code == 401
            assert files(s.roots) == [set(), set()]
            mine = (await s.client.get(f"/v1/users/{alice['id']}/photos")).json()
            assert mine["items"] == []

    asyncio.run(main())


def test_a_full_queue_answers_503_and_writes_nothing(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path, queue_max_length=1) as s:
            alice = await new_user(s.client)
            first = await upload(s, alice, jpeg((64, 64)))
            assert first.status_code == 202, first.text
            r = await upload(s, alice, jpeg((65, 65)))
            assert_error(r, 503, "queue_full")
            assert int(r.headers["retry-after"]) >= 1
            mine = (await s.client.get(f"/v1/users/{alice['id']}/photos")).json()["items"]
            assert [p["id"] for p in mine] == [first.json()["photo"]["id"]]

            async with s.worker():  # the queue drains; the retried upload goes through
                await wait_task(s, alice, first.json()["task"]["id"], "succeeded")
                again = await upload(s, alice, jpeg((65, 65)))
                assert again.status_code == 202, again.text
                await wait_task(s, alice, again.json()["task"]["id"], "succeeded")

    asyncio.run(main())


def test_a_failing_task_ends_dead_then_replays_and_a_corrupt_image_fails_the_photo(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path) as s:
            alice = await new_user(s.client)
            s.media.fail_gets = 1_000  # every attempt fails: the origins "are down"
            made = (await upload(s, alice, jpeg())).json()
            async with s.worker() as queue:
                dead = await wait_task(s, alice, made["task"]["id"], "dead")
                assert dead["attempts"] == 5
                info = await queue.status(made["task"]["id"])
                assert "origin down" in (info.last_error or "")
                photo = (await s.client.get(f"/v1/photos/{made['photo']['id']}")).json()
                assert photo["status"] == "processing"

                s.media.fail_gets = 0  # fixed: replay the dead letter
                await queue.replay(made["task"]["id"])
                done = await wait_task(s, alice, made["task"]["id"], "succeeded")
                assert done["attempts"] == 1
                photo = (await s.client.get(f"/v1/photos/{made['photo']['id']}")).json()
                assert photo["status"] == "ready"

                whole = jpeg((400, 400))
                broken = (await upload(s, alice, whole[: len(whole) // 3])).json()
                dead = await wait_task(s, alice, broken["task"]["id"], "dead")
                assert dead["attempts"] == 1  # undecodable: no retry can help
                photo = (await s.client.get(f"/v1/photos/{broken['photo']['id']}")).json()
                assert photo["status"] == "failed"

    asyncio.run(main())


def test_celebrities_are_merged_at_read_time_deletes_clean_up_and_timelines_rebuild(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path, fanout_limit=1) as s:
            star, friend, bob, carol = [await new_user(s.client) for _ in range(4)]
            for fan in (bob, carol):
                assert await follow(s.client, fan, star["id"]) == 204
            assert await follow(s.client, bob, friend["id"]) == 204
            async with s.worker():
                ids = []
                for owner in (friend, star, friend):
                    made = (await upload(s, owner, jpeg((50 + len(ids), 50)))).json()
                    done = await wait_task(s, owner, made["task"]["id"], "succeeded")
                    fan = await wait_task(s, owner, done["result"]["fanout_task"], "succeeded")
                    ids.append((made["photo"]["id"], fan["result"]["mode"]))
                assert [m for _, m in ids] == ["push", "pull", "push"]  # star: 2 > 1 followers
                newest_first = [i for i, _ in reversed(ids)]

                timeline = await s.redis.zrange(f"ft:{bob['id']}", 0, -1)
                assert ids[1][0].encode() not in timeline  # not pushed: merged at read
                page1 = (await s.client.get("/v1/feed?limit=2", headers=bearer(bob))).json()
                page2 = (
                    await s.client.get(
                        f"/v1/feed?limit=2&cursor={page1['next_cursor']}", headers=bearer(bob)
                    )
                ).json()
                got = [p["id"] for p in page1["items"] + page2["items"]]
                assert got == newest_first
                assert page2["next_cursor"] is None
                carol_feed = (await s.client.get("/v1/feed", headers=bearer(carol))).json()
                assert [p["id"] for p in carol_feed["items"]] == [ids[1][0]]

                # the timelines are a cache of the photos shards: lose them, read, rebuilt
                await s.redis.delete(f"ft:{bob['id']}", f"fp:{star['id']}")
                rebuilt = (await s.client.get("/v1/feed", headers=bearer(bob))).json()
                assert [p["id"] for p in rebuilt["items"]] == newest_first

                # delete: 204, files and feed rows go (cleanup task), others' untouched
                victim = ids[2][0]
                photo = (await s.client.get(f"/v1/photos/{victim}")).json()
                keys = [u.rsplit("/", 1)[1] for u in photo["urls"].values()]
                r = await s.client.delete(f"/v1/photos/{victim}", headers=bearer(bob))
                assert_error(r, 403, "forbidden")
                r = await s.client.delete(f"/v1/photos/{victim}", headers=bearer(friend))
                assert r.status_code == 204, r.text
                deadline = time.monotonic() + 20
                while any(k in names for k in keys for names in files(s.roots)):
                    assert time.monotonic() < deadline, "files not removed"
                    await asyncio.sleep(0.05)
                while victim.encode() in await s.redis.zrange(f"ft:{bob['id']}", 0, -1):
                    assert time.monotonic() < deadline, "timeline row not removed"
                    await asyncio.sleep(0.05)
                after = (await s.client.get("/v1/feed", headers=bearer(bob))).json()
                assert [p["id"] for p in after["items"]] == newest_first[1:]
                assert_error(await s.client.get(f"/v1/photos/{victim}"), 404, "photo_not_found")

    asyncio.run(main())
