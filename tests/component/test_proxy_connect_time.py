"""``upstream_connect_s`` in the edge's access log: the time to obtain the upstream connection.

A request that opens a new connection logs the TCP connect (a small positive number); one sent
on an idle pooled keep-alive connection logs 0.0; a request that reached no backend, or was
answered without one (the edge's own refusals), logs null. The fast path (callbacks) and the
general path (a streamed upload) report it alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from photostack.blocks.balancer import Backend
from photostack.blocks.balancer.testing import FakeBackend, closed_port
from photostack.blocks.proxy import FilterRules, ProxyConfig, ProxyServer
from tests.component.test_proxy_edge import RawClient

pytestmark = pytest.mark.component


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def _edge(stack: AsyncExitStack, backends: list[Backend], log: Path) -> ProxyServer:
    proxy = ProxyServer(
        ProxyConfig(
            backends=tuple(backends),
            listen_port=0,
            access_log_path=log,
            filter=FilterRules(deny_methods=frozenset({"TRACE"})),
        )
    )
    await proxy.start()
    stack.push_async_callback(proxy.aclose)
    return proxy


def _entries(log: Path) -> dict[str, dict[str, Any]]:
    return {e["request_id"]: e for e in map(json.loads, log.read_text().splitlines())}


def _get(rid: str) -> bytes:
    return f"GET /v1/items HTTP/1.1\r\nHost: edge\r\nX-Request-Id: {rid}\r\n\r\n".encode()


def test_connect_time_is_the_connect_for_a_new_connection_and_zero_for_a_pooled_one(
    tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    upload = b"b" * (200 * 1024)  # above the edge's body buffer: the general (streamed) path

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fake = FakeBackend("web-1")
            backend = await fake.start()
            stack.push_async_callback(fake.aclose)
            proxy = await _edge(stack, [backend], log)
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            for rid in ("first", "second"):
                await client.send(_get(rid))
                (response,) = await client.responses(1)
                assert response.status == 200
            await client.send(
                b"POST /v1/photos HTTP/1.1\r\nHost: edge\r\nX-Request-Id: upload\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(upload), upload)
            )
            (response,) = await client.responses(1)
            assert response.status == 200
            await client.send(b"TRACE / HTTP/1.1\r\nHost: edge\r\nX-Request-Id: refused\r\n\r\n")
            (response,) = await client.responses(1)
            assert response.status == 405
            assert fake.connections_accepted == 1  # one connection, reused twice
            await stack.aclose()  # flushes the log
        entries = _entries(log)
        first = entries["first"]["upstream_connect_s"]
        assert isinstance(first, float)
        assert 0.0 < first < 5.0  # a real connect on loopback
        assert first <= entries["first"]["upstream_first_byte_s"]
        assert entries["second"]["upstream_connect_s"] == 0.0  # an idle pooled connection
        pooled = entries["upload"]["upstream_connect_s"]
        assert isinstance(pooled, float)
        assert 0.0 <= pooled < 0.5  # the pooled connection again, taken by the general path
        assert entries["refused"]["upstream_connect_s"] is None  # no backend involved

    run(main())


def test_connect_time_is_null_when_no_backend_was_reached(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def main() -> None:
        async with AsyncExitStack() as stack:
            dead = Backend("web-1", "127.0.0.1", closed_port())
            proxy = await _edge(stack, [dead], log)
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            await client.send(_get("nowhere"))
            (response,) = await client.responses(1)
            assert response.status == 503
            await stack.aclose()
        entry = _entries(log)["nowhere"]
        assert entry["upstream_connect_s"] is None
        assert entry["backend"] is None

    run(main())


def test_a_retried_request_logs_the_connect_of_the_try_that_answered(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def main() -> None:
        async with AsyncExitStack() as stack:
            live = FakeBackend("web-2")
            dead = Backend("web-1", "127.0.0.1", closed_port())
            backend = await live.start()
            stack.push_async_callback(live.aclose)
            proxy = await _edge(stack, [dead, backend], log)
            client = await RawClient.connect(proxy.port)
            stack.push_async_callback(client.aclose)
            for i in range(4):  # round-robin: some land on the dead one first and are retried
                await client.send(_get(f"r{i}"))
                (response,) = await client.responses(1)
                assert response.status == 200
            await stack.aclose()
        entries = _entries(log)
        for i in range(4):
            entry = entries[f"r{i}"]
            assert entry["backend"] == "web-2"
            connect = entry["upstream_connect_s"]
            assert isinstance(connect, float)
            assert 0.0 <= connect < 5.0

    run(main())
