"""The CDN edge's disk tier with real sockets and files: two origins, the edge in-process with
a small memory tier and a disk tier under tmp_path (docs/media.md "Disk tier")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from photostack.blocks.media import (
    CdnConfig,
    CdnServer,
    MediaClient,
    Origin,
    OriginConfig,
    OriginServer,
)
from photostack.blocks.media import disk_file_name as file_name

pytestmark = pytest.mark.component

OBJECT_BYTES = 10_000


def png(i: int, size: int = OBJECT_BYTES) -> bytes:
    head = b"\x89PNG\r\n\x1a\n" + i.to_bytes(4, "big")
    return head + bytes((i * 7 + n) % 251 for n in range(size - len(head)))


@dataclass
class Edge:
    origins: list[OriginServer]
    media: MediaClient
    addresses: tuple[Origin, ...]
    disk_root: Path

    def origin_gets(self) -> int:
        return sum(o.counters.get("responses", c) for o in self.origins for c in ("200", "404"))

    def config(self, **sizes: int) -> CdnConfig:
        return CdnConfig(origins=self.addresses, disk_root=self.disk_root, **sizes)  # type: ignore[arg-type]


@asynccontextmanager
async def origins(tmp_path: Path) -> AsyncIterator[Edge]:
    async with AsyncExitStack() as exits:
        servers = []
        for i in (1, 2):
            server = OriginServer(OriginConfig(name=f"media-{i}", root=tmp_path / f"media-{i}"))
            await server.start()
            exits.push_async_callback(server.aclose)
            servers.append(server)
        addresses = tuple(Origin(o.config.name, "127.0.0.1", o.port) for o in servers)
        media = MediaClient(list(addresses), static_base_url="http://static.test")
        exits.push_async_callback(media.aclose)
        yield Edge(servers, media, addresses, tmp_path / "cdn-1" / "disk")


@asynccontextmanager
async def edge(config: CdnConfig) -> AsyncIterator[tuple[CdnServer, httpx.AsyncClient]]:
    cdn = CdnServer(config)
    await cdn.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cdn.port}") as client:
            yield cdn, client
    finally:
        await cdn.aclose()


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


async def written(cdn: CdnServer, count: int) -> None:
    """The background write-through of ``count`` objects has landed."""
    assert cdn.disk is not None
    disk = cdn.disk
    await until(lambda: disk.stats().writes >= count)


def tier(r: httpx.Response) -> tuple[int, str, str | None]:
    return r.status_code, r.headers["x-cache"], r.headers.get("x-cache-tier")


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


def disk_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_an_object_evicted_from_memory_is_a_disk_hit_then_promoted(tmp_path: Path) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            stored = [await s.media.put(png(i)) for i in range(4)]
            config = s.config(cache_bytes=25_000, max_entry_bytes=12_000)
            async with edge(config) as (cdn, client):  # memory holds two objects
                for obj in stored:
                    r = await client.get(f"/media/{obj.key}")
                    assert tier(r) == (200, "MISS", None)
                await written(cdn, 4)
                assert cdn.cache is not None
                assert stored[0].key not in cdn.cache  # evicted from memory (LRU)
                fetched = s.origin_gets()

                r = await client.get(f"/media/{stored[0].key}")
                assert tier(r) == (200, "HIT", "disk")
                assert r.content == png(0)
                assert r.headers["etag"] == f'"{stored[0].key}"'
                part = await client.get(f"/media/{stored[1].key}", headers={"Range": "bytes=10-19"})
                assert (part.status_code, part.headers["x-cache-tier"]) == (206, "disk")
                assert part.content == png(1)[10:20]
                r = await client.get(f"/media/{stored[0].key}")
                assert tier(r) == (200, "HIT", "memory")  # promoted on the disk hit
                assert s.origin_gets() == fetched  # no origin request for any of them

                metrics = (await client.get("/metrics")).text
                assert 'photostack_cdn_requests_total{kind="disk_hit"} 2' in metrics
                assert "photostack_cdn_disk_hit_ratio 0.285714" in metrics  # 2 of 7
                assert "photostack_cdn_memory_hit_ratio 0.142857" in metrics  # 1 of 7

    run(main)


def test_objects_over_the_memory_entry_limit_live_on_disk_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            big = await s.media.put(png(9, 30_000))
            config = s.config(cache_bytes=1 << 20, max_entry_bytes=12_000)
            async with edge(config) as (cdn, client):
                assert tier(await client.get(f"/media/{big.key}")) == (200, "MISS", None)
                await written(cdn, 1)
                for _ in range(2):  # never promoted: it is over the memory tier's limit
                    r = await client.get(f"/media/{big.key}")
                    assert tier(r) == (200, "HIT", "disk")
                    assert r.content == png(9, 30_000)
                assert cdn.cache is not None
                assert big.key not in cdn.cache

    run(main)


def test_a_restarted_edge_reindexes_its_disk_and_serves_without_the_origins(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            stored = [await s.media.put(png(i)) for i in range(3)]
            config = s.config(cache_bytes=1 << 20)
            async with edge(config) as (cdn, client):
                for obj in stored:
                    await client.get(f"/media/{obj.key}")
                await written(cdn, 3)
                assert cdn.disk is not None
                before = cdn.disk.stats()
            stray = s.disk_root / "ab" / ".abc.tmp"  # a write cut short by a crash
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"partial")
            fetched = s.origin_gets()

            async with edge(config) as (cdn, client):
                assert cdn.disk is not None
                after = cdn.disk.stats()
                assert (after.entries, after.bytes_used) == (before.entries, before.bytes_used)
                assert not stray.exists()
                for i, obj in enumerate(stored):
                    r = await client.get(f"/media/{obj.key}")
                    assert tier(r) == (200, "HIT", "disk")
                    assert r.content == png(i)
                assert s.origin_gets() == fetched

    run(main)


def test_purge_removes_both_tiers_and_a_damaged_file_is_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            one, two = await s.media.put(png(1)), await s.media.put(png(2))
            config = s.config(cache_bytes=1 << 20)
            async with edge(config) as (cdn, client):
                purge = httpx.AsyncClient(base_url=f"http://127.0.0.1:{cdn.purge_port}")
                try:
                    for obj in (one, two):
                        await client.get(f"/media/{obj.key}")
                    await written(cdn, 2)
                    assert cdn.disk is not None
                    assert cdn.cache is not None
                    path = cdn.disk.path_of(file_name(one.key))
                    assert path.exists()
                    assert one.key in cdn.cache

                    r = await purge.request("PURGE", f"/media/{one.key}")
                    assert r.json() == {"key": one.key, "purged": True}
                    assert not path.exists()
                    assert one.key not in cdn.cache
                    assert one.key not in cdn.disk
                    fetched = s.origin_gets()
                    assert tier(await client.get(f"/media/{one.key}"))[1] == "MISS"
                    assert s.origin_gets() == fetched + 1
                finally:
                    await purge.aclose()

                # a damaged file (bytes flipped on disk) is detected on read and dropped
                cdn.cache.purge(two.key)  # memory only: the next read goes to disk
                damaged = cdn.disk.path_of(file_name(two.key))
                raw = bytearray(damaged.read_bytes())
                raw[-1] ^= 0xFF
                damaged.write_bytes(bytes(raw))
                r = await client.get(f"/media/{two.key}")
                assert tier(r) == (200, "MISS", None)  # fetched again from an origin
                assert r.content == png(2)
                assert cdn.disk.stats().errors == 1

    run(main)


def test_the_disk_tier_stays_within_its_byte_bound(tmp_path: Path) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            stored = [await s.media.put(png(i)) for i in range(12)]
            bound = 5 * (OBJECT_BYTES + 400)  # five objects with their headers
            config = s.config(cache_bytes=25_000, max_entry_bytes=12_000, disk_cache_bytes=bound)
            async with edge(config) as (cdn, client):
                for obj in stored:
                    await client.get(f"/media/{obj.key}")
                    await written(cdn, stored.index(obj) + 1)  # in order: a defined LRU
                assert cdn.disk is not None
                stats = cdn.disk.stats()
                files = disk_files(s.disk_root)
                assert stats.bytes_used <= bound
                assert sum(p.stat().st_size for p in files) == stats.bytes_used
                assert stats.evictions == 12 - stats.entries > 0
                assert {p.name for p in files} == {
                    file_name(o.key) + ".obj" for o in stored[-stats.entries :]
                }  # the newest stayed, named by the key's hash
                r = await client.get(f"/media/{stored[0].key}")  # evicted from both tiers
                assert tier(r) == (200, "MISS", None)

    run(main)


def test_an_expired_disk_copy_is_served_stale_when_every_origin_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with origins(tmp_path) as s:
            obj = await s.media.put(png(5))
            async with edge(s.config(cache_bytes=1 << 20)) as (cdn, client):
                await client.get(f"/media/{obj.key}")
                await written(cdn, 1)
                assert cdn.cache is not None
                assert cdn.disk is not None
                entry = cdn.cache.peek(obj.key)
                assert entry is not None
                # As if the origin had said max-age=0, stale-if-error=60: rewrite the disk copy
                # with those terms and drop the memory one.
                now = cdn.now()
                entry.fresh_until = entry.swr_until = now - 1
                entry.stale_if_error_until = now + 60
                assert cdn.disk.save(entry)
                await written(cdn, 2)
                cdn.cache.purge(obj.key)
                for origin in s.origins:
                    await origin.aclose()
                r = await client.get(f"/media/{obj.key}")
                assert tier(r) == (200, "STALE", "disk")
                assert r.content == png(5)

    run(main)
