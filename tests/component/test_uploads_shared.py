"""Shared media keys and failed photos, end to end: real Postgres, Redis, queue and worker
(tests/component/test_uploads.py's stack), and here two real media origins plus the CDN edge
in-process, so files are checked where users get them (docs/uploads.md "Shared files")."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from photostack.blocks.media import CdnConfig, CdnServer, Origin, OriginConfig, OriginServer
from photostack.blocks.queue import PostgresQueue, QueueConfig, TaskContext
from photostack.service import tasks
from photostack.service._uploads import DirMediaStore
from photostack.service.testing import ASGIAppClient
from tests.component.test_service_users_follows import Databases, assert_error, bearer, new_user
from tests.component.test_uploads import Stack, dbs, jpeg, stack, upload, wait_task

pytestmark = [pytest.mark.component, pytest.mark.timeout(180)]
__all__ = ["dbs"]  # the module-scoped databases fixture, shared with test_uploads


@contextlib.asynccontextmanager
async def media_hosts(tmp_path: Path) -> AsyncIterator[tuple[list[OriginServer], CdnServer]]:
    async with contextlib.AsyncExitStack() as exits:
        origins = []
        for i in (1, 2):
            server = OriginServer(OriginConfig(name=f"media-{i}", root=tmp_path / f"media-{i}"))
            await server.start()
            exits.push_async_callback(server.aclose)
            origins.append(server)
        addresses = tuple(Origin(o.config.name, "127.0.0.1", o.port) for o in origins)
        cdn = CdnServer(CdnConfig(origins=addresses, cache_bytes=1 << 22))
        await cdn.start()
        exits.push_async_callback(cdn.aclose)
        yield origins, cdn


def origins_config(origins: list[OriginServer], cdn: CdnServer) -> dict[str, Any]:
    return {
        "engine": "origins",
        "origins": [{"name": o.config.name, "host": "127.0.0.1", "port": o.port} for o in origins],
        "purge": {"host": "127.0.0.1", "port": cdn.purge_port},
        "base_url": f"http://127.0.0.1:{cdn.port}",
    }


async def cleanup_done(s: Stack, photo_id: str) -> dict[str, Any]:
    """The photo's cleanup task (found by its idempotency key), once it succeeded."""
    backend = PostgresQueue(s.queue_dsn, QueueConfig(s.queue_name))
    await backend.start()
    try:
        task_id = await backend.enqueue(
            "photo_cleanup", {"photo_id": photo_id}, idempotency_key=f"cleanup:{photo_id}"
        )
        deadline = time.monotonic() + 30
        while True:
            info = await backend.status(task_id)
            if info.state.value == "succeeded":
                assert isinstance(info.result, dict)
                return info.result
            assert info.state.value != "dead", info.last_error
            assert time.monotonic() < deadline, f"cleanup of {photo_id} never finished: {info}"
            await asyncio.sleep(0.05)
    finally:
        await backend.aclose()


async def statuses(http: httpx.AsyncClient, urls: list[str]) -> list[int]:
    return [(await http.get(u)).status_code for u in urls]


def origin_urls(origins: list[OriginServer], public_url: str) -> list[str]:
    key = public_url.rsplit("/", 1)[1]
    return [f"http://127.0.0.1:{o.port}/media/{key}" for o in origins]


def test_identical_uploads_share_files_until_the_last_reference_is_deleted(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with media_hosts(tmp_path) as (origins, cdn):
            config = origins_config(origins, cdn)
            async with (
                stack(
                    dbs, redis_server, tmp_path, media_config=config,
                    static_base_url=config["base_url"],
                ) as s,
                httpx.AsyncClient() as http,
            ):  # fmt: skip
                alice, bob = await new_user(s.client), await new_user(s.client)
                same = jpeg((300, 200))
                made = []
                async with s.worker():
                    for user in (alice, bob):  # the same bytes, two owners
                        r = await upload(s, user, same)
                        assert r.status_code == 202, r.text
                        await wait_task(s, user, r.json()["task"]["id"], "succeeded")
                        made.append(r.json()["photo"]["id"])
                    photos = [(await s.client.get(f"/v1/photos/{p}")).json() for p in made]
                    assert [p["status"] for p in photos] == ["ready", "ready"]
                    assert photos[0]["urls"] == photos[1]["urls"]  # one original, one thumbnail
                    urls = list(photos[1]["urls"].values())
                    assert await statuses(http, urls) == [200, 200]  # now cached on the CDN

                    r = await s.client.delete(f"/v1/photos/{made[0]}", headers=bearer(alice))
                    assert r.status_code == 204, r.text
                    result = await cleanup_done(s, made[0])
                    assert result["deleted_keys"] == 0
                    keys = sorted(u.rsplit("/", 1)[1] for u in urls)
                    assert sorted(result["shared_keys"]) == keys
                    # bob's photo still works: on both origins and through the static host
                    assert await statuses(http, urls) == [200, 200]
                    for url in urls:
                        assert await statuses(http, origin_urls(origins, url)) == [200, 200]
                    got = await http.get(urls[0])
                    assert got.content == same

                    r = await s.client.delete(f"/v1/photos/{made[1]}", headers=bearer(bob))
                    assert r.status_code == 204, r.text
                    result = await cleanup_done(s, made[1])
                    assert (result["deleted_keys"], result["shared_keys"]) == (2, [])
                    for url in urls:  # the last reference is gone: so are the files
                        assert await statuses(http, origin_urls(origins, url)) == [404, 404]
                    assert await statuses(http, urls) == [404, 404]  # purged from the CDN

    asyncio.run(main())


def test_a_failed_photo_shows_its_reason_and_deletes_cleanly(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with media_hosts(tmp_path) as (origins, cdn):
            config = origins_config(origins, cdn)
            async with (
                stack(
                    dbs, redis_server, tmp_path, media_config=config,
                    static_base_url=config["base_url"],
                ) as s,
                httpx.AsyncClient() as http,
            ):  # fmt: skip
                alice = await new_user(s.client)
                whole = jpeg((400, 400))
                async with s.worker():
                    broken = (await upload(s, alice, whole[: len(whole) // 3])).json()
                    await wait_task(s, alice, broken["task"]["id"], "dead")
                    photo_id = broken["photo"]["id"]
                    photo = (await s.client.get(f"/v1/photos/{photo_id}")).json()
                    assert photo["status"] == "failed"
                    assert photo["failure_reason"].startswith("the image could not be decoded")
                    assert photo["urls"]["thumbnail"] is None
                    listed = (await s.client.get(f"/v1/users/{alice['id']}/photos")).json()
                    assert listed["items"][0]["failure_reason"] == photo["failure_reason"]
                    original = photo["urls"]["original"]
                    assert await statuses(http, [original]) == [200]

                    r = await s.client.delete(f"/v1/photos/{photo_id}", headers=bearer(alice))
                    assert r.status_code == 204, r.text
                    result = await cleanup_done(s, photo_id)
                    assert result["deleted_keys"] == 1  # the original; a failed photo has no thumb
                    assert await statuses(http, origin_urls(origins, original)) == [404, 404]
                    assert await statuses(http, [original]) == [404]
                    assert_error(await s.client.get(f"/v1/photos/{photo_id}"), 404,
                                 "photo_not_found")  # fmt: skip
                    listed = (await s.client.get(f"/v1/users/{alice['id']}/photos")).json()
                    assert listed["items"] == []

    asyncio.run(main())


class RacingMedia(DirMediaStore):
    """Origins as directories; ``before_delete`` runs once just before the first delete, i.e.
    after the cleanup's reference check: the window a concurrent identical upload can hit."""

    before_delete: Any = None

    async def delete(self, key: str) -> None:
        hook, self.before_delete = self.before_delete, None
        if hook is not None:
            await hook()
        await super().delete(key)


def test_an_identical_upload_committed_during_cleanup_keeps_its_file(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path) as s:
            s.media = RacingMedia(list(s.roots), "http://static.test:9")
            alice, bob = await new_user(s.client), await new_user(s.client)
            same = jpeg((120, 90))
            first = (await upload(s, alice, same)).json()["photo"]  # no worker: processing
            key = first["urls"]["original"].rsplit("/", 1)[1]
            late: list[dict[str, Any]] = []

            async def identical_upload() -> None:
                r = await upload(s, bob, same)
                assert r.status_code == 202, r.text
                late.append(r.json()["photo"])

            s.media.before_delete = identical_upload
            r = await s.client.delete(f"/v1/photos/{first['id']}", headers=bearer(alice))
            assert r.status_code == 204, r.text
            async with s.worker():
                result = await cleanup_done(s, first["id"])
                assert result["restored_keys"] == [key]  # deleted, re-checked, rewritten
                assert [(root / key).read_bytes() for root in s.roots] == [same, same]
                await wait_task(s, bob, (await upload_task(s, late[0]["id"])), "succeeded")
            assert late[0]["urls"]["original"] == first["urls"]["original"]
            ready = (await s.client.get(f"/v1/photos/{late[0]['id']}")).json()
            assert ready["status"] == "ready"

    asyncio.run(main())


async def upload_task(s: Stack, photo_id: str) -> str:
    """The thumbnail task of a photo (its idempotency key is the photo id)."""
    backend = PostgresQueue(s.queue_dsn, QueueConfig(s.queue_name))
    await backend.start()
    try:
        return await backend.enqueue("thumbnail", {"photo_id": photo_id}, idempotency_key=photo_id)
    finally:
        await backend.aclose()


class FailingSecondDelete(DirMediaStore):
    """The second delete fails (an origin refuses): the cleanup is cut short mid-way."""

    deletes = 0

    async def delete(self, key: str) -> None:
        self.deletes += 1
        if self.deletes == 2:
            raise OSError("origin refused the delete (injected)")
        await super().delete(key)


def test_a_cleanup_cut_short_puts_back_what_it_deleted(
    dbs: tuple[Databases, str], redis_server: Any, tmp_path: Path
) -> None:
    async def main() -> None:
        async with stack(dbs, redis_server, tmp_path) as s:
            alice = await new_user(s.client)
            async with s.worker():
                made = (await upload(s, alice, jpeg((90, 60)))).json()
                await wait_task(s, alice, made["task"]["id"], "succeeded")
            photo = (await s.client.get(f"/v1/photos/{made['photo']['id']}")).json()
            keys = [u.rsplit("/", 1)[1] for u in photo["urls"].values()]
            # no worker runs now: the row goes, and the cleanup is run by hand, failing mid-way
            r = await s.client.delete(f"/v1/photos/{photo['id']}", headers=bearer(alice))
            assert r.status_code == 204, r.text
            media = FailingSecondDelete(list(s.roots), "http://static.test:9")
            client = ASGIAppClient(s.app, backend="app-1")
            tasks.configure(tasks.TaskDeps(app=client, media=media))
            try:
                payload = {"photo_id": photo["id"], "owner_id": alice["id"], "keys": keys}
                with pytest.raises(OSError, match="injected"):
                    await tasks.photo_cleanup(TaskContext("t", "photo_cleanup", payload, 1, False))
                assert media.deletes == 2  # the first key was deleted ...
                # ... and put back: nothing is left half-removed
                assert all((root / k).exists() for root in s.roots for k in keys)
                # the retry (the queue's next attempt) removes both
                done = await tasks.photo_cleanup(
                    TaskContext("t", "photo_cleanup", payload, 2, False)
                )
                assert isinstance(done, dict)
                assert done["deleted_keys"] == 2
                assert not any((root / k).exists() for root in s.roots for k in keys)
            finally:
                tasks.configure(None)
                await client.aclose()

    asyncio.run(main())
