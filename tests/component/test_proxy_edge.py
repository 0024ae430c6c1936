"""The edge proxy with real sockets: FakeBackend upstreams, the proxy in-process, raw clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx
import pytest

from photostack.blocks.balancer import Backend, ClientConfig
from photostack.blocks.balancer.testing import (
    FakeAction,
    FakeBackend,
    FakeReply,
    RecordedRequest,
    closed_port,
    echo_handler,
)
from photostack.blocks.proxy import ProxyConfig, ProxyServer, serve_proxy

pytestmark = pytest.mark.component


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """Sends exact bytes and parses what comes back, one response at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._done: list[Response] = []
        self._current = Response()
        self._body_parts: list[bytes] = []
        self.chunk_arrived = asyncio.Event()
        self._parser = httptools.HttpResponseParser(self)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body_parts.append(body)
        self.chunk_arrived.set()

    def on_message_complete(self) -> None:
        self._current.body = b"".join(self._body_parts)
        self._done.append(self._current)
        self._current, self._body_parts = Response(), []

    @property
    def body_so_far(self) -> bytes:
        return b"".join(self._body_parts)

    async def feed_once(self) -> bool:
        data = await self.reader.read(65536)
        if data:
            self._parser.feed_data(data)
        return bool(data)

    async def responses(self, count: int) -> list[Response]:
        while len(self._done) < count:
            if not await self.feed_once():
                raise ConnectionError("closed before the response")
        done, self._done = self._done[:count], self._done[count:]
        return done

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def is_closed_by_server(self) -> bool:
        return await self.reader.read(1) == b""

    async def aclose(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@dataclass
class Edge:
    proxy: ProxyServer
    fakes: list[FakeBackend]
    stack: AsyncExitStack

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    async def raw(self) -> RawClient:
        client = await RawClient.connect(self.proxy.port)
        self.stack.push_async_callback(client.aclose)
        return client

    async def http(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.url)
        self.stack.push_async_callback(client.aclose)
        return client


async def edge(
    stack: AsyncExitStack,
    fakes: Sequence[FakeBackend],
    *,
    extra: Sequence[Backend] = (),
    **config: Any,
) -> Edge:
    backends = list(extra)
    for fake in fakes:
        backends.append(await fake.start())
        stack.push_async_callback(fake.aclose)
    proxy = ProxyServer(ProxyConfig(backends=tuple(backends), listen_port=0, **config))
    await proxy.start()
    stack.push_async_callback(proxy.aclose)
    return Edge(proxy, list(fakes), stack)


def reset_on(method: str) -> Any:
    async def handler(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        if request.method == method:
            return FakeReply(action=FakeAction.RESET)
        return await echo_handler(backend, request)

    return handler


def test_round_robin_and_keep_alive_reuse() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1"), FakeBackend("web-2")])
            http = await e.http()
            served = [(await http.get(f"/v1/x/{i}?q=1")).headers["x-backend"] for i in range(10)]
            assert sorted(set(served)) == ["web-1", "web-2"]
            assert served.count("web-1") == 5
            assert [f.connections_accepted for f in e.fakes] == [1, 1]
            assert e.fakes[0].requests[0].target == "/v1/x/0?q=1"

    run(main())


def test_killed_backend_causes_no_failed_get() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1"), FakeBackend("web-2")])
            http = await e.http()
            for _ in range(4):
                assert (await http.get("/warm")).status_code == 200
            await e.fakes[0].kill()
            responses = [await http.get(f"/after/{i}") for i in range(10)]
            assert [r.status_code for r in responses] == [200] * 10
            assert {r.headers["x-backend"] for r in responses} == {"web-2"}
            metrics = (await http.get("/metrics")).text
            assert 'photostack_edge_backend_state{backend="web-1",state="down"} 1.0' in metrics
            assert 'photostack_edge_backend_markdowns_total{backend="web-1"} 1.0' in metrics
            assert "photostack_edge_upstream_retries_total" in metrics

    run(main())


def test_post_with_refused_connect_is_retried() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            dead = Backend("web-1", "127.0.0.1", closed_port())
            e = await edge(stack, [FakeBackend("web-2")], extra=[dead])
            http = await e.http()
            for i in range(3):
                response = await http.post("/v1/users", content=f"{i}".encode())
                assert response.status_code == 200
            assert [r.body for r in e.fakes[0].requests] == [b"0", b"1", b"2"]
            metrics = (await http.get("/metrics")).text
            assert 'photostack_edge_upstream_retries_total{reason="connect"} 1.0' in metrics

    run(main())


def test_post_reset_after_send_is_not_retried() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", reset_on("POST")), FakeBackend("web-2")])
            http = await e.http()
            response = await http.post("/v1/photos", content=b"payload")
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "bad_gateway"
            assert e.fakes[1].requests == []
            # The same failure on a GET is retried on the other backend.
            e.fakes[0].handler = reset_on("GET")
            e.fakes[0].requests.clear()
            responses = [await http.get("/v1/feed") for _ in range(2)]
            assert [r.status_code for r in responses] == [200, 200]

    run(main())


def test_garbage_from_backend_is_502() -> None:
    async def garbage(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(action=FakeAction.GARBAGE)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", garbage)])
            response = await (await e.http()).get("/")
            assert response.status_code == 502
            assert response.headers["x-request-id"]

    run(main())


def test_timeout_is_504() -> None:
    never = asyncio.Event()

    async def stall(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        await never.wait()
        return FakeReply()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(
                stack,
                [FakeBackend("web-1", stall)],
                upstream=ClientConfig(request_timeout_s=0.2),
            )
            response = await (await e.http()).post("/slow", content=b"x")
            assert response.status_code == 504
            assert response.json() == {
                "error": {"code": "upstream_timeout", "message": "backend timed out"}
            }

    run(main())


def test_all_backends_down_is_503_with_retry_after() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            dead = [Backend(f"web-{i}", "127.0.0.1", closed_port()) for i in range(2)]
            e = await edge(stack, [], extra=dead)
            http = await e.http()
            for _ in range(2):
                response = await http.get("/")
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "no_backend"

    run(main())


def test_limits_and_malformed_requests() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(
                stack, [FakeBackend("web-1")], max_header_bytes=1024, max_body_bytes=100
            )
            client = await e.raw()
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.status == 431
            assert response.json()["error"]["code"] == "headers_too_large"
            assert await client.is_closed_by_server()

            client = await e.raw()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.status == 413
            assert response.header("connection") == "close"

            client = await e.raw()
            chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            await client.send(chunked + b"65\r\n" + b"z" * 101 + b"\r\n0\r\n\r\n")
            assert (await client.responses(1))[0].status == 413

            client = await e.raw()
            await client.send(b"GARBAGE\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.status == 400
            assert response.json()["error"]["code"] == "malformed_request"
            assert e.fakes[0].requests == []

    run(main())


def test_hop_by_hop_headers_removed_both_ways_and_forwarded_added() -> None:
    async def hoppy(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        headers = (
            ("Connection", "keep-alive, X-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("X-Hop", "secret"),
            ("X-End", "kept"),
        )
        return FakeReply(200, headers, b"ok")

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", hoppy)])
            client = await e.raw()
            await client.send(
                b"GET /p?a=1 HTTP/1.1\r\nHost: example\r\nConnection: keep-alive, X-Secret\r\n"
                b"X-Secret: 1\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\n"
                b"Proxy-Authorization: Basic eA==\r\nUpgrade-Insecure-Requests: 1\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n\r\n"
            )
            (response,) = await client.responses(1)
            assert response.status == 200
            assert response.body == b"ok"
            names = {k.lower() for k, _ in response.headers}
            assert "keep-alive" not in names
            assert "x-hop" not in names
            assert response.header("x-end") == "kept"
            seen = e.fakes[0].requests[0]
            seen_names = {k.lower() for k, _ in seen.headers}
            assert seen_names.isdisjoint(
                {"connection", "x-secret", "keep-alive", "te", "proxy-authorization"}
            )
            assert seen.header("host") == "example"
            assert seen.header("upgrade-insecure-requests") == "1"
            assert seen.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
            assert seen.header("x-forwarded-proto") == "http"
            assert seen.target == "/p?a=1"

    run(main())


def test_request_id_is_propagated_or_created() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1")])
            http = await e.http()
            response = await http.get("/", headers={"X-Request-Id": "abc-123"})
            assert response.headers["x-request-id"] == "abc-123"
            assert e.fakes[0].requests[-1].header("x-request-id") == "abc-123"
            response = await http.get("/")
            created = response.headers["x-request-id"]
            assert len(created) == 32
            int(created, 16)
            assert e.fakes[0].requests[-1].header("x-request-id") == created

    run(main())


def test_chunked_response_streams_incrementally() -> None:
    second_may_go = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"event: ping\ndata: 1\n\n"
        await second_may_go.wait()
        yield b"event: ping\ndata: 2\n\n"

    async def sse(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(200, (("Content-Type", "text/event-stream"),), stream=chunks)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", sse)])
            client = await e.raw()
            await client.send(b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            while not client.chunk_arrived.is_set():
                assert await client.feed_once()
            assert client.body_so_far == b"event: ping\ndata: 1\n\n"
            second_may_go.set()
            (response,) = await client.responses(1)
            assert response.header("transfer-encoding") == "chunked"
            assert response.body == b"event: ping\ndata: 1\n\nevent: ping\ndata: 2\n\n"
            # The connection stays usable after a streamed response.
            await client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.responses(1))[0].status == 200

    run(main())


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1"), FakeBackend("web-2")])
            client = await e.raw()
            await client.send(
                b"".join(f"GET /n/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
            )
            responses = await client.responses(5)
            assert [r.json()["target"] for r in responses] == [f"/n/{i}" for i in range(5)]

    run(main())


def test_chunked_request_body_is_forwarded_with_content_length() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1")])
            client = await e.raw()
            await client.send(
                b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            assert (await client.responses(1))[0].status == 200
            seen = e.fakes[0].requests[0]
            assert seen.body == b"abcde"
            assert seen.header("content-length") == "5"
            assert seen.header("transfer-encoding") is None

    run(main())


def test_head_and_http_1_0() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1")])
            http = await e.http()
            head = await http.head("/h")
            assert head.status_code == 200
            assert head.content == b""
            assert int(head.headers["content-length"]) > 0
            assert (await http.get("/h")).status_code == 200  # connection still in step
            assert e.fakes[0].connections_accepted == 1

            client = await e.raw()
            await client.send(b"GET /h HTTP/1.0\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.json()["target"] == "/h"
            assert response.header("connection") == "close"
            assert await client.is_closed_by_server()

    run(main())


def test_health_and_metrics_are_local() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1")])
            http = await e.http()
            response = await http.get("/healthz")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
            await http.get("/v1/x")
            metrics = (await http.get("/metrics")).text
            assert 'photostack_edge_requests_total{status_class="2xx"} 2.0' in metrics
            assert [r.target for r in e.fakes[0].requests] == ["/v1/x"]

    run(main())


def test_serve_proxy_runs_until_stopped() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            backend = await fake.start()
            stack.push_async_callback(fake.aclose)
            port = closed_port()
            config = ProxyConfig(backends=(backend,), listen_port=port)
            ready, stop = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(serve_proxy(config, ready=ready, stop=stop))
            await ready.wait()
            async with httpx.AsyncClient() as http:
                response = await http.get(f"http://127.0.0.1:{port}/hello")
                assert response.status_code == 200
            stop.set()
            await task
            # And by cancellation, the node runner's way.
            ready = asyncio.Event()
            task = asyncio.create_task(serve_proxy(config, ready=ready))
            await ready.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())


def test_aclose_drains_in_flight_request() -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        arrived.set()
        await release.wait()
        return await echo_handler(backend, request)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", slow)])
            client = await e.raw()
            await client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await arrived.wait()
            closing = asyncio.create_task(e.proxy.aclose())
            release.set()
            (response,) = await client.responses(1)
            assert response.status == 200
            assert response.header("connection") == "close"
            await closing

    run(main())
