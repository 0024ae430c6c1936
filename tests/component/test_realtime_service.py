"""Real-time events end to end in one process: web nodes under uvicorn (real sockets) -> app node
-> real Postgres, with pub/sub on a real Redis. Every transport, resume, limits, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import uvicorn
import websockets
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from photostack.cluster.engines.testing import PostgresServer, RedisServer
from photostack.service import app as app_node
from photostack.service import web as web_node
from photostack.service.schema import apply_schema
from photostack.service.settings import AppSettings, Peer, ShardDsns, WebSettings
from photostack.service.testing import AppUnavailableError, ASGIAppClient, running

pytestmark = pytest.mark.component

SECRET = b"r" * 32
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def storage(pg_server: PostgresServer) -> dict[str, tuple[ShardDsns, ...]]:
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    out: dict[str, tuple[ShardDsns, ...]] = {}
    for group, count in {"users": 1, "social": 2, "photos": 1}.items():
        shards = []
        for index in range(count):
            name = f"{prefix}_{group}_{index}"
            pg_server.create_database(name)
            shards.append(ShardDsns(index, pg_server.dsn(name)))
        out[group] = tuple(shards)

    async def apply_all() -> None:
        for group, shards in out.items():
            for shard in shards:
                await apply_schema(group, shard.primary)

    asyncio.run(apply_all())
    return out


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


@contextlib.asynccontextmanager
async def serve(app: FastAPI, *, sndbuf: int | None = None) -> AsyncIterator[uvicorn.Server]:
    """``app`` under uvicorn on a free loopback port (``server.port``)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:  # accepted sockets inherit it: a small one fills fast
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", http="httptools", ws="websockets-sansio"
    )
    server = uvicorn.Server(config)
    server.port = sock.getsockname()[1]  # type: ignore[attr-defined]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    end = time.monotonic() + DEADLINE_S
    while not server.started:
        assert not task.done(), "uvicorn stopped while starting"
        assert time.monotonic() < end, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Stack:
    app: FastAPI
    webs: list[FastAPI]
    servers: list[uvicorn.Server]
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.servers[index].port}"  # type: ignore[attr-defined]

    def ws_url(self, index: int, token: str, **query: Any) -> str:
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        port = self.servers[index].port  # type: ignore[attr-defined]
        return f"ws://127.0.0.1:{port}/v1/ws?access_token={token}{extra}"


@contextlib.asynccontextmanager
async def stack(
    storage: dict[str, tuple[ShardDsns, ...]],
    redis_server: RedisServer,
    secret_path: Path,
    *,
    webs: int = 1,
    sndbuf: int | None = None,
    **web_settings: Any,
) -> AsyncIterator[Stack]:
    cache = (Peer("cache-1", redis_server.host, redis_server.port),)
    app = app_node.create_app(
        AppSettings(name="app-1", storage=storage, cache_nodes=cache, pool_max_size=4)
    )
    async with contextlib.AsyncExitStack() as exits:
        await exits.enter_async_context(running(app))
        apps, servers = [], []
        for index in range(webs):
            client = ASGIAppClient(app, backend="app-1")
            settings = WebSettings(
                name=f"web-{index + 1}",
                app_nodes=(),
                token_secret_path=secret_path,
                cache_nodes=cache,
                **web_settings,
            )
            web = web_node.create_app(
                settings,
                client,
                unavailable_errors=(AppUnavailableError,),
                on_shutdown=client.aclose,
            )
            apps.append(web)
            servers.append(await exits.enter_async_context(serve(web, sndbuf=sndbuf)))
        result = Stack(app, apps, servers)
        for index in range(webs):
            result.clients.append(
                await exits.enter_async_context(
                    httpx.AsyncClient(base_url=result.url(index), timeout=DEADLINE_S)
                )
            )
        yield result


async def new_user(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/v1/users", json={"username": f"u_{uuid.uuid4().hex[:12]}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def bearer(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


async def follow(client: httpx.AsyncClient, user: dict[str, Any], target: dict[str, Any]) -> None:
    r = await client.put(f"/v1/users/{user['id']}/following/{target['id']}", headers=bearer(user))
    assert r.status_code == 204, r.text


async def produce(st: Stack, user: dict[str, Any], count: int, pad: int = 0) -> None:
    """``count`` events for ``user`` through the app's producer endpoint."""
    transport = httpx.ASGITransport(app=st.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as app:
        for _ in range(count):
            body = {"type": "photo.ready", "data": {"pad": "x" * pad}}
            r = await app.post(f"/internal/v1/users/{user['id']}/events", json=body)
            assert r.status_code == 201, r.text


class SseReader:
    """Frames of one SSE response: dicts of field -> value (``comment`` for ': ...' lines)."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def frame(self) -> dict[str, str] | None:
        fields: dict[str, str] = {}
        async with asyncio.timeout(DEADLINE_S):
            async for line in self._lines:
                if line == "":
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                fields[name or "comment"] = value.removeprefix(" ")
        return fields or None

    async def event(self) -> dict[str, str]:
        while True:
            frame = await self.frame()
            assert frame is not None, "stream ended"
            if "data" in frame:
                return frame


async def ws_event(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE_S):
        return dict(json.loads(await ws.recv()))


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["seq"]) for e in events]


# -- each transport --------------------------------------------------------------------------


def test_each_transport_receives_an_event_caused_by_another_user(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, webs=2) as st:
            web1, web2 = st.clients
            alice, bob = await new_user(web1), await new_user(web1)
            assert (await web1.get("/v1/events", headers=bearer(bob))).json() == {
                "events": [],
                "next": 0,
            }
            async with contextlib.AsyncExitStack() as ex:
                sse = await ex.enter_async_context(
                    web2.stream("GET", f"/v1/events/stream?access_token={bob['token']}")
                )
                assert sse.status_code == 200
                assert sse.headers["content-type"] == "text/event-stream; charset=utf-8"
                reader = SseReader(sse)
                assert (await reader.frame()) == {"retry": "1000"}
                ws = await ex.enter_async_context(connect(st.ws_url(0, bob["token"])))
                wait = asyncio.create_task(
                    web1.get("/v1/events/wait?after=0&timeout_s=20", headers=bearer(bob))
                )
                await follow(web2, alice, bob)  # through another web node

                frame = await reader.event()
                event = json.loads(frame["data"])
                assert (frame["id"], frame["event"]) == ("1", "follower.new")
                assert set(event) == {"seq", "type", "data", "at"}
                assert event["data"]["follower"]["id"] == alice["id"]
                hub2 = st.webs[1].state.events.hub
                assert (hub2.pushed, hub2.woken) == (1, 0)  # written at once, no task woken
                metrics = (await web2.get("/metrics")).text
                assert 'photostack_web_event_deliveries_total{path="direct"} 1.0' in metrics
                assert (await ws_event(ws)) == event
                long_poll = await wait
                assert long_poll.status_code == 200
                assert long_poll.json() == {"events": [event], "next": 1}
                short = await web2.get("/v1/events?after=0", headers=bearer(bob))
                assert short.json() == {"events": [event], "next": 1}
                again = await web2.get("/v1/events?after=1", headers=bearer(bob))
                assert again.json() == {"events": [], "next": 1}

    asyncio.run(main())


def test_bad_input_and_auth_have_the_error_shape(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path) as st:
            web = st.clients[0]
            user = await new_user(web)
            cases = [
                ("/v1/events", {}, 401, "missing_token"),
                ("/v1/events?access_token=nope", {}, 401, "invalid_token"),
                ("/v1/events?after=abc", bearer(user), 422, "invalid_after"),
                ("/v1/events?after=-1", bearer(user), 422, "invalid_after"),
                ("/v1/events/wait?timeout_s=61", bearer(user), 422, "invalid_timeout_s"),
                (
                    "/v1/events/stream",
                    {**bearer(user), "Last-Event-ID": "x"},
                    422,
                    "invalid_last_event_id",
                ),
            ]
            for path, headers, status, code in cases:
                r = await web.get(path, headers=headers)
                assert r.status_code == status, (path, r.text)
                assert r.json()["error"]["code"] == code, path
            with pytest.raises(websockets.InvalidStatus) as info:
                async with connect(st.ws_url(0, "bad-token")):
                    pass
            assert info.value.response.status_code in (401, 403)

    asyncio.run(main())


# -- resume ----------------------------------------------------------------------------------


def test_sse_resume_with_last_event_id_on_another_node_has_no_gap_and_no_duplicate(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, webs=2) as st:
            web1, web2 = st.clients
            user = await new_user(web1)
            await produce(st, user, 2)
            url = f"/v1/events/stream?access_token={user['token']}"
            async with web1.stream("GET", url) as sse:
                reader = SseReader(sse)
                got = [json.loads((await reader.event())["data"]) for _ in range(2)]
            assert seqs(got) == [1, 2]
            await produce(st, user, 3)  # while disconnected
            headers = {"Last-Event-ID": "2"}
            async with web2.stream("GET", url + "&after=0", headers=headers) as sse:
                reader = SseReader(sse)
                got = [json.loads((await reader.event())["data"]) for _ in range(3)]
                assert seqs(got) == [3, 4, 5]
                await produce(st, user, 1)
                assert json.loads((await reader.event())["data"])["seq"] == 6
            r = await web2.get("/v1/events?after=0", headers=bearer(user))
            assert seqs(r.json()["events"]) == [1, 2, 3, 4, 5, 6]

    asyncio.run(main())


def test_websocket_resends_unacknowledged_events_on_resume(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, webs=2) as st:
            user = await new_user(st.clients[0])
            await produce(st, user, 3)
            async with connect(st.ws_url(0, user["token"])) as ws:
                assert seqs([await ws_event(ws) for _ in range(3)]) == [1, 2, 3]
                await ws.send(json.dumps({"op": "ack", "seq": 1}))
                await ws.send(json.dumps({"op": "resume"}))  # back to the last ack
                assert seqs([await ws_event(ws) for _ in range(2)]) == [2, 3]
                await ws.send(json.dumps({"op": "bogus"}))
                assert (await ws_event(ws))["op"] == "error"
            await produce(st, user, 2)
            async with connect(st.ws_url(1, user["token"], after=3)) as ws:  # other node
                assert seqs([await ws_event(ws) for _ in range(2)]) == [4, 5]
                await ws.send(json.dumps({"op": "resume", "after": 4}))
                assert (await ws_event(ws))["seq"] == 5

    asyncio.run(main())


# -- long polling ----------------------------------------------------------------------------


def test_long_poll_times_out_empty_and_wakes_within_tens_of_ms(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path) as st:
            web = st.clients[0]
            user = await new_user(web)
            started = time.monotonic()
            r = await web.get("/v1/events/wait?after=0&timeout_s=0.5", headers=bearer(user))
            elapsed = time.monotonic() - started
            assert r.status_code == 200
            assert r.json() == {"events": [], "next": 0}
            assert 0.5 <= elapsed < 2.0
            lags = []
            for seq in range(1, 6):
                wait = asyncio.create_task(
                    web.get(f"/v1/events/wait?after={seq - 1}&timeout_s=20", headers=bearer(user))
                )
                await asyncio.sleep(
                    0.2
                )  # let the poll park (not a synchronisation: either way passes)
                produced = time.monotonic()
                await produce(st, user, 1)
                body = (await wait).json()
                lags.append(time.monotonic() - produced)
                assert seqs(body["events"]) == [seq]
            lags.sort()
            assert lags[len(lags) // 2] < 0.1, lags

    asyncio.run(main())


# -- limits, slow consumers, drain -----------------------------------------------------------


def test_connection_limit_answers_503_with_retry_after(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, events_max_connections=2) as st:
            web = st.clients[0]
            user = await new_user(web)
            url = f"/v1/events/stream?access_token={user['token']}"
            async with web.stream("GET", url) as a, web.stream("GET", url) as b:
                assert (a.status_code, b.status_code) == (200, 200)
                r = await web.get(url)
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "events_unavailable"
            user2 = await new_user(web)  # freed: a new connection is accepted again
            async with web.stream("GET", f"/v1/events/stream?access_token={user2['token']}") as c:
                assert c.status_code == 200

    asyncio.run(main())


def test_a_slow_consumer_is_cut_off_with_a_resume_point(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(
            storage,
            redis_server,
            secret_path,
            sndbuf=4096,
            events_max_buffered=4,
            events_send_timeout_s=0.5,
        ) as st:
            user = await new_user(st.clients[0])
            port = st.servers[0].port  # type: ignore[attr-defined]
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", port))
            request = (
                f"GET /v1/events/stream?access_token={user['token']} HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            await loop.sock_sendall(sock, request.encode())
            hub = st.webs[0].state.events.hub
            end = time.monotonic() + DEADLINE_S
            while hub.connections == 0:
                assert time.monotonic() < end
                await asyncio.sleep(0.01)
            await produce(st, user, 60, pad=16 * 1024)  # ~1 MiB the client does not read
            while hub.connections:  # cut off, not growing
                assert time.monotonic() < end, "the slow consumer was not cut off"
                await asyncio.sleep(0.01)
            # The first events went straight to the socket; once flow control paused writing,
            # the rest were buffered and the stuck write hit its deadline.
            assert hub.pushed > 0
            assert hub.woken > 0
            raw = b""
            while True:  # now read what it was sent, up to the close frame
                async with asyncio.timeout(DEADLINE_S):
                    chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    break
                raw += chunk
                if raw.endswith(b"\r\n0\r\n\r\n"):
                    break
            sock.close()
        text = _http_body(raw).decode()
        ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
        close = json.loads(text.split("event: close\ndata: ", 1)[1].split("\n", 1)[0])
        assert close["reason"] == "slow_consumer"
        assert ids == list(range(1, len(ids) + 1))
        assert close["resume_after"] == (ids[-1] if ids else 0)
        assert close["resume_after"] < 60

    asyncio.run(main())


def test_drain_closes_streams_with_a_reconnect_hint(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path) as st:
            web = st.clients[0]
            user = await new_user(web)
            await produce(st, user, 1)
            url = f"/v1/events/stream?access_token={user['token']}"
            async with web.stream("GET", url) as sse, connect(st.ws_url(0, user["token"])) as ws:
                reader = SseReader(sse)
                assert (await reader.event())["id"] == "1"
                assert (await ws_event(ws))["seq"] == 1
                await st.webs[0].state.drain()
                close = await reader.frame()
                assert close is not None
                assert close["retry"] == "1000"
                assert close["event"] == "close"
                assert json.loads(close["data"]) == {"reason": "draining", "resume_after": 1}
                assert await reader.frame() is None  # the stream ended
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await ws_event(ws)
                assert info.value.rcvd is not None
                assert info.value.rcvd.code == 1012
            r = await web.get("/healthz")
            assert r.status_code == 503
            r = await web.get(url)
            assert r.status_code == 503

    asyncio.run(main())


def test_seq_survives_an_app_restart_and_follow_events_are_produced_once(
    storage: Any, redis_server: RedisServer, secret_path: Path
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path) as st:
            web = st.clients[0]
            alice, bob = await new_user(web), await new_user(web)
            await follow(web, alice, bob)
            await follow(web, alice, bob)  # idempotent: no second event
        async with stack(storage, redis_server, secret_path) as st:  # a new app and web node
            web = st.clients[0]
            await produce(st, bob, 1)
            r = await web.get("/v1/events?after=0", headers=bearer(bob))
            events = r.json()["events"]
            assert [(e["seq"], e["type"]) for e in events] == [
                (1, "follower.new"),
                (2, "photo.ready"),
            ]

    asyncio.run(main())


def _http_body(raw: bytes) -> bytes:
    """The body of one raw HTTP/1.1 response (chunked or not), parsed by h11."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += bytes(event.data)
        elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.EndOfMessage):
            return body
