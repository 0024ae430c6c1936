"""The load generator against an in-process asyncio server on loopback (no sleeps, no engines)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from photostack.ops.loadgen import LoadPlan, LoadProtocolError, LoadResult, run_load

Reply = Callable[[int], bytes]


def _response(status: int, body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body
    )


async def _serve(reply: Reply, run: Callable[[int], Awaitable[LoadResult]]) -> LoadResult:
    """Serve ``reply(n)`` for the n-th request (0-based, across connections) while ``run``."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answer = reply(served)
                served += 1
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await run(port)


def _plan(port: int, requests: int = 30, concurrency: int = 4) -> LoadPlan:
    return LoadPlan("127.0.0.1", port, "/", requests, concurrency, duration_cap_s=30.0)


def test_every_request_is_timed_and_errors_are_counted() -> None:
    def reply(n: int) -> bytes:
        return _response(503 if n % 10 == 0 else 200)

    result = asyncio.run(_serve(reply, lambda port: run_load(_plan(port))))
    assert len(result.latencies_ns) == 30
    assert all(ns > 0 for ns in result.latencies_ns)
    assert result.statuses == {200: 27, 503: 3}
    assert result.errors == 3
    assert not result.hit_duration_cap


def test_connection_close_makes_the_worker_reconnect() -> None:
    def reply(n: int) -> bytes:
        return _response(200, extra=b"Connection: close\r\n" if n % 3 == 0 else b"")

    result = asyncio.run(_serve(reply, lambda port: run_load(_plan(port, 20, 2))))
    assert result.statuses == {200: 20}
    assert result.transport_errors == {}


def test_a_chunked_response_fails_the_run_loudly() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    with pytest.raises(LoadProtocolError, match="chunked"):
        asyncio.run(_serve(lambda n: chunked, lambda port: run_load(_plan(port, 5, 1))))


def test_a_refused_connection_is_a_counted_error_not_a_crash() -> None:
    async def closed_port() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return port

    async def run() -> LoadResult:
        return await run_load(_plan(await closed_port(), 3, 1))

    result = asyncio.run(run())
    assert result.transport_errors == {"connection refused": 3}
    assert result.errors == 3
