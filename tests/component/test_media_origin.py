"""The media origin with real sockets: store, serve, Range, conditionals, traversal, PUT/DELETE."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from photostack.blocks.media import (
    IMMUTABLE_CACHE_CONTROL,
    OriginConfig,
    OriginServer,
    key_of,
)

pytestmark = pytest.mark.component

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # 10,248 bytes, sent in one write
JPEG = b"\xff\xd8\xff\xe0" + b"j" * 100_000  # over the small-body limit: sendfile


@asynccontextmanager
async def origin(root: Path) -> AsyncIterator[tuple[OriginServer, httpx.AsyncClient]]:
    server = OriginServer(OriginConfig(name="media-1", root=root))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield server, client
    finally:
        await server.aclose()


def run(tmp_path: Path, body: Callable[[OriginServer, httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with origin(tmp_path / "media") as (server, client):
            await body(server, client)

    asyncio.run(asyncio.wait_for(main(), 20))


async def put(client: httpx.AsyncClient, data: bytes) -> str:
    key = key_of(data)
    response = await client.put(f"/media/{key}", content=data)
    assert response.status_code in (200, 201), response.text
    return key


@pytest.mark.parametrize("data", [PNG, JPEG], ids=["small", "sendfile"])
def test_put_then_get_with_etag_cache_control_and_type(tmp_path: Path, data: bytes) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        key = key_of(data)
        first = await client.put(f"/media/{key}", content=data)
        assert first.status_code == 201
        expected = "image/png" if data is PNG else "image/jpeg"
        assert first.json() == {"key": key, "size": len(data), "content_type": expected}
        again = await client.put(f"/media/{key}", content=data)
        assert again.status_code == 200  # idempotent
        got = await client.get(f"/media/{key}")
        assert got.status_code == 200
        assert got.content == data
        assert got.headers["etag"] == f'"{key}"'
        assert got.headers["cache-control"] == IMMUTABLE_CACHE_CONTROL
        assert got.headers["content-type"] == expected
        assert got.headers["accept-ranges"] == "bytes"
        head = await client.head(f"/media/{key}")
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(data))
        assert head.content == b""
        stored = server.store.path_of(key)
        assert stored.relative_to(tmp_path / "media").parts == (key[:2], key[2:4], key)

    run(tmp_path, body)


def test_content_type_comes_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        text = b"this is not an image"
        key = key_of(text)
        response = await client.put(
            f"/media/{key}", content=text, headers={"Content-Type": "image/jpeg"}
        )
        assert response.json()["content_type"] == "application/octet-stream"
        got = await client.get(f"/media/{key}")
        assert got.headers["content-type"] == "application/octet-stream"

    run(tmp_path, body)


def test_if_none_match_is_304(tmp_path: Path) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        key = await put(client, PNG)
        for tag in (f'"{key}"', f'W/"{key}"', f'"other", "{key}"', "*"):
            response = await client.get(f"/media/{key}", headers={"If-None-Match": tag})
            assert response.status_code == 304, tag
            assert response.content == b""
            assert response.headers["etag"] == f'"{key}"'
        other = await client.get(f"/media/{key}", headers={"If-None-Match": '"nope"'})
        assert other.status_code == 200

    run(tmp_path, body)


@pytest.mark.parametrize("data", [PNG, JPEG], ids=["small", "sendfile"])
def test_ranges(tmp_path: Path, data: bytes) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        key = await put(client, data)
        size = len(data)
        url = f"/media/{key}"
        part = await client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{size}"
        tail = await client.get(url, headers={"Range": "bytes=-5"})
        assert (tail.status_code, tail.content) == (206, data[-5:])
        open_end = await client.get(url, headers={"Range": f"bytes={size - 3}-"})
        assert (open_end.status_code, open_end.content) == (206, data[-3:])
        beyond = await client.get(url, headers={"Range": f"bytes={size}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{size}"
        assert beyond.json()["error"]["code"] == "range_not_satisfiable"
        multi = await client.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert (multi.status_code, multi.content) == (200, data)  # documented: 200 whole
        stale_if_range = await client.get(
            url, headers={"Range": "bytes=0-1", "If-Range": '"other"'}
        )
        assert stale_if_range.status_code == 200
        fresh_if_range = await client.get(
            url, headers={"Range": "bytes=0-1", "If-Range": f'"{key}"'}
        )
        assert (fresh_if_range.status_code, fresh_if_range.content) == (206, data[:2])

    run(tmp_path, body)


def test_hash_mismatch_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        key = hashlib.sha256(b"something else").hexdigest()
        response = await client.put(f"/media/{key}", content=PNG)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "hash_mismatch"
        assert (await client.get(f"/media/{key}")).status_code == 404
        assert server.store.count() == 0

    run(tmp_path, body)


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_path_traversal_and_bad_keys_never_reach_the_disk(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")

    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        await put(client, PNG)
        for target in (
            "/media/../secret.txt",
            "/media/..%2Fsecret.txt",
            "/media/%2e%2e/secret.txt",
            "/media/" + "../" * 10 + "etc/passwd",
            "/media/" + "A" * 64,  # uppercase is not a key
            "/media/" + "0" * 63,
            "/media/" + "0" * 64 + "/x",
            "/media/" + "0" * 64 + "%00",
            "/../secret.txt",
        ):
            status, data = await raw_get(server.port, target)
            assert status in (400, 404), target
            assert b"do not serve" not in data
            assert b'"error"' in data
        missing = await client.get("/media/" + "0" * 64)
        assert missing.status_code == 404
        assert missing.json() == {"error": {"code": "not_found", "message": "no such media key"}}

    run(tmp_path, body)


def test_delete_is_idempotent(tmp_path: Path) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        key = await put(client, PNG)
        assert (await client.delete(f"/media/{key}")).status_code == 204
        assert (await client.get(f"/media/{key}")).status_code == 404
        assert (await client.delete(f"/media/{key}")).status_code == 204
        assert server.store.count() == 0

    run(tmp_path, body)


def test_health_and_metrics(tmp_path: Path) -> None:
    async def body(server: OriginServer, client: httpx.AsyncClient) -> None:
        await put(client, PNG)
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        metrics = (await client.get("/metrics")).text
        assert "photostack_media_stored_total 1" in metrics
        assert 'photostack_media_responses_total{code="201"} 1' in metrics

    run(tmp_path, body)
