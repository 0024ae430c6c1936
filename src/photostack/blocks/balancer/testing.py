"""Test doubles for the balancer's seams.

``ManualClock`` drives the pure policy; ``FakeBackend`` is a scriptable HTTP/1.1 server on a real
socket (raw asyncio + httptools) for component tests of the smart client and the edge proxy:
it records what it received and can answer, stream, stall, reset or speak garbage on demand.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from photostack.blocks.balancer._health import Backend

__all__ = [
    "FakeAction",
    "FakeBackend",
    "FakeReply",
    "ManualClock",
    "RecordedRequest",
    "closed_port",
]


class ManualClock:
    """A clock that moves only when told to; pass it where a ``Clock`` is expected."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now_s += seconds


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection_id: int

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


class FakeAction(enum.Enum):
    REPLY = "reply"
    RESET = "reset"  # drop the connection after reading the request, answer nothing
    GARBAGE = "garbage"  # answer bytes that are not HTTP
    CLOSE_AFTER = "close_after"  # answer, then close without saying so (a stale keep-alive)
    CUT_AFTER_HEAD = "cut_after_head"  # the head and half the body, then drop (killed mid-answer)


@dataclass(frozen=True)
class FakeReply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # When set, the body is sent chunked, one chunk per item, as the iterator yields.
    stream: Callable[[], AsyncIterator[bytes]] | None = None
    action: FakeAction = FakeAction.REPLY


Handler = Callable[["FakeBackend", RecordedRequest], Awaitable[FakeReply]]


async def echo_handler(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
    """Default: 200 JSON naming the backend, echoing the request id."""
    body = json.dumps({"backend": backend.name, "target": request.target}).encode()
    headers = [("Content-Type", "application/json"), ("X-Backend", backend.name)]
    request_id = request.header("x-request-id")
    if request_id is not None:
        headers.append(("X-Request-Id", request_id))
    return FakeReply(200, tuple(headers), body)


@dataclass
class _Counters:
    connections: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)


class _FakeProtocol(asyncio.Protocol):
    def __init__(self, owner: FakeBackend, connection_id: int) -> None:
        self._owner = owner
        self._id = connection_id
        self._parser = httptools.HttpRequestParser(self)
        self._queue: asyncio.Queue[RecordedRequest] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self._owner._protocols.add(self)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._protocols.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._owner.body_bytes_received += len(body)

    def on_message_complete(self) -> None:
        request = RecordedRequest(
            self._parser.get_method().decode(),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body),
            self._id,
        )
        self._owner.requests.append(request)
        self._queue.put_nowait(request)

    async def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while True:
            request = await self._queue.get()
            reply = await self._owner.handler(self._owner, request)
            if reply.action is FakeAction.RESET:
                transport.abort()
                return
            if reply.action is FakeAction.GARBAGE:
                transport.write(b"this is not http\r\n\r\n")
                transport.close()
                return
            lines = [f"HTTP/1.1 {reply.status} X\r\n"]
            lines.extend(f"{k}: {v}\r\n" for k, v in reply.headers)
            if reply.stream is not None:
                lines.append("Transfer-Encoding: chunked\r\n\r\n")
                transport.write("".join(lines).encode("latin-1"))
                async for chunk in reply.stream():
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                transport.write(b"0\r\n\r\n")
            elif reply.action is FakeAction.CUT_AFTER_HEAD:
                lines.append(f"Content-Length: {len(reply.body)}\r\n\r\n")
                half = reply.body[: len(reply.body) // 2]
                transport.write("".join(lines).encode("latin-1") + half)
                transport.abort()
                return
            else:
                lines.append(f"Content-Length: {len(reply.body)}\r\n\r\n")
                transport.write("".join(lines).encode("latin-1") + reply.body)
            if reply.action is FakeAction.CLOSE_AFTER:
                transport.close()
                return


class FakeBackend:
    """A scriptable HTTP/1.1 backend on 127.0.0.1 and a free port."""

    def __init__(self, name: str, handler: Handler = echo_handler) -> None:
        self.name = name
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.connections_accepted = 0
        # Request body bytes parsed so far, over all requests (grows while a body streams in).
        self.body_bytes_received = 0
        self._protocols: set[_FakeProtocol] = set()
        self._server: asyncio.Server | None = None
        self._port = 0

    @property
    def backend(self) -> Backend:
        return Backend(self.name, "127.0.0.1", self._port)

    async def start(self) -> Backend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, "127.0.0.1", self._port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self.backend

    def _make_protocol(self) -> _FakeProtocol:
        self.connections_accepted += 1
        return _FakeProtocol(self, self.connections_accepted)

    async def kill(self) -> None:
        """Crash: stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        protocols = list(self._protocols)
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.abort()
        await asyncio.gather(*(proto.closed for proto in protocols))

    async def aclose(self) -> None:
        await self.kill()


def closed_port() -> int:
    """A local port with nothing listening (bound then released), for refused connects."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
