"""Suite ``cacheproduct``: the distributed cache tier and the product's cached reads.

1. The ring client's overhead over a direct redis-py call (same nodes, same keys, same load).
2. Database load while a cache node is killed under a Zipf read load, with and without
   single-flight (loads/s from the loader and xact_commit/s from pg_stat_database).
3. On a running cluster (`photostack up`, 2 app nodes, 3 cache nodes, small local caches): the
   app nodes' local hit ratio under round-robin balancing vs hash affinity on the user id
   (read from each app node's /metrics), the seed's claim that random balancing lowers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from photostack.blocks.cache import (
    CacheNodeAddress,
    GlobalReadThrough,
    ReadThroughConfig,
    RingCache,
    RingCacheConfig,
)
from photostack.cluster.engines import EngineError, RedisConfig, RedisEngine, discard_postgres_data
from photostack.cluster.engines.testing import (
    EngineProcess,
    free_port,
    start_engine,
    start_postgres,
)
from photostack.cluster.topology import CONTROL_PORT_OFFSET, Role, layout, parse_topology
from photostack.ops._bench_cache import zipf_stream
from photostack.ops._bench_procs import BenchError, ServerProcess, free_port_base
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = ["local_hit_ratios", "run_cache_product_suite"]

HOST = "127.0.0.1"
SEED = 20_261_127
ZIPF_S = 1.0
KEYS = 2_000
OVERHEAD_OPS = 6_000
KILL_READERS = 64
KILL_RUN_S = 6.0
KILL_AT_S = 2.0
QUERY_COST_S = 0.005  # pg_sleep per load: a profile read is a few statements
USERS_PER_PHASE = 600
READS_PER_PHASE = 4_000
LOCAL_MAX_ENTRIES = 120
_METRIC = re.compile(
    r'^photostack_cache_requests_total\{policy="[^"]*",result="(\w+)",tier="local",'
    r'type="user"\} ([0-9.e+]+)$',
    re.M,
)

TOPOLOGY = f"""
[cluster]
name = "photostack-bench-cache"
host = "{HOST}"
[edge]
count = 1
[web]
count = 1
strategy = "round-robin"
hash_key = "path:3"
[app]
count = 2
[cache]
count = 3
engine = "redis"
local_max_entries = {LOCAL_MAX_ENTRIES}
[storage.users]
shards = 1
replicas = 0
[storage.social]
shards = 1
replicas = 0
[storage.photos]
shards = 1
replicas = 0
"""


# -- 1 + 2: the ring over three redis-servers ---------------------------------------------


@contextlib.contextmanager
def _redis_nodes(work: Path, count: int) -> Iterator[list[tuple[str, RedisEngine, EngineProcess]]]:
    started: list[tuple[str, RedisEngine, EngineProcess]] = []
    try:
        for i in range(1, count + 1):
            cfg = RedisConfig(
                name=f"bench-cache-{i}",
                port=free_port(),
                data_dir=work / f"cache-{i}",
                log_path=work / f"cache-{i}.log",
            )
            engine = RedisEngine(cfg)
            started.append((f"cache-{i}", engine, start_engine(engine, log_path=cfg.log_path)))
        yield started
    except EngineError as exc:
        raise SuiteError(f"cannot start redis-server: {exc}") from exc
    finally:
        for _, _, proc in started:
            proc.stop()


def _addresses(nodes: list[tuple[str, RedisEngine, EngineProcess]]) -> list[CacheNodeAddress]:
    return [CacheNodeAddress(name, HOST, engine.config.port) for name, engine, _ in nodes]


@dataclass(frozen=True)
class Overhead:
    direct_ops_per_s: float
    ring_ops_per_s: float
    direct_us: float
    ring_us: float


async def _overhead(addresses: list[CacheNodeAddress], concurrency: int) -> Overhead:
    ring = RingCache(addresses, RingCacheConfig())
    await ring.start()
    direct = {a.name: aioredis.Redis(host=a.host, port=a.port, protocol=2) for a in addresses}
    keys = [f"k{i}" for i in range(KEYS)]
    try:
        for key in keys:
            await ring.set(key, b"x" * 100, 600)
            await direct[ring.ring.node_for(key)].set(f"d{key}", b"x" * 100)
        order = [keys[i % KEYS] for i in range(OVERHEAD_OPS)]

        async def run(get: Any) -> tuple[float, float]:
            queue = iter(order)
            latencies: list[float] = []

            async def worker() -> None:
                for key in queue:
                    t0 = time.perf_counter()
                    await get(key)
                    latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - started
            return len(order) / wall, 1e6 * sum(latencies) / len(latencies)

        async def direct_get(key: str) -> Any:
            return await direct[ring.ring.node_for(key)].get(f"d{key}")

        await run(direct_get)  # warm both paths' connection pools
        await run(ring.get)
        d_ops, d_us = await run(direct_get)
        r_ops, r_us = await run(ring.get)
        return Overhead(d_ops, r_ops, d_us, r_us)
    finally:
        await ring.aclose()
        for client in direct.values():
            await client.aclose()


@dataclass(frozen=True)
class KillRun:
    single_flight: bool
    reads: int
    errors: int
    loads_before_per_s: float
    loads_after_peak_per_s: float  # the worst 250 ms window after the kill, per second
    commits_after_per_s: float  # xact_commit/s on the database in the second after the kill
    loads_after: int  # loads from the kill to the end of the run
    keys_loaded_after: int  # distinct keys among them (the floor: one load per lost key)
    max_loads_one_key: int  # the worst key: how many loads it caused after the kill


async def _kill_run(
    nodes: list[tuple[str, RedisEngine, EngineProcess]], dsn: str, *, single_flight: bool
) -> KillRun:
    ring = RingCache(_addresses(nodes), RingCacheConfig(probe_interval_s=0.25))
    await ring.start()
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=32)
    assert pool is not None
    loads: list[tuple[float, str]] = []

    async def loader(key: str) -> bytes | None:
        loads.append((time.monotonic(), key))
        value = await pool.fetchval(
            "SELECT payload FROM bench_items, pg_sleep($2) WHERE id = $1",
            int(key.removeprefix("k")),
            QUERY_COST_S,
        )
        return value if isinstance(value, bytes) else None

    cache = GlobalReadThrough(
        ring, loader, ReadThroughConfig(ttl_s=600.0, beta=0.0), single_flight=single_flight
    )
    stream = zipf_stream(KEYS, ZIPF_S, 200_000, random.Random(SEED))
    for key in range(KEYS):  # warm: every key cached
        await cache.lookup(f"k{key}")
    reads = errors = 0
    commits: list[int] = []
    started = time.monotonic()
    deadline = started + KILL_RUN_S
    victim = nodes[1][2]

    async def reader(offset: int) -> None:
        nonlocal reads, errors
        i = offset
        while time.monotonic() < deadline:
            try:
                await cache.lookup(f"k{stream[i % len(stream)]}")
            except (asyncpg.PostgresError, OSError, TimeoutError):  # counted, never fatal
                errors += 1
            reads += 1
            i += KILL_READERS

    async def killer() -> None:
        await asyncio.sleep(KILL_AT_S)
        async with pool.acquire() as conn:
            before = await _commits(conn)
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(1.0)
            commits.append(await _commits(conn) - before)

    loads.clear()
    await asyncio.gather(killer(), *(reader(k) for k in range(KILL_READERS)))
    await ring.aclose()
    await pool.close()
    kill_at = started + KILL_AT_S
    before = [t for t, _ in loads if started <= t < kill_at]
    after = [(t, k) for t, k in loads if t >= kill_at]
    windows = [
        sum(1 for t, _ in after if kill_at + w * 0.25 <= t < kill_at + (w + 1) * 0.25)
        for w in range(int((KILL_RUN_S - KILL_AT_S) / 0.25))
    ]
    return KillRun(
        single_flight=single_flight,
        reads=reads,
        errors=errors,
        loads_before_per_s=len(before) / KILL_AT_S,
        loads_after_peak_per_s=max(windows, default=0) * 4.0,
        commits_after_per_s=float(commits[0]) if commits else 0.0,
        loads_after=len(after),
        keys_loaded_after=len({k for _, k in after}),
        max_loads_one_key=max(Counter(k for _, k in after).values(), default=0),
    )


async def _commits(conn: Any) -> int:
    value = await conn.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    return int(value)


def _tier_figures(options: SuiteOptions, out: Out) -> tuple[Overhead, list[KillRun]]:
    with tempfile.TemporaryDirectory(prefix="photostack-bench-ring-") as tmp:
        work = Path(tmp)
        try:
            pg = start_postgres(work / "pg", name="bench-cache-pg")
        except EngineError as exc:
            raise SuiteError(f"cannot start postgres: {exc}") from exc
        try:
            pg.create_database("bench")
            dsn = pg.dsn("bench")

            async def seed() -> None:
                conn = await asyncpg.connect(dsn)
                try:
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS bench_items (id int PRIMARY KEY, payload bytea)"
                    )
                    await conn.executemany(
                        "INSERT INTO bench_items VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        [(i, b"p" * 200) for i in range(KEYS)],
                    )
                finally:
                    await conn.close()

            asyncio.run(seed())
            with _redis_nodes(work, 3) as nodes:
                out(f"ring overhead: {OVERHEAD_OPS} GETs, {options.concurrency} in flight")
                overhead = asyncio.run(_overhead(_addresses(nodes), options.concurrency))
            runs = []
            for single_flight in (True, False):
                with _redis_nodes(work / f"sf{single_flight}", 3) as nodes:
                    out(f"cache-node kill under load, single-flight={single_flight}")
                    runs.append(asyncio.run(_kill_run(nodes, dsn, single_flight=single_flight)))
        finally:
            pg.stop()
    return overhead, runs


# -- 3: local hit ratio on a cluster, round-robin vs hash affinity -------------------------


def local_hit_ratios(metrics_texts: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Per app node: (local hits, local lookups) of users, from /metrics texts."""
    out: dict[str, tuple[float, float]] = {}
    for name, text in metrics_texts.items():
        counts = {result: float(value) for result, value in _METRIC.findall(text)}
        hits = counts.get("hit", 0.0) + counts.get("stale", 0.0)
        out[name] = (hits, hits + counts.get("miss", 0.0))
    return out


@dataclass(frozen=True)
class AffinityPhase:
    strategy: str
    per_node: dict[str, float]  # local hit ratio per app node
    overall: float
    errors: int


def _cluster_phases(options: SuiteOptions, out: Out) -> list[AffinityPhase]:
    base = free_port_base(HOST)
    lay = layout(parse_topology(TOPOLOGY), base)
    apps = {n.name: f"http://{n.host}:{n.port}" for n in lay.by_role(Role.APP)}
    data_dir = Path(tempfile.mkdtemp(prefix="photostack-bench-cacheproduct-"))
    topology = data_dir / "topology.toml"
    topology.write_text(TOPOLOGY, encoding="utf-8")
    argv = [sys.executable, "-m", "photostack.cli", "up", "--topology", str(topology)]
    argv += ["--data-dir", str(data_dir / "data"), "--port-base", str(base)]
    out(f"starting a cluster: photostack up --port-base {base} (2 app, 3 cache nodes)")
    cluster = ServerProcess(argv, "photostack up")
    try:
        cluster.wait_for_line("ready: ", options.ready_deadline_s, echo=out)
        api = f"http://{HOST}:{base}"
        control = f"http://{HOST}:{base + CONTROL_PORT_OFFSET}"
        phases = []
        for strategy in ("round-robin", "hash"):
            r = httpx.put(f"{control}/v1/pools/app/strategy", json={"strategy": strategy})
            if r.status_code >= 300:
                raise SuiteError(f"cannot set strategy {strategy}: {r.status_code} {r.text}")
            phases.append(asyncio.run(_phase(api, apps, strategy, options, out)))
        return phases
    except BenchError as exc:
        raise SuiteError(str(exc)) from exc
    finally:
        cluster.stop(options.stop_timeout_s)
        discard_postgres_data(data_dir / "data")
        shutil.rmtree(data_dir, ignore_errors=True)


async def _phase(
    api: str, apps: dict[str, str], strategy: str, options: SuiteOptions, out: Out
) -> AffinityPhase:
    limits = httpx.Limits(max_connections=options.concurrency)
    async with httpx.AsyncClient(base_url=api, timeout=30.0, limits=limits) as client:
        tag = f"{strategy[:4]}{random.Random().randrange(1 << 30):x}"
        sem = asyncio.Semaphore(options.concurrency)

        async def create(i: int) -> str:
            async with sem:
                r = await client.post("/v1/users", json={"username": f"b{tag}_{i}"})
            if r.status_code != 201:
                raise SuiteError(f"POST /v1/users answered {r.status_code}")
            return str(r.json()["id"])

        out(f"{strategy}: creating {USERS_PER_PHASE} users")
        ids = await asyncio.gather(*(create(i) for i in range(USERS_PER_PHASE)))
        stream = zipf_stream(USERS_PER_PHASE, ZIPF_S, READS_PER_PHASE, random.Random(SEED))
        before = await _scrape(apps)
        errors = 0

        async def read(index: int) -> None:
            nonlocal errors
            async with sem:
                r = await client.get(f"/v1/users/{ids[index]}")
            errors += r.status_code != 200

        out(f"{strategy}: {READS_PER_PHASE} Zipf reads")
        await asyncio.gather(*(read(i) for i in stream))
        after = await _scrape(apps)
    per_node = {}
    hits_total = lookups_total = 0.0
    for name in apps:
        hits = after[name][0] - before[name][0]
        lookups = after[name][1] - before[name][1]
        per_node[name] = hits / lookups if lookups else 0.0
        hits_total += hits
        lookups_total += lookups
    overall = hits_total / lookups_total if lookups_total else 0.0
    return AffinityPhase(strategy, per_node, overall, errors)


async def _scrape(apps: dict[str, str]) -> dict[str, tuple[float, float]]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        texts = {name: (await client.get(f"{url}/metrics")).text for name, url in apps.items()}
    return local_hit_ratios(texts)


# -- the suite -------------------------------------------------------------------------------


def run_cache_product_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    overhead, runs = _tier_figures(options, out)
    phases = _cluster_phases(options, out)
    failed = any(r.errors for r in runs) or any(p.errors for p in phases)
    ratio = overhead.ring_us / overhead.direct_us if overhead.direct_us else 0.0
    rr, hashed = phases
    sections = (
        Section(
            "Cache product: ring client overhead",
            (
                Paragraph(
                    f"{OVERHEAD_OPS:,} GETs of 100-byte values over {KEYS:,} keys on 3 "
                    f"redis-servers, {options.concurrency} in flight. Anchor: a direct redis-py "
                    "GET on the key's node. The ring client adds the route (xxh3 ring lookup), "
                    "the epoch read (MGET epoch key) and the epoch tag check."
                ),
                Table(
                    headers=("path", "ops/s", "mean µs/op", "vs direct"),
                    rows=(
                        (
                            "direct redis-py",
                            f"{overhead.direct_ops_per_s:,.0f}",
                            f"{overhead.direct_us:.0f}",
                            "1.00x",
                        ),
                        (
                            "RingCache.get",
                            f"{overhead.ring_ops_per_s:,.0f}",
                            f"{overhead.ring_us:.0f}",
                            f"{ratio:.2f}x",
                        ),
                    ),
                ),
            ),
        ),
        Section(
            "Cache product: database load during a cache-node kill",
            (
                Paragraph(
                    f"{KILL_READERS} readers, Zipf(s={ZIPF_S}) over {KEYS:,} keys, global "
                    f"read-through over 3 redis-servers (remap), every key cached first; one "
                    f"node SIGKILLed {KILL_AT_S:.0f} s into a {KILL_RUN_S:.0f} s run. A load is "
                    f"a Postgres query costing {QUERY_COST_S * 1000:.0f} ms (pg_sleep). Anchor: "
                    "the same run with single-flight."
                ),
                Table(
                    headers=(
                        "single-flight",
                        "reads",
                        "errors",
                        "loads/s before",
                        "peak loads/s after (250 ms)",
                        "xact_commit/s, 1 s after",
                        "loads after kill",
                        "keys loaded",
                        "loads per key",
                        "max loads of one key",
                    ),
                    rows=tuple(
                        (
                            "on" if r.single_flight else "off",
                            f"{r.reads:,}",
                            f"{r.errors}",
                            f"{r.loads_before_per_s:,.0f}",
                            f"{r.loads_after_peak_per_s:,.0f}",
                            f"{r.commits_after_per_s:,.0f}",
                            f"{r.loads_after:,}",
                            f"{r.keys_loaded_after:,}",
                            f"{r.loads_after / max(1, r.keys_loaded_after):.2f}",
                            f"{r.max_loads_one_key}",
                        )
                        for r in runs
                    ),
                ),
            ),
        ),
        Section(
            "Cache product: local hit ratio, round-robin vs hash affinity",
            (
                Paragraph(
                    f"A cluster with 2 app nodes (local LRU caches of {LOCAL_MAX_ENTRIES} "
                    f"entries), 3 cache nodes; per phase {USERS_PER_PHASE} new users and "
                    f"{READS_PER_PHASE:,} Zipf(s={ZIPF_S}) reads of GET /v1/users/{{id}} through "
                    "the edge. The web node balances its app pool round-robin, then by hash of "
                    'the user id (`[web] hash_key = "path:3"`, bounded load ε=0.25). Ratios '
                    'from the app nodes\' photostack_cache_requests_total{tier="local"}.'
                ),
                Table(
                    headers=("strategy", *sorted(rr.per_node), "overall", "errors"),
                    rows=tuple(
                        (
                            p.strategy,
                            *(f"{p.per_node[n]:.3f}" for n in sorted(p.per_node)),
                            f"{p.overall:.3f}",
                            f"{p.errors}",
                        )
                        for p in phases
                    ),
                ),
                Bullets(
                    (
                        f"hash affinity / round-robin local hit ratio: "
                        f"{hashed.overall / rr.overall if rr.overall else 0.0:.2f}x",
                    )
                ),
            ),
        ),
    )
    figures: dict[str, Any] = {
        "overhead": vars(overhead),
        "kill": [vars(r) for r in runs],
        "affinity": [vars(p) for p in phases],
    }
    return SuiteResult(sections=sections, figures=figures, failed=failed)
