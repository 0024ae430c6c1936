"""The nginx CDN engine (``[cdn] engine = "nginx"``) against two real media origins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from photostack.blocks.balancer.testing import closed_port
from photostack.blocks.media import OriginConfig, OriginServer, key_of
from photostack.cluster.engines.base import EngineError
from photostack.cluster.engines.nginx_cdn import NginxCdnConfig, NginxCdnEngine
from photostack.cluster.engines.testing import free_port
from tests.conftest import engine_missing

pytestmark = pytest.mark.component

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@asynccontextmanager
async def nginx_cdn(
    tmp_path: Path, *, first_down: bool = False
) -> AsyncIterator[tuple[list[OriginServer], int, int]]:
    async with AsyncExitStack() as exits:
        origins = []
        for i in (1, 2):
            server = OriginServer(OriginConfig(name=f"media-{i}", root=tmp_path / f"m{i}"))
            await server.start()
            exits.push_async_callback(server.aclose)
            origins.append(server)
        addresses = [(o.config.name, "127.0.0.1", o.port) for o in origins]
        if first_down:
            addresses[0] = ("media-1", "127.0.0.1", closed_port())
        port, purge_port = free_port(), free_port()
        engine = NginxCdnEngine(
            NginxCdnConfig(
                name="cdn-1",
                host="127.0.0.1",
                port=port,
                purge_port=purge_port,
                origins=tuple(addresses),
                prefix=tmp_path / "nginx",
                log_path=tmp_path / "nginx.log",
                cache_bytes=8 << 20,
            )
        )
        try:
            engine.prepare()
        except EngineError as exc:
            engine_missing(str(exc))
        argv = engine.process_spec().argv
        proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)

        async def stop() -> None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)

        exits.push_async_callback(stop)
        deadline = time.monotonic() + 10
        while not await engine.probe(1.0):
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.05)
        yield origins, port, purge_port


def test_nginx_cdn_caches_serves_conditionals_and_purges(tmp_path: Path) -> None:
    async def main() -> None:
        async with nginx_cdn(tmp_path) as (origins, port, purge_port):
            key = key_of(PNG)
            for origin in origins:
                await asyncio.to_thread(origin.store.put, key, PNG)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                first = await client.get(f"/media/{key}")
                assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
                assert first.content == PNG
                hit = await client.get(f"/media/{key}")
                assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
                assert hit.headers["etag"] == f'"{key}"'
                assert hit.headers["content-type"] == "image/png"
                inm = await client.get(f"/media/{key}", headers={"If-None-Match": f'"{key}"'})
                assert inm.status_code == 304
                part = await client.get(f"/media/{key}", headers={"Range": "bytes=0-9"})
                assert (part.status_code, part.content) == (206, PNG[:10])
                assert (await client.post(f"/media/{key}")).status_code == 405
                assert (await client.get("/media/nothex")).status_code == 400
                # Purge after the origins deleted the object: the next read is a 404.
                for origin in origins:
                    await asyncio.to_thread(origin.store.delete, key)
                    origin.forget(key)
                async with httpx.AsyncClient() as internal:
                    purged = await internal.request(
                        "PURGE", f"http://127.0.0.1:{purge_port}/media/{key}"
                    )
                    assert purged.status_code == 404  # the origins' answer, now cached
                assert (await client.get(f"/media/{key}")).status_code == 404

    asyncio.run(asyncio.wait_for(main(), 40))


def test_nginx_cdn_fails_over_on_errors_and_404(tmp_path: Path) -> None:
    async def main() -> None:
        async with nginx_cdn(tmp_path, first_down=True) as (origins, port, _):
            keys = []
            for i in range(4):
                data = PNG + bytes([i])
                await asyncio.to_thread(origins[1].store.put, key_of(data), data)
                keys.append(key_of(data))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for key in keys:
                    assert (await client.get(f"/media/{key}")).status_code == 200

    asyncio.run(asyncio.wait_for(main(), 40))
