"""The CDN edge with real sockets: two origins (or a gated fake), the edge in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from photostack.blocks.balancer.testing import closed_port
from photostack.blocks.media import (
    CdnConfig,
    CdnServer,
    MediaClient,
    Origin,
    OriginConfig,
    OriginServer,
    key_of,
)
from photostack.blocks.media._http import (
    Connection,
    HttpServer,
    Request,
    response_head,
)

pytestmark = pytest.mark.component

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Stack:
    origins: list[OriginServer]
    cdn: CdnServer
    client: httpx.AsyncClient
    media: MediaClient
    clock: Clock = field(default_factory=Clock)

    def origin_gets(self) -> int:
        """GET/HEAD answers with a body status the origins sent (200/304/404 responses)."""
        return sum(
            o.counters.get("responses", code)
            for o in self.origins
            for code in ("200", "304", "404")
        )


@asynccontextmanager
async def stack(
    tmp_path: Path, *, down: bool = False, clock: Clock | None = None
) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exits:
        origins = []
        for i in (1, 2):
            server = OriginServer(OriginConfig(name=f"media-{i}", root=tmp_path / f"media-{i}"))
            await server.start()
            exits.push_async_callback(server.aclose)
            origins.append(server)
        addresses = [Origin(o.config.name, "127.0.0.1", o.port) for o in origins]
        if down:
            addresses[0] = Origin("media-1", "127.0.0.1", closed_port())
        clock = clock or Clock()
        cdn = CdnServer(CdnConfig(origins=tuple(addresses), cache_bytes=1 << 20), clock=clock)
        await cdn.start()
        exits.push_async_callback(cdn.aclose)
        media = MediaClient(
            [Origin(o.config.name, "127.0.0.1", o.port) for o in origins],
            static_base_url=f"http://127.0.0.1:{cdn.port}",
            purge=("127.0.0.1", cdn.purge_port or 0),
        )
        exits.push_async_callback(media.aclose)
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{cdn.port}",
            limits=httpx.Limits(max_connections=300, max_keepalive_connections=300),
        )
        exits.push_async_callback(client.aclose)
        yield Stack(origins, cdn, client, media, clock)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def test_miss_then_hit_and_conditional_and_range_from_the_cache(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            obj = await s.media.put(PNG)
            assert obj.url == f"http://127.0.0.1:{s.cdn.port}/media/{obj.key}"
            assert obj.content_type == "image/png"
            first = await s.client.get(f"/media/{obj.key}")
            assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
            assert first.content == PNG
            fetched = s.origin_gets()
            assert fetched == 1
            second = await s.client.get(f"/media/{obj.key}")
            assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
            assert second.content == PNG
            assert second.headers["etag"] == f'"{obj.key}"'
            assert second.headers["content-type"] == "image/png"
            assert "immutable" in second.headers["cache-control"]
            etag = second.headers["etag"]
            not_modified = await s.client.get(f"/media/{obj.key}", headers={"If-None-Match": etag})
            assert (not_modified.status_code, not_modified.headers["x-cache"]) == (304, "HIT")
            part = await s.client.get(f"/media/{obj.key}", headers={"Range": "bytes=100-199"})
            assert part.status_code == 206
            assert part.content == PNG[100:200]
            assert part.headers["content-range"] == f"bytes 100-199/{len(PNG)}"
            bad = await s.client.get(f"/media/{obj.key}", headers={"Range": "bytes=99999-"})
            assert bad.status_code == 416
            head = await s.client.head(f"/media/{obj.key}")
            assert (head.status_code, head.headers["content-length"]) == (200, str(len(PNG)))
            assert s.origin_gets() == fetched  # all of that from the cache

    run(main)


def test_a_range_miss_is_fetched_whole_and_answered_206(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            obj = await s.media.put(PNG)
            part = await s.client.get(f"/media/{obj.key}", headers={"Range": "bytes=0-9"})
            assert (part.status_code, part.headers["x-cache"]) == (206, "MISS")
            assert part.content == PNG[:10]
            whole = await s.client.get(f"/media/{obj.key}")
            assert (whole.status_code, whole.headers["x-cache"]) == (200, "HIT")

    run(main)


class GatedOrigin:
    """An origin that holds every request until ``gate`` is set, and counts them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gate = asyncio.Event()
        self.requests = 0
        self.server = HttpServer(self)

    def answer_now(self, request: Request) -> bytes | None:
        return None

    async def answer(self, request: Request, conn: Connection) -> bool:
        self.requests += 1
        await self.gate.wait()
        key = key_of(self.data)
        headers = [
            ("Content-Type", "image/png"),
            ("Content-Length", str(len(self.data))),
            ("ETag", f'"{key}"'),
            ("Cache-Control", "public, max-age=31536000, immutable"),
        ]
        conn.write(response_head(200, headers, keep_alive=True) + self.data)
        return True


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def test_200_concurrent_misses_make_one_origin_fetch() -> None:
    async def main() -> None:
        origin = GatedOrigin(PNG)
        await origin.server.start("127.0.0.1", 0)
        cdn = CdnServer(CdnConfig(origins=(Origin("gated", "127.0.0.1", origin.server.port),)))
        await cdn.start()
        key = key_of(PNG)
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{cdn.port}", limits=limits, timeout=20
            ) as client:
                tasks = [asyncio.create_task(client.get(f"/media/{key}")) for _ in range(200)]
                # every miss joined the one fetch, and that fetch reached the (gated) origin
                await until(lambda: cdn.flights.joined == 199 and origin.requests >= 1)
                assert origin.requests == 1
                origin.gate.set()
                responses = await asyncio.gather(*tasks)
        finally:
            await cdn.aclose()
            await origin.server.aclose()
        assert [r.status_code for r in responses] == [200] * 200
        assert all(r.content == PNG for r in responses)
        assert {r.headers["x-cache"] for r in responses} == {"MISS"}
        assert origin.requests == 1
        assert cdn.flights.started == 1

    run(main)


def test_failover_when_one_origin_is_down(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path, down=True) as s:
            # The client writes to both real origins; the CDN's first origin is a closed port.
            keys = []
            for i in range(6):  # several keys, so some start at the dead origin
                obj = await s.media.put(PNG + bytes([i]))
                keys.append(obj.key)
            for key in keys:
                response = await s.client.get(f"/media/{key}")
                assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
            assert s.cdn.counters.get("origin_failures", "media-1") >= 1

    run(main)


def test_a_404_from_one_origin_tries_the_other(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            # Only one origin has each object (as if replication had not caught up).
            keys = []
            for i in range(6):
                data = PNG + bytes([i])
                key = key_of(data)
                target = s.origins[i % 2]
                await asyncio.to_thread(target.store.put, key, data)
                keys.append(key)
            for key in keys:
                response = await s.client.get(f"/media/{key}")
                assert response.status_code == 200
            missing = await s.client.get("/media/" + "0" * 64)
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"

    run(main)


def test_purge_makes_the_next_request_a_miss(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            obj = await s.media.put(PNG)
            assert (await s.client.get(f"/media/{obj.key}")).headers["x-cache"] == "MISS"
            assert (await s.client.get(f"/media/{obj.key}")).headers["x-cache"] == "HIT"
            assert await s.media.purge(obj.key)
            assert (await s.client.get(f"/media/{obj.key}")).headers["x-cache"] == "MISS"
            await s.media.delete(obj.key)  # origins, then the CDN
            gone = await s.client.get(f"/media/{obj.key}")
            assert gone.status_code == 404

    run(main)


def test_purge_is_not_reachable_on_the_public_port(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            obj = await s.media.put(PNG)
            await s.client.get(f"/media/{obj.key}")
            for method in ("PURGE", "DELETE", "PUT", "POST"):
                response = await s.client.request(method, f"/media/{obj.key}")
                assert response.status_code == 405, method
            assert (await s.client.get(f"/media/{obj.key}")).headers["x-cache"] == "HIT"

    run(main)


def test_stale_while_revalidate_serves_stale_and_refreshes_once(tmp_path: Path) -> None:
    async def main() -> None:
        gated = GatedOrigin(PNG)
        gated.gate.set()
        await gated.server.start("127.0.0.1", 0)
        clock = Clock()
        cdn = CdnServer(
            CdnConfig(origins=(Origin("gated", "127.0.0.1", gated.server.port),)), clock=clock
        )
        await cdn.start()
        key = key_of(PNG)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cdn.port}") as client:
                assert (await client.get(f"/media/{key}")).headers["x-cache"] == "MISS"
                entry = cdn.cache.peek(key) if cdn.cache else None
                assert entry is not None
                # As if the origin had said max-age=10, stale-while-revalidate=60.
                entry.fresh_until = clock.now + 10
                entry.swr_until = clock.now + 70
                clock.now += 30
                gated.gate.clear()
                stale = await client.get(f"/media/{key}")
                assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
                assert stale.content == PNG
                again = await client.get(f"/media/{key}")
                assert again.headers["x-cache"] == "STALE"
                await until(lambda: gated.requests == 2)
                gated.gate.set()
                await until(lambda: len(cdn.flights) == 0)
                refreshed = await client.get(f"/media/{key}")
                assert refreshed.headers["x-cache"] == "HIT"
                assert gated.requests == 2  # one background refresh for two stale answers
        finally:
            await cdn.aclose()
            await gated.server.aclose()

    run(main)


def test_expired_entry_is_served_stale_when_every_origin_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            obj = await s.media.put(PNG)
            await s.client.get(f"/media/{obj.key}")
            entry = s.cdn.cache.peek(obj.key) if s.cdn.cache else None
            assert entry is not None
            entry.fresh_until = s.clock.now - 1
            entry.swr_until = s.clock.now - 1
            entry.stale_if_error_until = s.clock.now + 60
            for origin in s.origins:
                await origin.aclose()
            response = await s.client.get(f"/media/{obj.key}")
            assert (response.status_code, response.headers["x-cache"]) == (200, "STALE")
            fresh_key = "1" * 64
            failed = await s.client.get(f"/media/{fresh_key}")
            assert failed.status_code == 502

    run(main)


def test_bad_keys_and_unknown_paths(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            assert (await s.client.get("/media/..%2Fetc%2Fpasswd")).status_code == 400
            assert (await s.client.get("/media/" + "Z" * 64)).status_code == 400
            assert (await s.client.get("/nothing")).status_code == 404
            assert (await s.client.get("/healthz")).status_code == 200
            assert s.origin_gets() == 0

    run(main)


def test_cache_stays_within_its_byte_bound(tmp_path: Path) -> None:
    async def main() -> None:
        async with stack(tmp_path) as s:
            for i in range(150):  # 150 objects of about 10 KB into a 1 MiB cache
                obj = await s.media.put(PNG + i.to_bytes(2, "big"))
                assert (await s.client.get(f"/media/{obj.key}")).status_code == 200
            assert s.cdn.cache is not None
            stats = s.cdn.cache.stats()
            assert stats.bytes_used <= 1 << 20
            assert stats.evictions > 0
            metrics = (await s.client.get("/metrics")).text
            assert "photostack_cdn_cache_evictions" in metrics

    run(main)
