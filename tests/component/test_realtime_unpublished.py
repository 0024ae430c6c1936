"""An acknowledged event whose hot-copy push failed is still delivered within a short bound.

The app commits event N to the user's log, then its Lua push to the user's Redis node fails
(injected as the ``ConnectionError`` redis-py raises on a reset link). Short polls must see N at
once; long polls, SSE and WebSocket must receive it within ``BOUND_S``, none twice; and another
app node (which knows nothing of the failure) must not answer from the stale hot list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from websockets.asyncio.client import connect

from photostack.cluster.engines.testing import RedisServer
from photostack.service import app as app_node
from photostack.service._events import EventStore
from photostack.service.settings import AppSettings, Peer, ShardDsns
from photostack.service.testing import running

from .test_realtime_service import (
    SseReader,
    bearer,
    new_user,
    produce,
    secret_path,
    seqs,
    stack,
    storage,
    ws_event,
)

pytestmark = pytest.mark.component

__all__ = ["secret_path", "storage"]  # fixtures, re-exported for pytest

BOUND_S = 3.0  # far below the web nodes' 30 s periodic resync: that must not be what saves us


class FailingPushes:
    """Wraps a HotEvents push script: the next ``failures`` calls raise like a reset link."""

    def __init__(self, events: EventStore, failures: int) -> None:
        assert events.hot is not None
        self.hot = events.hot
        self.real = events.hot._script
        self.failures = failures
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RedisConnectionError("Connection reset by peer (injected)")
        return await self.real(*args, **kwargs)

    def install(self) -> FailingPushes:
        self.hot._script = self  # type: ignore[assignment]
        return self


def store_of(app: Any) -> EventStore:
    events: EventStore = app.state.node.events
    return events


async def hot_seqs(redis_server: RedisServer, user_id: str) -> list[int]:
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        raw = await client.lrange(f"ev:{user_id}", 0, -1)
    finally:
        await client.aclose()
    return [int(json.loads(item)["seq"]) for item in raw]


def test_a_failed_push_is_seen_by_every_transport_within_the_bound_and_once(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, webs=2) as st:
            web1, web2 = st.clients
            user = await new_user(web1)
            await produce(st, user, 1)  # seq 1, published normally (hot list = [1])
            url = f"/v1/events/stream?access_token={user['token']}&after=1"
            async with contextlib.AsyncExitStack() as ex:
                sse = SseReader(await ex.enter_async_context(web2.stream("GET", url)))
                assert (await sse.frame()) == {"retry": "1000"}
                ws = await ex.enter_async_context(connect(st.ws_url(0, user["token"], after=1)))
                # A long poll parked on the other web node before the event exists.
                wait = asyncio.create_task(
                    web2.get("/v1/events/wait?after=1&timeout_s=20", headers=bearer(user))
                )
                await asyncio.sleep(0.2)  # let it park (either way the assertions hold)

                failing = FailingPushes(store_of(st.app), failures=3).install()
                produced = time.monotonic()
                await produce(st, user, 1)  # seq 2: committed (201), its push fails 3 times
                assert failing.calls >= 1
                # Short polling sees it at once, from both web nodes, before any repair.
                for client in (web1, web2):
                    r = await client.get("/v1/events?after=1", headers=bearer(user))
                    assert seqs(r.json()["events"]) == [2], r.text

                sse_event = json.loads((await sse.event())["data"])
                ws_got = await ws_event(ws)
                long_poll = (await wait).json()
                assert time.monotonic() - produced < BOUND_S
                assert sse_event["seq"] == ws_got["seq"] == 2
                assert seqs(long_poll["events"]) == [2]
                assert failing.failures == 0  # the background retry got through
                assert await hot_seqs(redis_server, user["id"]) == [1, 2]

                await produce(st, user, 1)  # seq 3, normal: the very next frame (no duplicate 2)
                assert json.loads((await sse.event())["data"])["seq"] == 3
                assert (await ws_event(ws))["seq"] == 3
                r = await web1.get("/v1/events?after=0", headers=bearer(user))
                assert seqs(r.json()["events"]) == [1, 2, 3]

    asyncio.run(main())


@contextlib.asynccontextmanager
async def two_app_nodes(
    storage: dict[str, tuple[ShardDsns, ...]], redis_server: RedisServer
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, EventStore, EventStore]]:
    cache = (Peer("cache-1", redis_server.host, redis_server.port),)
    apps = [
        app_node.create_app(
            AppSettings(name=f"app-{i}", storage=storage, cache_nodes=cache, pool_max_size=2)
        )
        for i in (1, 2)
    ]
    async with contextlib.AsyncExitStack() as ex:
        clients = []
        for app in apps:
            await ex.enter_async_context(running(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await ex.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://app")
                )
            )
        yield clients[0], clients[1], store_of(apps[0]), store_of(apps[1])


async def post_event(app: httpx.AsyncClient, user_id: str) -> int:
    r = await app.post(f"/internal/v1/users/{user_id}/events", json={"type": "photo.ready"})
    assert r.status_code == 201, r.text
    return int(r.json()["seq"])


async def read_after(app: httpx.AsyncClient, user_id: str, after: int) -> list[int]:
    r = await app.get(f"/internal/v1/users/{user_id}/events?after={after}")
    assert r.status_code == 200, r.text
    return seqs(r.json()["events"])


def test_another_app_node_never_answers_from_a_hot_list_missing_an_acknowledged_event(
    storage: Any, redis_server: RedisServer
) -> None:
    """app-1 commits seq 2 and never manages to push it (as if it died right after the commit);
    app-2 must read it from the log at once, then repair the hot copy and publish it."""

    async def main() -> None:
        async with two_app_nodes(storage, redis_server) as (app1, app2, _, store2):
            user_id = f"u{uuid.uuid4().hex[:16]}"
            assert await post_event(app1, user_id) == 1
            assert await read_after(app2, user_id, 0) == [1]
            assert store2.hot is not None
            store2.hot.repair_after_s = 0.5
            listener = aioredis.Redis(host=redis_server.host, port=redis_server.port)
            pubsub = listener.pubsub()
            await pubsub.subscribe(f"rt:{user_id}")
            try:
                failing = FailingPushes(store_of_app1(app1), failures=10**6).install()
                assert await post_event(app1, user_id) == 2
                assert failing.calls >= 1
                assert await hot_seqs(redis_server, user_id) == [1]  # the stale hot copy
                assert await read_after(app2, user_id, 1) == [2]  # ...is not used
                # Once the marker is old enough, a read on app-2 repairs the list and publishes.
                deadline = time.monotonic() + BOUND_S
                while await hot_seqs(redis_server, user_id) != [1, 2]:
                    assert time.monotonic() < deadline, "the hot list was not repaired"
                    assert await read_after(app2, user_id, 1) == [2]
                    await asyncio.sleep(0.05)
                published = []
                async with asyncio.timeout(BOUND_S):
                    while not published:
                        message = await pubsub.get_message(timeout=0.2)
                        if message and message["type"] == "message":
                            published.append(json.loads(message["data"])["seq"])
                assert published == [2]
                assert await read_after(app2, user_id, 1) == [2]  # now from the hot list
                assert await read_after(app2, user_id, 0) == [1, 2]
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await listener.aclose()

    asyncio.run(main())


def store_of_app1(client: httpx.AsyncClient) -> EventStore:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return store_of(transport.app)
