"""Request bodies stream through the edge with bounded memory.

A body above the edge's buffer (64 KiB) goes upstream while it is still arriving, and the
client is read only as fast as the backend takes it: a 10 MiB upload must not grow the edge
process by anything like 10 MiB, a slow upload reaches the backend piece by piece, and a
streamed body is retried only while none of it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

import httptools
import psutil
import pytest

from photostack.blocks.balancer import Backend
from photostack.blocks.balancer.testing import (
    FakeAction,
    FakeBackend,
    FakeReply,
    RecordedRequest,
    closed_port,
    echo_handler,
)
from photostack.blocks.proxy import ProxyConfig, ProxyServer
from photostack.cluster.engines.testing import free_port
from tests.component.test_proxy_edge import RawClient

pytestmark = pytest.mark.component

MiB = 1024 * 1024
_DEADLINE_S = 20.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


async def until(check: Callable[[], bool], deadline_s: float = _DEADLINE_S) -> None:
    """Poll ``check`` under a deadline (state of another task or process, no event to await)."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.005)


async def start_edge(stack: AsyncExitStack, backends: list[Backend], **config: Any) -> ProxyServer:
    proxy = ProxyServer(ProxyConfig(backends=tuple(backends), listen_port=0, **config))
    await proxy.start()
    stack.push_async_callback(proxy.aclose)
    return proxy


async def started(stack: AsyncExitStack, fake: FakeBackend) -> Backend:
    backend = await fake.start()
    stack.push_async_callback(fake.aclose)
    return backend


# -- a 10 MiB upload through an edge process ------------------------------------------------


class GatedBackend(asyncio.Protocol):
    """Counts body bytes without keeping them, reading only up to ``allowed`` bytes of body."""

    def __init__(self, owner: GatedServer) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.protocols.append(self)
        self.owner.apply_gate()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.owner.apply_gate()

    def on_body(self, body: bytes) -> None:
        self.owner.received += len(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        answer = f'{{"received":{self.owner.received}}}'.encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer)
        )


class GatedServer:
    def __init__(self) -> None:
        self.received = 0
        self.allowed = 0
        self.protocols: list[GatedBackend] = []

    def apply_gate(self) -> None:
        for proto in self.protocols:
            if proto.transport is None or proto.transport.is_closing():
                continue
            if self.received >= self.allowed:
                proto.transport.pause_reading()
            else:
                proto.transport.resume_reading()


def _sidecar(listen_port: int, upstream_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "photostack.cli", "sidecar",
            "--listen", f"127.0.0.1:{listen_port}",
            "--upstream", f"127.0.0.1:{upstream_port}",
            "--no-health-checks",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _reset_peak_rss(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0, proc(5)).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_10_mib_upload_keeps_edge_memory_bounded() -> None:
    total = 10 * MiB
    step = MiB

    async def main() -> None:
        gate = GatedServer()
        server = await asyncio.get_running_loop().create_server(
            lambda: GatedBackend(gate), "127.0.0.1", 0
        )
        upstream_port = int(server.sockets[0].getsockname()[1])
        port = free_port()
        edge = _sidecar(port, upstream_port)
        try:
            assert edge.stdout is not None
            ready = await asyncio.to_thread(edge.stdout.readline)
            assert "sidecar:" in ready, ready
            process = psutil.Process(edge.pid)
            rss_before = process.memory_info().rss
            _reset_peak_rss(edge.pid)

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: edge\r\nContent-Length: %d\r\n\r\n" % total
            )
            chunk = b"u" * (64 * 1024)

            async def send_body() -> None:
                for _ in range(total // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()

            sender = asyncio.create_task(send_body())
            rss_seen = [rss_before]
            # The backend takes the body a MiB at a time; in between, the client pushes as
            # hard as it can. An edge that buffered the body would hold most of it by now.
            while gate.allowed < total:
                await until(lambda: gate.received >= gate.allowed)
                rss_seen.append(process.memory_info().rss)
                gate.allowed += step
                gate.apply_gate()
            await sender
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _DEADLINE_S)
            assert head.startswith(b"HTTP/1.1 200"), head
            lengths = [
                line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            ]
            answer = await reader.readexactly(int(lengths[0].split(b":")[1]))
            assert answer == f'{{"received":{total}}}'.encode()
            writer.close()
            growth = max(rss_seen) - rss_before
            peak_growth = _peak_rss_bytes(edge.pid) - rss_before
            assert gate.received == total
            assert growth < 3 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
            assert peak_growth < 3 * MiB, f"peak RSS grew by {peak_growth / MiB:.1f} MiB"
        finally:
            edge.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                edge.wait(10)
            if edge.poll() is None:
                edge.kill()
                edge.wait()
            if edge.stdout is not None:
                edge.stdout.close()
            for proto in gate.protocols:
                if proto.transport is not None:
                    proto.transport.abort()
            server.close()
            await server.wait_closed()

    run(main())


# -- incremental relaying, retries, limits (in-process edge) ----------------------------------


def test_a_slow_upload_reaches_the_backend_as_it_arrives() -> None:
    body = bytes(range(256)) * 1200  # 300 KiB

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            proxy = await start_edge(stack, [await started(stack, fake)])
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(
                b"POST /v1/photos HTTP/1.1\r\nHost: edge\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            sent = 0
            for size in (100 * 1024, 100 * 1024, len(body) - 200 * 1024):
                await client.send(body[sent : sent + size])
                sent += size
                if sent < len(body):
                    # The client has not finished, yet the backend already has what it sent.
                    await until(lambda: fake.body_bytes_received >= sent)  # noqa: B023
                    assert fake.requests == []
            (response,) = await client.responses(1)
            assert response.status == 200
            (seen,) = fake.requests
            assert seen.body == body
            assert seen.header("content-length") == str(len(body))

    run(main())


def test_a_chunked_upload_streams_chunked_and_a_small_one_gets_a_length() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            proxy = await start_edge(stack, [await started(stack, fake)])
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(
                b"PUT /big HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            piece = b"c" * 50_000
            for _ in range(3):
                await client.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            await until(lambda: fake.body_bytes_received >= 100_000)
            await client.send(b"0\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.status == 200
            seen = fake.requests[-1]
            assert seen.body == piece * 3
            assert seen.header("transfer-encoding") == "chunked"
            assert seen.header("content-length") is None

    run(main())


def test_a_streamed_body_is_not_retried_once_sent_but_is_before() -> None:
    async def reset_put(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        if request.method == "PUT":
            return FakeReply(action=FakeAction.RESET)
        return await echo_handler(backend, request)

    body = b"p" * (200 * 1024)
    head = b"PUT /v1/x HTTP/1.1\r\nHost: edge\r\nContent-Length: %d\r\n\r\n" % len(body)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            first, second = FakeBackend("web-1", reset_put), FakeBackend("web-2")
            backends = [await started(stack, first), await started(stack, second)]
            proxy = await start_edge(stack, backends)
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(head + body)
            (response,) = await client.responses(1)
            # PUT is idempotent, but the streamed body is gone once sent: no second try.
            assert response.status == 502
            assert second.requests == []

        async with AsyncExitStack() as stack:
            dead = Backend("web-1", "127.0.0.1", closed_port())
            live = FakeBackend("web-2")
            proxy = await start_edge(stack, [dead, await started(stack, live)])
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(head + body)
            (response,) = await client.responses(1)
            # Refused before a byte left: the next backend gets the whole body.
            assert response.status == 200
            assert live.requests[-1].body == body

    run(main())


def test_a_chunked_body_over_the_limit_mid_stream_is_413() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            proxy = await start_edge(stack, [await started(stack, fake)], max_body_bytes=150 * 1024)
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(
                b"POST /up HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            piece = b"z" * 60_000
            for _ in range(2):
                await client.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            await until(lambda: fake.body_bytes_received >= 100_000)  # streaming already
            with contextlib.suppress(ConnectionError):
                await client.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            (response,) = await client.responses(1)
            assert response.status == 413
            assert response.json()["error"]["code"] == "body_too_large"
            assert await client.is_closed_by_server()
            await until(lambda: not fake._protocols)  # the half-sent request was dropped
            assert fake.requests == []

    run(main())


def test_a_client_leaving_mid_upload_drops_the_upstream_request() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            proxy = await start_edge(stack, [await started(stack, fake)])
            client = await RawClient.connect(proxy.port)
            await client.send(b"POST /up HTTP/1.1\r\nHost: edge\r\nContent-Length: 1000000\r\n\r\n")
            await client.send(b"x" * 200_000)
            await until(lambda: fake.body_bytes_received >= 200_000)
            await client.aclose()
            await until(lambda: not fake._protocols)
            assert fake.requests == []

    run(main())
