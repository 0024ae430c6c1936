"""WebSocket upgrades pass through both edge engines (ours tunnels; nginx upgrades the hop)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from photostack.blocks.balancer import Backend
from photostack.cluster.engines.testing import free_port
from tests.component.test_proxy_features import run, start_edge

pytestmark = pytest.mark.component


async def _echo(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"echo:{text}")


class WebSocketBackend:
    """A real uvicorn server with one WebSocket route, shaped like the edge tests' backends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Backend:
        port = free_port()
        app = Starlette(routes=[WebSocketRoute("/ws", _echo)])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                raise RuntimeError("the WebSocket backend did not start")
            await asyncio.sleep(0.01)  # uvicorn exposes no started event to await
        return Backend(self.name, "127.0.0.1", port)

    async def aclose(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


@pytest.mark.parametrize("engine", ["photostack", "nginx"])
def test_a_websocket_round_trips_through_the_edge(engine: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            edge = await start_edge(stack, engine, [WebSocketBackend("web-1")], tmp_path)  # type: ignore[list-item]
            async with connect(f"ws://127.0.0.1:{edge.port}/ws", open_timeout=10) as ws:
                for word in ("one", "two"):
                    await ws.send(word)
                    assert await asyncio.wait_for(ws.recv(), 10) == f"echo:{word}"

    run(main())
