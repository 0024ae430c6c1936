"""The `reshard` bench suite (issue 4): `photostack reshard add-shard social` under load.

One cluster of a small bench topology (``social`` on two shards, no replicas), started with
`photostack up`. Users and follow edges are seeded through the edge; a read/write loop (follow /
unfollow and reads of following lists and users, through the edge) runs for a fixed window
first — the anchor: requests/s with no move — then keeps running while
`photostack reshard add-shard social` (the CLI, like a user) moves a third of the logical
shards to a new shard. Reported: logical shards and rows moved against the ideal ``k / (n + 1)``,
the move's duration and cut-over window, requests during the move and how many failed (goal 0),
requests/s during the move against the anchor, and edges not readable afterwards (goal 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from photostack.blocks.storage import stable_hash64
from photostack.ops._bench_procs import (
    CLUSTER_READY_PREFIX,
    BenchError,
    ServerProcess,
    free_port_base,
)
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = ["BENCH_TOPOLOGY", "ReshardBenchConfig", "run_reshard_suite"]

BENCH_TOPOLOGY = """
[cluster]
name = "photostack-reshard-bench"
[edge]
count = 1
[web]
count = 1
[app]
count = 2
[cache]
count = 1
[storage.users]
shards = 1
replicas = 0
[storage.social]
shards = 2
replicas = 0
[storage.photos]
shards = 1
replicas = 0
[directory]
count = 2
replicas = 1
[workers]
count = 0
[queue]
replicas = 0
"""
GROUP = "social"
SHARDS_BEFORE = 2


@dataclass(frozen=True)
class ReshardBenchConfig:
    users: int = 300
    edges: int = 2400
    workers: int = 6  # load loops; each writes as its own slice of the users (no races)
    anchor_window_s: float = 6.0
    move_deadline_s: float = 300.0
    max_ops_per_worker: int = 200_000


@dataclass
class Loop:
    ops: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else float("nan")


@dataclass
class Figures:
    anchor: Loop = field(default_factory=Loop)
    during: Loop = field(default_factory=Loop)
    move: dict[str, Any] = field(default_factory=dict)
    edges_checked: int = 0
    unreadable: int = 0
    workers: int = 0
    keys_total: int = 0  # users (the social sharding key) ...
    keys_moved: int = 0  # ... whose owner the move changed


def run_reshard_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    cfg = ReshardBenchConfig()
    try:
        with _cluster(options, out) as urls:
            figures = asyncio.run(measure(urls, cfg, out))
    except (BenchError, httpx.HTTPError, OSError, TimeoutError) as exc:
        raise SuiteError(f"reshard bench: {exc}") from exc
    return SuiteResult(
        sections=(section(figures),),
        figures=_json(figures),
        failed=figures.during.failed > 0 or figures.unreadable > 0,
    )


@contextlib.contextmanager
def _cluster(options: SuiteOptions, out: Out) -> Iterator[dict[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="photostack-reshard-bench-"))
    topology = work / "topology.toml"
    topology.write_text(BENCH_TOPOLOGY, encoding="utf-8")
    base = options.port_base or free_port_base()
    data = work / "data"
    argv = [sys.executable, "-m", "photostack.cli", "up", "--topology", str(topology)]
    argv += ["--data-dir", str(data), "--port-base", str(base)]
    out(f"  starting a cluster (social on {SHARDS_BEFORE} shards) on port base {base}")
    server = ServerProcess(argv, "photostack up")
    try:
        server.wait_for_line(CLUSTER_READY_PREFIX, options.ready_deadline_s)
        yield {
            "api": f"http://127.0.0.1:{base}",
            "control": f"http://127.0.0.1:{base + 10}",
            "data_dir": str(data),
        }
    finally:
        server.stop(options.stop_timeout_s)
        from photostack.cluster.engines import discard_postgres_data

        discard_postgres_data(data)
        out(f"  cluster logs kept in {data / 'logs'}")


class Workload:
    """Users, their tokens and the follow edges that must exist; each worker owns a slice of
    the followers, so the expected set is exact under concurrency."""

    def __init__(self, users: list[dict[str, Any]], workers: int) -> None:
        self.ids = [u["id"] for u in users]
        self.headers = {u["id"]: {"Authorization": f"Bearer {u['token']}"} for u in users}
        self.slices = [self.ids[w::workers] for w in range(workers)]
        self.expected: set[tuple[str, str]] = set()


async def _seed(api: httpx.AsyncClient, cfg: ReshardBenchConfig) -> Workload:
    gate = asyncio.Semaphore(16)

    async def new_user(i: int) -> dict[str, Any]:
        async with gate:
            name = f"rb{i}_{uuid.uuid4().hex[:10]}"
            answer = await api.post("/v1/users", json={"username": name})
            if answer.status_code != 201:
                raise BenchError(f"seeding users: {answer.status_code} {answer.text[:200]}")
            body: dict[str, Any] = answer.json()
            return body

    users = await asyncio.gather(*(new_user(i) for i in range(cfg.users)))
    work = Workload(list(users), cfg.workers)
    rng = random.Random(4)
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < cfg.edges:
        a, b = rng.sample(work.ids, 2)
        pairs.add((a, b))

    async def follow(a: str, b: str) -> None:
        async with gate:
            answer = await api.put(f"/v1/users/{a}/following/{b}", headers=work.headers[a])
            if answer.status_code != 204:
                raise BenchError(f"seeding edges: {answer.status_code} {answer.text[:200]}")

    await asyncio.gather(*(follow(a, b) for a, b in sorted(pairs)))
    work.expected = pairs
    return work


async def _loop(
    api: httpx.AsyncClient,
    work: Workload,
    worker: int,
    stop: asyncio.Event,
    loop: Loop,
    *,
    max_ops: int,
) -> None:
    """Follow/unfollow as this worker's users, and read, until ``stop`` (bounded by count)."""
    rng = random.Random(100 + worker)
    mine = work.slices[worker]
    done = 0
    while not stop.is_set() and done < max_ops:
        a, b = rng.choice(mine), rng.choice(work.ids)
        if a == b:
            continue
        path = f"/v1/users/{a}/following/{b}"
        answers = []
        try:
            if (a, b) in work.expected and rng.random() < 0.4:
                answers.append(await api.delete(path, headers=work.headers[a]))
                work.expected.discard((a, b))
            else:
                answers.append(await api.put(path, headers=work.headers[a]))
                work.expected.add((a, b))
            answers.append(await api.get(f"/v1/users/{a}/following", params={"limit": 100}))
            answers.append(await api.get(f"/v1/users/{b}"))
        except httpx.HTTPError as exc:
            loop.failed += 1
            loop.errors.append(repr(exc)[:200])
        for answer in answers:
            loop.ops += 1
            done += 1
            if answer.status_code not in (200, 204):
                loop.failed += 1
                loop.errors.append(f"{answer.request.url.path} {answer.status_code}")


async def _run_loops(
    api: httpx.AsyncClient, work: Workload, cfg: ReshardBenchConfig, stop: asyncio.Event
) -> Loop:
    loop = Loop()
    started = time.monotonic()
    await asyncio.gather(
        *(
            _loop(api, work, w, stop, loop, max_ops=cfg.max_ops_per_worker)
            for w in range(cfg.workers)
        )
    )
    loop.elapsed_s = time.monotonic() - started
    return loop


async def _cli(data_dir: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "photostack.cli",
        *args,
        "--data-dir",
        data_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def _wait_move(control: httpx.AsyncClient, deadline_s: float) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status = (await control.get("/v1/reshard")).raise_for_status().json()
        moves = status.get("moves", [])
        if moves and moves[0]["state"] in ("done", "cancelled"):
            move: dict[str, Any] = moves[0]
            return move
        await asyncio.sleep(0.5)  # polling the move's persisted state under a deadline
    raise BenchError(f"the move did not finish within {deadline_s:.0f} s")


async def _owners(control: httpx.AsyncClient, work: Workload) -> dict[str, str]:
    """Each user's social owner (its primary's node name) by the directory's current map."""
    shard_map = (await control.get("/v1/directory/map")).raise_for_status().json()
    group = shard_map["groups"][GROUP]
    count = int(group["partitioner"]["logical_shards"])
    names = {int(s["index"]): s["primary"]["name"] for s in group["shards"]}
    placement = [int(p) for p in group["placement"]]  # logical shard i -> physical index
    return {k: names[placement[stable_hash64(k) % count]] for k in work.ids}


async def _unreadable(api: httpx.AsyncClient, work: Workload) -> tuple[int, int]:
    """(edges checked, edges missing or extra) over every user's following list."""
    bad = 0
    for user in work.ids:
        answer = await api.get(f"/v1/users/{user}/following", params={"limit": 100})
        if answer.status_code != 200:
            bad += sum(1 for a, _ in work.expected if a == user) or 1
            continue
        seen = {u["id"] for u in answer.json()["items"]}
        want = {b for a, b in work.expected if a == user}
        bad += len(seen ^ want)
    return len(work.expected), bad


async def measure(urls: dict[str, str], cfg: ReshardBenchConfig, out: Out) -> Figures:
    figures = Figures(workers=cfg.workers)
    async with (
        httpx.AsyncClient(base_url=urls["api"], timeout=15) as api,
        httpx.AsyncClient(base_url=urls["control"], timeout=30) as control,
    ):
        out(f"  seeding {cfg.users} users and {cfg.edges} follow edges")
        work = await _seed(api, cfg)
        stop = asyncio.Event()
        anchor = asyncio.create_task(_run_loops(api, work, cfg, stop))
        await asyncio.sleep(cfg.anchor_window_s)  # the anchor's measuring window
        stop.set()
        figures.anchor = await anchor
        out(f"  anchor (no move): {figures.anchor.ops} requests, {figures.anchor.rate:.0f}/s")

        before = await _owners(control, work)
        stop = asyncio.Event()
        during = asyncio.create_task(_run_loops(api, work, cfg, stop))
        try:
            code, stdout, stderr = await _cli(urls["data_dir"], "reshard", "add-shard", GROUP)
            if code != 0:
                raise BenchError(f"reshard add-shard {GROUP}: {stderr.strip() or stdout.strip()}")
            out(f"  {stdout.strip()}")
            figures.move = await _wait_move(control, cfg.move_deadline_s)
        finally:
            stop.set()
            figures.during = await during
        out(
            f"  move {figures.move.get('state')}: {figures.during.ops} requests during it, "
            f"{figures.during.failed} failed"
        )
        after = await _owners(control, work)
        figures.keys_total = len(work.ids)
        figures.keys_moved = sum(1 for k in work.ids if before[k] != after[k])
        figures.edges_checked, figures.unreadable = await _unreadable(api, work)
        out(f"  after: {figures.unreadable} of {figures.edges_checked} edges not as written")
    return figures


def section(figures: Figures) -> Section:
    move = figures.move
    progress = move.get("progress", {})
    logical = int(move.get("logical_shards", 0)) or 1
    moved = int(move.get("moves", 0))
    ideal = 1.0 / (SHARDS_BEFORE + 1)
    anchor, during = figures.anchor, figures.during
    rows = (
        (
            "logical shards moved",
            f"{moved} of {logical} ({moved / logical:.4f})",
            f"{ideal:.4f}",
            fmt(moved / logical / ideal, 3),
        ),
        (
            "rows moved (following + followers)",
            f"{progress.get('rows_moved', 'n/a')} of {progress.get('rows_total', 'n/a')}",
            f"{progress.get('rows_ideal', 'n/a')}",
            fmt(float(progress.get("moved_vs_ideal", float("nan"))), 3),
        ),
        (
            "users (sharding keys) moved",
            f"{figures.keys_moved} of {figures.keys_total}",
            fmt(figures.keys_total * ideal, 1),
            fmt(figures.keys_moved / max(1, figures.keys_total) / ideal, 3),
        ),
        ("move duration (s)", fmt(float(progress.get("duration_s", float("nan"))), 2), "", ""),
        ("cut-over window (s)", fmt(float(progress.get("cutover_s", float("nan"))), 3), "", ""),
        ("requests during the move", fmt(during.ops), "", ""),
        ("requests failed (goal 0)", str(during.failed), "0", ""),
        (
            "requests/s during vs no move (anchor)",
            fmt(during.rate, 0),
            fmt(anchor.rate, 0),
            fmt(during.rate / anchor.rate, 2),
        ),
        ("edges not readable afterwards (goal 0)", str(figures.unreadable), "0", ""),
    )
    return Section(
        "Online resharding: add-shard under load",
        (
            Paragraph(
                f"`photostack reshard add-shard {GROUP}` on a running cluster ({GROUP} on "
                f"{SHARDS_BEFORE} shards -> 3), {figures.workers} load loops through the edge "
                "(follow/unfollow, following lists, users) during the whole move. The ideal "
                f"share a new shard takes is k/(n+1) = 1/{SHARDS_BEFORE + 1}; the issue's goal "
                "is at most 1.05 x that and no failed request."
            ),
            Table(("figure", "measured", "ideal / anchor", "ratio"), rows),
            Bullets(
                (
                    "Logical shards move whole: the plan gives the new shard floor(L/(n+1)) of "
                    "L = 128, so the logical ratio is at most 1 and the expected share of keys "
                    "moved equals it. Users (keys) and rows follow the keys' hash, so with a few "
                    "hundred users their ratio scatters around it by several per cent.",
                    'Requests wait through the cut-over (the old owner answers "wrong shard" '
                    "until the map is published) instead of failing; see docs/resharding.md.",
                    f"Edges checked afterwards: {figures.edges_checked}, each user's following "
                    "list read through the edge from its one owner.",
                )
            ),
        ),
    )


def _json(figures: Figures) -> dict[str, Any]:
    move = figures.move
    logical = int(move.get("logical_shards", 0)) or 1
    return {
        "logical_moved": move.get("moves"),
        "logical_shards": move.get("logical_shards"),
        "moved_vs_ideal_logical": int(move.get("moves", 0)) / logical * (SHARDS_BEFORE + 1),
        "progress": move.get("progress", {}),
        "anchor_rps": figures.anchor.rate,
        "during_rps": figures.during.rate,
        "requests_during": figures.during.ops,
        "failed": figures.during.failed,
        "errors": figures.during.errors[:10],
        "keys_moved": figures.keys_moved,
        "keys_total": figures.keys_total,
        "edges_checked": figures.edges_checked,
        "unreadable": figures.unreadable,
    }
