"""A backend that answers a streamed upload before it has read the whole body.

Backends do this for 413 (too large), 401/403 (refused before reading) and the like, and then
either close, or stop reading while keeping the connection. The edge must relay that answer to
the client (not a 502, not a hang), stop forwarding the body, never reuse that upstream
connection, and close the client connection gracefully: half-close after the answer and drop
what the client still sends (a lingering close), so the client can read the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, cast

import httptools
import pytest

from photostack.blocks.balancer import Backend
from photostack.blocks.proxy import ProxyConfig, ProxyServer
from tests.component.test_proxy_edge import RawClient

pytestmark = pytest.mark.component

MiB = 1024 * 1024
_DEADLINE_S = 20.0
_UPLOAD = 8 * MiB
_PIECE = 64 * 1024


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


async def until(check: Callable[[], bool], deadline_s: float = _DEADLINE_S) -> None:
    """Poll ``check`` under a deadline (state of another task, no event to await)."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.005)


def _response(status: int, reason: str, body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        status,
        reason.encode(),
        len(body),
    )
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


class EarlyProtocol(asyncio.Protocol):
    """Answers as soon as the request head is in, then behaves as ``server.mode`` says."""

    def __init__(self, server: EarlyServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.protocols.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(httptools.HttpParserError):
            self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        server, transport = self.server, self.transport
        assert transport is not None
        server.heads += 1
        mode = server.mode
        if mode == "close":  # 413 and close, with the rest of the body unread
            body = b'{"error":{"code":"too_large","message":"no thanks"}}'
            transport.write(_response(413, "Payload Too Large", body, b"Connection: close"))
            transport.close()
        elif mode == "stop-reading":  # 401, keep the connection, read nothing more
            transport.write(_response(401, "Unauthorized", b'{"error":"who are you"}'))
            transport.pause_reading()
        else:  # "duplex": a streamed 200 now, its end once the whole body is read
            transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.server.body_received += len(body)

    def on_message_complete(self) -> None:
        if self.server.mode == "duplex" and self.transport is not None:
            text = b'{"received":%d}' % self.server.body_received
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(text), text))


class EarlyServer:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.heads = 0
        self.body_received = 0
        self.protocols: list[EarlyProtocol] = []
        self._server: asyncio.Server | None = None

    async def start(self, stack: AsyncExitStack) -> Backend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: EarlyProtocol(self), "127.0.0.1", 0)
        stack.push_async_callback(self.aclose)
        return Backend("early", "127.0.0.1", int(self._server.sockets[0].getsockname()[1]))

    async def aclose(self) -> None:
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _edge(stack: AsyncExitStack, backend: Backend) -> ProxyServer:
    proxy = ProxyServer(ProxyConfig(backends=(backend,), listen_port=0))
    await proxy.start()
    stack.push_async_callback(proxy.aclose)
    return proxy


async def _upload(client: RawClient, total: int) -> int:
    """Send ``total`` body bytes as fast as the edge takes them; the bytes it managed to send."""
    sent = 0
    piece = b"u" * _PIECE
    with contextlib.suppress(ConnectionError):
        while sent < total:
            await client.send(piece)
            sent += len(piece)
    return sent


@pytest.mark.parametrize(
    ("mode", "status"), [("close", 413), ("stop-reading", 401)], ids=["close", "stop-reading"]
)
def test_an_early_answer_to_a_streamed_upload_reaches_the_client(mode: str, status: int) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server = EarlyServer(mode)
            proxy = await _edge(stack, await server.start(stack))
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(
                b"POST /v1/photos HTTP/1.1\r\nHost: edge\r\nContent-Length: %d\r\n\r\n" % _UPLOAD
            )
            uploading = asyncio.create_task(_upload(client, _UPLOAD))
            (response,) = await asyncio.wait_for(client.responses(1), _DEADLINE_S)
            assert response.status == status
            assert response.body  # the backend's own body, relayed
            if mode == "close":
                assert response.json()["error"]["code"] == "too_large"
            # Lingering close: the answer, then EOF; what the client still sends is dropped.
            assert await asyncio.wait_for(client.is_closed_by_server(), _DEADLINE_S)
            await asyncio.wait_for(uploading, _DEADLINE_S)
            assert server.heads == 1
            assert server.body_received < _UPLOAD
            # The upstream connection carried half a request: it is closed, never pooled. (A
            # backend that stopped reading notices the close once it reads again.)
            for proto in server.protocols:
                if proto.transport is not None and not proto.transport.is_closing():
                    proto.transport.resume_reading()
            await until(lambda: all(p.lost for p in server.protocols))
            assert proxy.upstream.conn_pool("early").open_connections == 0

    run(main())


def test_an_early_streamed_answer_lets_the_rest_of_the_body_flow() -> None:
    """A backend may answer while it reads (full duplex): the body keeps going to it."""
    total = 2 * MiB

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server = EarlyServer("duplex")
            proxy = await _edge(stack, await server.start(stack))
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(
                b"PUT /v1/blob HTTP/1.1\r\nHost: edge\r\nContent-Length: %d\r\n\r\n" % total
            )
            assert await asyncio.wait_for(_upload(client, total), _DEADLINE_S) == total
            (response,) = await asyncio.wait_for(client.responses(1), _DEADLINE_S)
            assert response.status == 200
            assert json.loads(response.body) == {"received": total}

    run(main())
