"""SmartClient against real sockets: FakeBackend servers on free ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import pytest

from photostack.blocks.balancer import (
    Backend,
    ClientConfig,
    NoBackendAvailable,
    SmartClient,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from photostack.blocks.balancer.testing import (
    FakeAction,
    FakeBackend,
    FakeReply,
    RecordedRequest,
    closed_port,
    echo_handler,
)

pytestmark = pytest.mark.component


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


Handler = Callable[[FakeBackend, RecordedRequest], Awaitable[FakeReply]]


def reset_on(method: str) -> Handler:
    async def handler(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        if request.method == method:
            return FakeReply(action=FakeAction.RESET)
        return await echo_handler(backend, request)

    return handler


async def start(stack: AsyncExitStack, *fakes: FakeBackend) -> list[Backend]:
    backends = []
    for fake in fakes:
        backends.append(await fake.start())
        stack.push_async_callback(fake.aclose)
    return backends


async def client_for(
    stack: AsyncExitStack, backends: list[Backend], config: ClientConfig | None = None
) -> SmartClient:
    client = SmartClient(backends, config)
    stack.push_async_callback(client.aclose)
    return client


def test_round_robin_and_keep_alive() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = FakeBackend("app-1"), FakeBackend("app-2")
            client = await client_for(stack, await start(stack, a, b))
            served = [(await client.request("GET", f"/x/{i}")).backend for i in range(10)]
            assert served.count("app-1") == 5
            assert served.count("app-2") == 5
            assert a.connections_accepted == 1
            assert b.connections_accepted == 1
            assert [r.target for r in a.requests] == [f"/x/{i}" for i in range(0, 10, 2)]

    run(main())


def test_4xx_is_a_response_not_an_error() -> None:
    async def handler(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(404, (("Content-Type", "application/json"),), b'{"error": {}}')

    async def main() -> None:
        async with AsyncExitStack() as stack:
            client = await client_for(stack, await start(stack, FakeBackend("a", handler)))
            response = await client.request("GET", "/missing")
            assert response.status == 404
            assert response.body == b'{"error": {}}'
            assert response.header("content-type") == "application/json"

    run(main())


def test_post_with_body_reaches_backend() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("a")
            client = await client_for(stack, await start(stack, fake))
            response = await client.request(
                "POST", "/v1/users", headers=[("Content-Type", "application/json")], body=b"{}"
            )
            assert response.status == 200
            assert fake.requests[0].body == b"{}"
            assert fake.requests[0].header("content-length") == "2"
            assert fake.requests[0].header("host") == f"127.0.0.1:{fake.backend.port}"

    run(main())


def test_connect_refused_post_is_retried_elsewhere_and_marks_down() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            live = FakeBackend("app-2")
            dead = Backend("app-1", "127.0.0.1", closed_port())
            (backend,) = await start(stack, live)
            client = await client_for(stack, [dead, backend])
            for _ in range(4):
                response = await client.request("POST", "/x", body=b"1")
                assert response.backend == "app-2"
            rows = {row["name"]: row for row in client.snapshot()}
            assert rows["app-1"]["state"] == "down"
            assert rows["app-1"]["markdowns"] == 1
            assert rows["app-2"]["state"] == "up"
            assert len(live.requests) == 4

    run(main())


def test_reset_after_send_post_is_not_retried_but_get_is() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = FakeBackend("app-1", reset_on("POST"))
            b = FakeBackend("app-2")
            client = await client_for(stack, await start(stack, a, b))
            with pytest.raises(UpstreamConnectError) as info:
                await client.request("POST", "/x", body=b"1")
            assert info.value.request_sent
            assert [r.method for r in b.requests] == []

            a.handler = reset_on("GET")
            # app-1 is cooling down, so the next GET goes to app-2 first; send two.
            statuses = [(await client.request("GET", "/y")).status for _ in range(2)]
            assert statuses == [200, 200]

    run(main())


def test_a_body_cut_off_after_the_head_is_asked_again_only_when_idempotent() -> None:
    """A backend killed between its head and its body: nothing reached the caller, so a GET is
    asked again on the other backend; a POST without a key may have been processed: raised."""

    async def cut(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(200, body=b"0123456789", action=FakeAction.CUT_AFTER_HEAD)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            broken, good = FakeBackend("app-1", cut), FakeBackend("app-2")
            client = await client_for(stack, await start(stack, broken, good))
            for i in range(4):
                response = await client.request("GET", f"/g/{i}")
                assert response.status == 200
                assert response.backend == "app-2"
            assert broken.requests  # the cut-off tries did reach app-1
        async with AsyncExitStack() as stack:
            broken, good = FakeBackend("app-1", cut), FakeBackend("app-2")
            client = await client_for(stack, await start(stack, broken, good))
            outcomes: list[str] = []
            for i in range(2):
                try:
                    outcomes.append((await client.request("POST", f"/p/{i}", body=b"x")).backend)
                except (UpstreamConnectError, UpstreamProtocolError):
                    outcomes.append("raised")
            assert sorted(outcomes) == ["app-2", "raised"]
            assert [r.target for r in good.requests] == [
                t for t in ("/p/0", "/p/1") if t not in {r.target for r in broken.requests}
            ]

    run(main())


def test_idempotency_key_makes_post_retriable() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = FakeBackend("app-1", reset_on("POST"))
            b = FakeBackend("app-2")
            client = await client_for(stack, await start(stack, a, b))
            response = await client.request(
                "POST", "/x", headers=[("Idempotency-Key", "k1")], body=b"1"
            )
            assert response.backend == "app-2"

    run(main())


def test_garbage_is_a_protocol_error() -> None:
    async def garbage(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(action=FakeAction.GARBAGE)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            client = await client_for(stack, await start(stack, FakeBackend("a", garbage)))
            with pytest.raises(UpstreamProtocolError):
                await client.request("GET", "/")

    run(main())


def test_timeout() -> None:
    never = asyncio.Event()

    async def stall(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        await never.wait()
        return FakeReply()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            client = await client_for(stack, await start(stack, FakeBackend("a", stall)))
            with pytest.raises(UpstreamTimeout):
                await client.request("POST", "/", timeout_s=0.2)

    run(main())


def test_all_down_raises_no_backend_available() -> None:
    async def main() -> None:
        backends = [Backend(f"app-{i}", "127.0.0.1", closed_port()) for i in range(2)]
        client = SmartClient(backends)
        try:
            with pytest.raises(NoBackendAvailable):
                await client.request("GET", "/")
            # Still tried (never refused outright) on the next call.
            with pytest.raises(NoBackendAvailable) as info:
                await client.request("GET", "/")
            assert isinstance(info.value.__cause__, UpstreamConnectError)
        finally:
            await client.aclose()

    run(main())


def test_chunked_response_is_read_whole() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            yield part

    async def handler(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(200, (("Content-Type", "text/event-stream"),), stream=chunks)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("a", handler)
            client = await client_for(stack, await start(stack, fake))
            for _ in range(2):
                response = await client.request("GET", "/events")
                assert response.body == b"data: 1\n\ndata: 2\n\n"
            assert fake.connections_accepted == 1

    run(main())


def test_head_response_has_no_body_and_connection_is_reused() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("a")
            client = await client_for(stack, await start(stack, fake))
            head = await client.request("HEAD", "/thing")
            assert head.status == 200
            assert head.body == b""
            get = await client.request("GET", "/thing")
            assert get.body.startswith(b"{")
            assert fake.connections_accepted == 1

    run(main())


def test_stale_pooled_connection_is_not_reused() -> None:
    async def close_after(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        reply = await echo_handler(backend, request)
        return FakeReply(reply.status, reply.headers, reply.body, action=FakeAction.CLOSE_AFTER)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("a", close_after)
            client = await client_for(stack, await start(stack, fake))
            await client.request("GET", "/")
            # The client learns of the close from the event loop; poll under a deadline.
            async with asyncio.timeout(5):
                while client.snapshot()[0]["connections"] != 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            response = await client.request("POST", "/", body=b"x")
            assert response.status == 200
            assert fake.connections_accepted == 2

    run(main())


def test_pool_is_bounded() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("a")
            config = ClientConfig(max_connections_per_backend=1)
            client = await client_for(stack, await start(stack, fake), config)
            responses = await asyncio.gather(*(client.request("GET", f"/{i}") for i in range(5)))
            assert [r.status for r in responses] == [200] * 5
            assert fake.connections_accepted == 1

    run(main())


def test_streamed_body_goes_chunked_or_with_its_length() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(20):
            yield bytes([65 + i]) * 10_000

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("app-1")
            client = await client_for(stack, await start(stack, fake))
            upstream = client.upstream
            expected = b"".join([p async for p in pieces()])
            async with await upstream.open("POST", "/up", body=pieces()) as response:
                assert response.status == 200
                await response.read_all()
            seen = fake.requests[-1]
            assert seen.body == expected
            assert seen.header("transfer-encoding") == "chunked"
            async with await upstream.open(
                "PUT", "/up", body=pieces(), body_length=len(expected)
            ) as response:
                await response.read_all()
            seen = fake.requests[-1]
            assert seen.body == expected
            assert seen.header("content-length") == str(len(expected))
            # A source that delivers less than announced never completes a request upstream.
            with pytest.raises(UpstreamConnectError):
                await upstream.open("PUT", "/up", body=pieces(), body_length=len(expected) + 1)

    run(main())


def test_streamed_body_is_retried_before_send_only() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000

    async def main() -> None:
        async with AsyncExitStack() as stack:
            live = FakeBackend("app-2", reset_on("PUT"))
            dead = Backend("app-1", "127.0.0.1", closed_port())
            client = await client_for(stack, [dead, *await start(stack, live)])
            # Refused connect: nothing was read from the source, the next backend gets it all.
            async with await client.upstream.open("POST", "/up", body=pieces()) as response:
                assert response.status == 200
            assert live.requests[-1].body == b"a" * 1000 + b"b" * 1000
            # Reset after send: an idempotent PUT would be retried with bytes, not with a stream.
            with pytest.raises(UpstreamConnectError):
                await client.upstream.open("PUT", "/up", body=pieces())

    run(main())
