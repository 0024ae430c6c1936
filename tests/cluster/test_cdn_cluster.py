"""Media on a real cluster: two origins and the CDN edge come up with `photostack up`; a file
stored through the media client on both origins is served by the static URL (200, 304, 206),
and still served with one origin down."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from photostack.blocks.media import MediaClient, MediaUnavailable, Origin
from photostack.blocks.media import disk_file_name as file_name
from photostack.cluster.topology import Layout, Role, layout, parse_topology
from tests.cluster.harness import ONE_SHARD_STORES, RunningCluster, cluster_from_text

pytestmark = pytest.mark.cluster

TOPOLOGY = (
    """
[cluster]
name = "photostack-media"
host = "127.0.0.1"

[edge]
count = 1

[web]
count = 1

[app]
count = 1

[cache]
count = 1
"""
    + ONE_SHARD_STORES
    + """
[directory]
count = 1
replicas = 0

[workers]
count = 0

[queue]
replicas = 0

[media]
count = 2

[cdn]
count = 1
engine = "photostack"
cache_bytes = 8388608
"""
)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("media")
    with cluster_from_text(root, "media", TOPOLOGY) as running:
        yield running


def _client(lay: Layout, static: str) -> MediaClient:
    cdn = lay.node("cdn-1")
    assert cdn.admin_port is not None
    return MediaClient(
        [Origin(n.name, n.host, n.port) for n in lay.by_role(Role.MEDIA)],
        static_base_url=static,
        purge=(cdn.host, cdn.admin_port),
        timeout_s=5.0,
    )


def test_media_and_cdn_serve_through_the_static_url(cluster: RunningCluster) -> None:
    ready = next(line for line in cluster.lines if line.startswith("ready: "))
    static = f"http://127.0.0.1:{cluster.port_base + 1}"
    assert f"api={cluster.api} static={static} dashboard={cluster.control}" in ready
    lay = layout(parse_topology(TOPOLOGY), cluster.port_base)

    async def put_and_purge(data: bytes, purge_key: str | None = None) -> str:
        media = _client(lay, static)
        try:
            if purge_key is not None:
                assert await media.purge(purge_key)
                return purge_key
            obj = await media.put(data)
            assert obj.url == f"{static}/media/{obj.key}"
            return obj.key
        finally:
            await media.aclose()

    key = asyncio.run(put_and_purge(PNG))
    for name in ("media-1", "media-2"):  # on both origins before put returned
        stored = cluster.data_dir / "media" / name / key[:2] / key[2:4] / key
        assert stored.read_bytes() == PNG
    url = f"{static}/media/{key}"
    with httpx.Client(timeout=10.0) as http:
        first = http.get(url)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        assert first.content == PNG
        assert first.headers["content-type"] == "image/png"
        assert first.headers["etag"] == f'"{key}"'
        assert "immutable" in first.headers["cache-control"]
        assert http.get(url).headers["x-cache"] == "HIT"
        assert http.get(url, headers={"If-None-Match": f'"{key}"'}).status_code == 304
        part = http.get(url, headers={"Range": "bytes=0-7"})
        assert (part.status_code, part.content) == (206, PNG[:8])

        # One origin down: cached and uncached reads are still served (failover).
        cluster.cli("stop", "media-1")
        asyncio.run(put_and_purge(b"", purge_key=key))
        after = http.get(url)
        assert (after.status_code, after.headers["x-cache"]) == (200, "MISS")
        assert after.content == PNG
        assert http.get(url).headers["x-cache"] == "HIT"

    async def put_with_one_down() -> None:
        media = _client(lay, static)
        try:
            with pytest.raises(MediaUnavailable) as caught:
                await media.put(PNG + b"new")
            assert caught.value.failed == ("media-1",)
        finally:
            await media.aclose()

    asyncio.run(put_with_one_down())  # not acknowledged with one copy (docs/media.md)
    cluster.cli("start", "media-1")


def test_status_lists_the_media_nodes(cluster: RunningCluster) -> None:
    status = cluster.cli("status", "--json").stdout
    for name in ("media-1", "media-2", "cdn-1"):
        assert name in status
    assert Path(cluster.data_dir / "media" / "media-2").is_dir()


def test_the_cdn_disk_tier_survives_a_restart(cluster: RunningCluster) -> None:
    static = f"http://127.0.0.1:{cluster.port_base + 1}"
    lay = layout(parse_topology(TOPOLOGY), cluster.port_base)
    data = PNG + b"disk tier"

    async def put() -> str:
        media = _client(lay, static)
        try:
            return (await media.put(data)).key
        finally:
            await media.aclose()

    key = asyncio.run(put())
    url = f"{static}/media/{key}"
    on_disk = cluster.data_dir / "cdn" / "cdn-1" / file_name(key)[:2] / f"{file_name(key)}.obj"
    with httpx.Client(timeout=10.0) as http:
        assert http.get(url).headers["x-cache"] == "MISS"
        deadline = time.monotonic() + 10
        while not on_disk.exists():  # written through in the background
            assert time.monotonic() < deadline, "the object never reached the disk tier"
            time.sleep(0.05)
        cluster.cli("stop", "cdn-1")
        cluster.cli("start", "cdn-1")
        deadline = time.monotonic() + 20
        while True:  # the restarted edge re-indexed its directory: a hit without the origins
            with contextlib.suppress(httpx.HTTPError):
                again = http.get(url)
                break
            assert time.monotonic() < deadline, "cdn-1 did not come back"
            time.sleep(0.1)
        assert (again.status_code, again.headers["x-cache"]) == (200, "HIT")
        assert again.headers["x-cache-tier"] == "disk"
        assert again.content == data
