"""The `uploads` bench suite: upload-to-thumbnail latency under a bounded load.

A cluster (the default topology, or the running one with ``--use-running``) receives ``N``
uploads of a small JPEG at a fixed rate through the edge. For each upload the clock starts when
the request is sent and stops when the owner's ``photo.ready`` event arrives on an SSE stream
(the photo is ready: the worker stored its thumbnail and marked it). The anchor is the CPU floor
of the same work: the same thumbnail made in-process with Pillow, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageOps

from photostack.ops._bench_procs import (
    CLUSTER_READY_PREFIX,
    BenchError,
    free_port_base,
    start_cluster,
)
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = [
    "UploadBenchConfig",
    "UploadFigures",
    "percentile",
    "pillow_floor_ms",
    "run_uploads_suite",
    "uploads_section",
]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class UploadBenchConfig:
    uploads: int = 100
    rate_per_s: float = 5.0
    image_px: tuple[int, int] = (1024, 768)
    thumbnail_px: int = 320  # service/tasks.THUMBNAIL_MAX_PX (ops may not import service)
    anchor_runs: int = 50
    deadline_s: float = 120.0


@dataclass(frozen=True)
class UploadFigures:
    latencies_ms: tuple[float, ...]  # upload sent -> photo.ready received, per upload
    ack_ms: tuple[float, ...]  # upload sent -> 202 received
    anchor_ms: tuple[float, ...]  # in-process Pillow thumbnail, per run
    missing: int  # uploads whose photo never became ready in the deadline
    image_bytes: int


def percentile(values: tuple[float, ...] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def sample_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A photo-like JPEG (gradient plus a seed-dependent tint): distinct bytes per upload."""
    base = Image.linear_gradient("L").resize(size)
    tint = Image.new("L", size, seed % 256)
    out = io.BytesIO()
    Image.merge("RGB", (base, tint, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT))).save(
        out, "JPEG", quality=88
    )
    return out.getvalue()


def _thumbnail(data: bytes, max_px: int) -> bytes:
    """The worker's thumbnail steps (service/tasks.make_thumbnail), for the anchor."""
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        upright = ImageOps.exif_transpose(source).convert("RGB")
    upright.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    clean = Image.new("RGB", upright.size)
    clean.paste(upright)
    out = io.BytesIO()
    clean.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def pillow_floor_ms(data: bytes, max_px: int, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _thumbnail(data, max_px)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def _ready_events(
    api: str, token: str, ready: dict[str, float], opened: asyncio.Event, changed: asyncio.Event
) -> None:
    """Record the arrival time of every ``photo.ready`` on the owner's SSE stream."""
    async with (
        httpx.AsyncClient(base_url=api, timeout=httpx.Timeout(30.0, read=None)) as client,
        client.stream("GET", f"/v1/events/stream?access_token={token}") as response,
    ):
        if response.status_code != 200:
            raise BenchError(f"event stream answered {response.status_code}")
        opened.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "photo.ready":
                    ready.setdefault(event["data"]["photo"]["id"], time.perf_counter())
                    changed.set()


async def measure_uploads(api: str, cfg: UploadBenchConfig, out: Out) -> UploadFigures:
    async with httpx.AsyncClient(base_url=api, timeout=30.0) as client:
        r = await client.post("/v1/users", json={"username": f"bench_{uuid.uuid4().hex[:10]}"})
        if r.status_code != 201:
            raise BenchError(f"POST /v1/users answered {r.status_code}: {r.text[:200]}")
        user = r.json()
        headers = {"Authorization": f"Bearer {user['token']}"}
        images = [sample_jpeg(cfg.image_px, i) for i in range(cfg.uploads)]
        ready: dict[str, float] = {}
        opened, changed = asyncio.Event(), asyncio.Event()
        listener = asyncio.create_task(_ready_events(api, user["token"], ready, opened, changed))
        await asyncio.wait_for(opened.wait(), 30)
        sent: dict[str, float] = {}
        acks: list[float] = []

        async def one(data: bytes) -> None:
            start = time.perf_counter()
            response = await client.post(
                "/v1/photos", headers=headers, files={"file": ("b.jpg", data, "image/jpeg")}
            )
            if response.status_code != 202:
                raise BenchError(f"upload answered {response.status_code}: {response.text[:200]}")
            acks.append((time.perf_counter() - start) * 1000)
            sent[response.json()["photo"]["id"]] = start

        out(f"uploading {cfg.uploads} images at {cfg.rate_per_s}/s")
        began = time.perf_counter()
        pending = []
        for i, data in enumerate(images):
            await asyncio.sleep(max(0.0, began + i / cfg.rate_per_s - time.perf_counter()))
            pending.append(asyncio.create_task(one(data)))
        await asyncio.gather(*pending)
        end = time.perf_counter() + cfg.deadline_s
        while not set(sent) <= set(ready) and time.perf_counter() < end:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, end - time.perf_counter()))
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await listener
    latencies = tuple((ready[p] - s) * 1000 for p, s in sent.items() if p in ready)
    anchor = await asyncio.to_thread(pillow_floor_ms, images[0], cfg.thumbnail_px, cfg.anchor_runs)
    return UploadFigures(
        latencies_ms=latencies,
        ack_ms=tuple(acks),
        anchor_ms=tuple(anchor),
        missing=len(set(sent) - set(ready)),
        image_bytes=len(images[0]),
    )


def uploads_section(f: UploadFigures, cfg: UploadBenchConfig) -> Section:
    anchor_p50 = statistics.median(f.anchor_ms) if f.anchor_ms else math.nan
    rows = (
        (
            "upload → photo ready (thumbnail stored)",
            fmt(percentile(f.latencies_ms, 50), 1),
            fmt(percentile(f.latencies_ms, 99), 1),
            f"{percentile(f.latencies_ms, 50) / anchor_p50:.1f}x",
        ),
        (
            "upload → 202 (stored on both origins, queued)",
            fmt(percentile(f.ack_ms, 50), 1),
            fmt(percentile(f.ack_ms, 99), 1),
            f"{percentile(f.ack_ms, 50) / anchor_p50:.1f}x",
        ),
        (
            "anchor: same thumbnail in-process with Pillow",
            fmt(anchor_p50, 1),
            fmt(percentile(f.anchor_ms, 99), 1),
            "1.0x",
        ),
    )
    return Section(
        "Uploads: upload-to-thumbnail latency",
        (
            Paragraph(
                f"{cfg.uploads} uploads of a {cfg.image_px[0]}x{cfg.image_px[1]} JPEG"
                f" ({f.image_bytes:,} bytes, distinct bytes each) at {cfg.rate_per_s:g}/s"
                " through the edge of the default cluster (2 workers, 4 slots each). Latency runs"
                " from sending the upload to the owner's `photo.ready` event on an SSE stream."
                f" The anchor is the worker's thumbnail ({cfg.thumbnail_px} px, EXIF-aware,"
                f" JPEG q85) made in-process with Pillow, {cfg.anchor_runs} runs, same machine."
            ),
            Table(("path", "p50 (ms)", "p99 (ms)", "p50 vs anchor"), rows),
            Bullets(
                (
                    f"{f.missing} of {cfg.uploads} uploads not ready within the deadline.",
                    "On top of the CPU floor: multipart parsing and two origin writes, metadata"
                    " insert and enqueue, the post-commit re-check of the original (two HEADs,"
                    " docs/uploads.md, Shared files), the worker's wake-up (LISTEN/NOTIFY),"
                    " the original's read, two thumbnail writes, the status move and the"
                    " thumbnail's re-check, the event, the fan-out task.",
                ),
            ),
        ),
    )


@contextlib.contextmanager
def _cluster(options: SuiteOptions, out: Out) -> Iterator[str]:
    if options.use_running:
        base = options.port_base if options.port_base is not None else 8080
        out(f"using the cluster running at port base {base}")
        yield f"http://{HOST}:{base}"
        return
    from photostack.cluster.engines import discard_postgres_data

    base = options.port_base if options.port_base is not None else free_port_base(HOST)
    data_dir = Path(tempfile.mkdtemp(prefix="photostack-bench-uploads-"))
    out(f"starting a cluster: photostack up --data-dir {data_dir} --port-base {base}")
    cluster = start_cluster(data_dir, base)
    try:
        out(cluster.wait_for_line(CLUSTER_READY_PREFIX, options.ready_deadline_s, echo=out))
        yield f"http://{HOST}:{base}"
    finally:
        out("stopping the cluster")
        cluster.stop(options.stop_timeout_s)
        discard_postgres_data(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def run_uploads_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """Measure upload-to-thumbnail latency against the in-process Pillow floor."""
    cfg = UploadBenchConfig()
    try:
        with _cluster(options, out) as api:
            figures = asyncio.run(measure_uploads(api, cfg, out))
    except (BenchError, httpx.HTTPError, OSError, TimeoutError) as exc:
        raise SuiteError(f"uploads bench: {exc}") from exc
    anchor_p50 = statistics.median(figures.anchor_ms)
    result: dict[str, Any] = {
        "ready_p50_ms": percentile(figures.latencies_ms, 50),
        "ready_p99_ms": percentile(figures.latencies_ms, 99),
        "ack_p50_ms": percentile(figures.ack_ms, 50),
        "ack_p99_ms": percentile(figures.ack_ms, 99),
        "anchor_p50_ms": anchor_p50,
        "ratio_p50": percentile(figures.latencies_ms, 50) / anchor_p50,
        "missing": figures.missing,
    }
    return SuiteResult(
        sections=(uploads_section(figures, cfg),), figures=result, failed=figures.missing > 0
    )
