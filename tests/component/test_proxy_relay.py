"""The edge's callback relay: deadlines from the housekeeping tick, retries in callbacks, order.

The common request never gets a timer, task or coroutine: these check that what those used to
do still happens — a backend that stops answering is timed out (and an idempotent request
retried elsewhere), a stalled body is cut, pipelined requests that take different paths are
answered in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from photostack.blocks.balancer import ClientConfig, HealthConfig
from photostack.blocks.balancer.testing import (
    FakeBackend,
    FakeReply,
    RecordedRequest,
    echo_handler,
)
from tests.component.test_proxy_edge import edge, run
from tests.component.test_proxy_features import until

pytestmark = pytest.mark.component


def test_a_silent_backend_times_out_and_only_idempotent_requests_move_on() -> None:
    never = asyncio.Event()

    async def silent(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        await never.wait()
        return FakeReply()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            config = ClientConfig(
                try_timeout_s=0.3,
                request_timeout_s=10.0,
                health=HealthConfig(eject_after_failures=100),  # keep web-1 in rotation
            )
            e = await edge(
                stack, [FakeBackend("web-1", silent), FakeBackend("web-2")], upstream=config
            )
            http = await e.http()
            post = await http.post("/v1/photos", content=b"x")
            assert post.status_code == 504  # sent, not idempotent: not repeated
            assert post.json()["error"]["code"] == "upstream_timeout"
            assert e.fakes[1].requests == []
            gets = [await http.get(f"/v1/feed/{i}") for i in range(2)]  # web-2, then web-1 -> web-2
            assert [r.status_code for r in gets] == [200, 200]
            assert {r.headers["x-backend"] for r in gets} == {"web-2"}
            assert [r.method for r in e.fakes[0].requests] == ["POST", "GET"]
            metrics = (await http.get("/metrics")).text
            assert 'photostack_edge_upstream_retries_total{reason="timeout"} 1.0' in metrics

    run(main())


def test_a_stalled_response_body_is_cut() -> None:
    never = asyncio.Event()

    async def first_then_silence() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await never.wait()
        yield b"never"

    async def stalls(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        return FakeReply(200, (("Content-Type", "text/event-stream"),), stream=first_then_silence)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", stalls)], stream_idle_timeout_s=0.3)
            client = await e.raw()
            await client.send(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            while not client.chunk_arrived.is_set():
                assert await client.feed_once()
            assert client.body_so_far == b"data: 1\n\n"
            # No terminating chunk: the connection ends, so the client knows it was cut.
            assert not await asyncio.wait_for(client.feed_once(), 10)
            await until(lambda: not e.fakes[0]._protocols)  # the upstream connection dropped

    run(main())


def test_pipelined_requests_on_both_paths_are_answered_in_order() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1", echo_handler)])
            client = await e.raw()
            big = b"b" * (100 * 1024)  # streamed: the general path
            await client.send(
                b"GET /n/0 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /n/1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /n/3 HTTP/1.1\r\n\r\n"  # no Host: the general path adds the backend's
                b"GET /n/4 HTTP/1.1\r\nHost: x\r\n\r\n" % (len(big), big)
            )
            responses = await client.responses(5)
            assert [r.status for r in responses] == [200] * 5
            targets = [r.json().get("target") for r in responses]
            assert targets == ["/n/0", "/n/1", None, "/n/3", "/n/4"]
            assert e.fakes[0].requests[1].body == big
            assert e.fakes[0].requests[2].header("host") is not None

    run(main())


def test_heads_copied_raw_or_rebuilt_reach_the_backend_the_same() -> None:
    """A head that arrives alone in one read is forwarded as the client's bytes; one split
    over reads, pipelined or not in canonical form is rebuilt. The backend sees the same."""
    canonical = b"GET /v1/a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Tag: t1\r\n\r\n"
    odd = b"GET /v1/a HTTP/1.1\r\nHost:x\r\nAccept:   */*\r\nX-Tag:t2\r\n\r\n"
    pipelined = canonical.replace(b"t1", b"t3") + canonical.replace(b"t1", b"t4")

    async def main() -> None:
        async with AsyncExitStack() as stack:
            e = await edge(stack, [FakeBackend("web-1")])
            client = await e.raw()
            await client.send(canonical)  # alone in one read: copied
            await client.responses(1)
            await client.send(odd)  # not canonical: rebuilt
            await client.responses(1)
            await client.send(canonical[:20])  # split over two writes (two reads, likely)
            await client.send(canonical[20:].replace(b"t1", b"t5"))
            await client.responses(1)
            await client.send(pipelined)
            await client.responses(2)
            seen = e.fakes[0].requests
            assert [r.header("x-tag") for r in seen] == ["t1", "t2", "t5", "t3", "t4"]
            for request in seen:
                assert request.target == "/v1/a"
                assert request.header("host") == "x"
                assert request.header("accept") == "*/*"
                assert request.header("x-forwarded-for") == "127.0.0.1"
                assert request.header("x-forwarded-proto") == "http"
                assert request.header("x-request-id")
            assert len({r.header("x-request-id") for r in seen}) == 5

    run(main())
