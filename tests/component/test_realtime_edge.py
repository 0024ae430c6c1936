"""Real-time transports through the edge proxy: SSE streams pass unbuffered, WebSocket upgrades
are tunnelled, long polls are not cut by the edge's response-head deadline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from photostack.blocks.balancer import Backend, ClientConfig
from photostack.blocks.proxy import ProxyConfig, ProxyServer
from photostack.cluster.engines.testing import RedisServer
from tests.component.test_realtime_service import (  # fixtures are used by name
    SseReader,
    bearer,
    follow,
    new_user,
    secret_path,  # noqa: F401
    stack,
    storage,  # noqa: F401
    ws_event,
)

pytestmark = pytest.mark.component


def test_sse_websocket_and_long_poll_through_the_edge(
    storage: Any,  # noqa: F811
    redis_server: RedisServer,
    secret_path: Path,  # noqa: F811
) -> None:
    async def main() -> None:
        async with stack(storage, redis_server, secret_path, webs=2) as st:
            backends = tuple(
                Backend(f"web-{i + 1}", "127.0.0.1", st.servers[i].port)  # type: ignore[attr-defined]
                for i in range(2)
            )
            # A short response-head deadline: a long poll must still get its answer.
            config = ProxyConfig(
                backends=backends, listen_port=0, upstream=ClientConfig(request_timeout_s=1.0)
            )
            edge = ProxyServer(config)
            await edge.start()
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{edge.port}", timeout=10.0
                ) as api:
                    alice, bob = await new_user(api), await new_user(api)
                    url = f"/v1/events/stream?access_token={bob['token']}"
                    async with api.stream("GET", url) as sse:
                        assert sse.status_code == 200
                        reader = SseReader(sse)
                        assert await reader.frame() == {"retry": "1000"}
                        started = time.monotonic()
                        await follow(api, alice, bob)
                        frame = await reader.event()  # arrives while the stream stays open
                        assert frame["id"] == "1"
                        assert time.monotonic() - started < 2.0

                    ws_url = f"ws://127.0.0.1:{edge.port}/v1/ws?access_token={bob['token']}"
                    async with connect(ws_url) as ws:
                        assert (await ws_event(ws))["seq"] == 1
                        r = await api.delete(
                            f"/v1/users/{alice['id']}/following/{bob['id']}", headers=bearer(alice)
                        )
                        assert r.status_code == 204
                        await follow(api, alice, bob)  # a new edge: a new event
                        assert (await ws_event(ws))["seq"] == 2
                        await ws.send(json.dumps({"op": "resume", "after": 0}))
                        assert [(await ws_event(ws))["seq"] for _ in range(2)] == [1, 2]

                    started = time.monotonic()
                    r = await api.get("/v1/events/wait?after=2&timeout_s=1.5", headers=bearer(bob))
                    assert r.status_code == 200
                    assert r.json() == {"events": [], "next": 2}
                    assert time.monotonic() - started >= 1.5
            finally:
                await edge.aclose()

    asyncio.run(main())
