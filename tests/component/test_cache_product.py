"""Cached reads in the product: two app nodes over real Postgres and two redis-servers (the ring
and the invalidation bus), one web node alternating between them.

A follow through one app node shows in the next read through the other (its local cache was
invalidated over pub/sub), reads carry ``X-Cache: hit|miss`` through the web node, and the app
nodes count lookups per tier in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import RedisServer, start_redis
from photostack.service import app as app_node
from photostack.service import web as web_node
from photostack.service._appclient import AppResponse
from photostack.service.settings import AppSettings, Peer, WebSettings
from photostack.service.testing import AppUnavailableError, ASGIAppClient, running
from tests.component.test_service_users_follows import (
    Databases,
    bearer,
    dbs,  # noqa: F401 - the module-scoped databases fixture
    new_user,
    secret_path,  # noqa: F401 - the token secret fixture
)
from tests.conftest import engine_missing

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    started: list[RedisServer] = []
    try:
        for i in (1, 2):
            root = tmp_path_factory.mktemp(f"cache{i}")
            started.append(start_redis(root, name=f"cache-product-{i}"))
    except EngineError as exc:
        engine_missing(str(exc))
    yield started
    for server in started:
        server.stop()


class Alternate:
    """An app client that alternates between app nodes (what round-robin balancing does)."""

    def __init__(self, clients: Sequence[ASGIAppClient]) -> None:
        self.clients = list(clients)
        self.turn = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> AppResponse:
        client = self.clients[self.turn % len(self.clients)]
        self.turn += 1
        return await client.request(method, path, headers=headers, body=body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def make_app(databases: Databases, caches: list[RedisServer], name: str) -> FastAPI:
    peers = tuple(Peer(f"cache-{i}", c.host, c.port) for i, c in enumerate(caches, 1))
    return app_node.create_app(
        AppSettings(name=name, storage=databases.storage, cache_nodes=peers, pool_max_size=4)
    )


@contextlib.asynccontextmanager
async def two_app_stack(
    databases: Databases, caches: list[RedisServer], secret: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, list[httpx.AsyncClient], Alternate]]:
    apps = [make_app(databases, caches, f"app-{i}") for i in (1, 2)]
    clients = [ASGIAppClient(a, backend=f"app-{i}") for i, a in enumerate(apps, 1)]
    alternate = Alternate(clients)
    web = web_node.create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret),
        alternate,
        unavailable_errors=(AppUnavailableError,),
        on_shutdown=alternate.aclose,
    )
    async with running(apps[0]), running(apps[1]), running(web):
        direct = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://app")
            for a in apps
        ]
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            try:
                yield client, direct, alternate
            finally:
                for d in direct:
                    await d.aclose()


def _counts(body: dict[str, Any]) -> tuple[int, int]:
    return body["followers_count"], body["following_count"]


def test_a_follow_on_one_app_node_shows_on_the_other(
    dbs: Databases,  # noqa: F811
    caches: list[RedisServer],
    secret_path: Path,  # noqa: F811
) -> None:
    async def main() -> None:
        async with two_app_stack(dbs, caches, secret_path) as (web, (app1, app2), _):
            alice, bob = await new_user(web), await new_user(web)
            for app in (app1, app2, app1, app2):  # both app nodes hold bob locally now
                r = await app.get(f"/internal/v1/users/{bob['id']}")
                assert _counts(r.json()) == (0, 0)
            r = await app2.get(f"/internal/v1/users/{bob['id']}")
            assert r.headers["x-cache"] == "hit"
            first = await app2.get(f"/internal/v1/users/{bob['id']}/followers")
            assert first.json()["items"] == []

            r = await app1.put(f"/internal/v1/users/{alice['id']}/following/{bob['id']}")
            assert r.status_code == 204
            r = await app2.get(f"/internal/v1/users/{bob['id']}")  # the other node: no stale
            assert _counts(r.json()) == (1, 0)
            r = await app2.get(f"/internal/v1/users/{alice['id']}")
            assert _counts(r.json()) == (0, 1)
            r = await app2.get(f"/internal/v1/users/{bob['id']}/followers")
            assert [u["id"] for u in r.json()["items"]] == [alice["id"]]
            r = await app2.get(f"/internal/v1/users/{alice['id']}/following")
            assert [u["id"] for u in r.json()["items"]] == [bob["id"]]

            r = await app2.delete(f"/internal/v1/users/{alice['id']}/following/{bob['id']}")
            assert r.status_code == 204
            for app in (app1, app2):
                r = await app.get(f"/internal/v1/users/{bob['id']}")
                assert _counts(r.json()) == (0, 0)
                r = await app.get(f"/internal/v1/users/{bob['id']}/followers")
                assert r.json()["items"] == []

    asyncio.run(main())


def test_x_cache_through_the_web_node_and_metrics(
    dbs: Databases,  # noqa: F811
    caches: list[RedisServer],
    secret_path: Path,  # noqa: F811
) -> None:
    async def main() -> None:
        async with two_app_stack(dbs, caches, secret_path) as (web, (app1, _), _):
            carol, dave = await new_user(web), await new_user(web)
            seen = []
            for _ in range(4):
                r = await web.get(f"/v1/users/{carol['id']}")
                assert r.status_code == 200
                seen.append(r.headers["x-cache"])
            # the first read loads from the database; the second (other app node) finds it in
            # the global cache; later reads hit the local caches
            assert seen == ["miss", "hit", "hit", "hit"]
            r = await web.get(f"/v1/users/by-username/{carol['username']}")
            assert r.headers["x-cache"] in {"hit", "miss"}
            r = await web.put(
                f"/v1/users/{dave['id']}/following/{carol['id']}", headers=bearer(dave)
            )
            assert r.status_code == 204
            assert "x-cache" not in r.headers
            r = await web.get(f"/v1/users/{carol['id']}")
            assert (r.headers["x-cache"], r.json()["followers_count"]) == ("miss", 1)
            r = await web.get(f"/v1/users/{carol['id']}/followers?limit=5")
            assert "x-cache" not in r.headers  # not the cached page size: read directly
            r = await web.get("/v1/users/0000000000000000")
            assert r.status_code == 404
            text = (await app1.get("/metrics")).text
            assert 'photostack_cache_requests_total{policy="lru",result="hit",tier="local"' in text
            assert 'tier="global",type="user"' in text

    asyncio.run(main())


def test_reads_survive_every_cache_node_down(
    dbs: Databases,  # noqa: F811
    secret_path: Path,  # noqa: F811
) -> None:
    """Cache nodes that do not answer (nothing listens on their ports): reads and writes go
    to the database, with no error."""
    from photostack.cluster.engines.testing import free_port

    class Nowhere:
        host = "127.0.0.1"
        port = free_port()

    async def main() -> None:
        gone: list[Any] = [Nowhere()]
        async with two_app_stack(dbs, gone, secret_path) as (web, _, _):
            erin = await new_user(web)
            for _ in range(3):
                r = await web.get(f"/v1/users/{erin['id']}")
                assert r.status_code == 200

    asyncio.run(main())
