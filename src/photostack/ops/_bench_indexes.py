"""The `indexes` bench suite (issue 4 item 5): the write cost of each index.

A bare embedded Postgres (no cluster), one database per group with the product's tables made by
:func:`photostack.cluster.reshard_ops.prepare_storage` (what `up` and `add-shard` run). For each
table the app writes on the hot path — ``following`` and ``followers`` (social), ``photos`` — the
indexes are read from ``pg_indexes``; then rows are inserted into the emptied table:

- with every index (the anchor, measured in the same rounds);
- with each secondary index dropped in turn (the primary key stays: the app's upserts and
  idempotent follows need it);
- with the primary key only.

Rounds interleave the variants (so drift from other load hits each alike). The ratios use the
server backend's CPU time per row (user + system of the connection's Postgres process, read
with psutil), which other processes on shared cores do not inflate; wall rows/s is shown too.
An index's **write cost** is the share of the insert work it adds:
``1 - CPU/row without it / CPU/row with all``; the ratio column is ``CPU/row with all /
without`` (the speed-up without it), the median of each round's paired ratio. Commits do not
wait for the WAL flush (``synchronous_commit = off``): fsync time on a shared disk is not what
an index costs.
Rows are inserted in transactions of ``batch_rows`` (the per-commit cost, the same in every
variant, would otherwise drown the index maintenance).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import start_postgres
from photostack.cluster.reshard_ops import prepare_storage
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult

__all__ = ["IndexBenchConfig", "TableCost", "run_indexes_suite", "write_cost"]

ALL = "(all indexes)"
PKEY_ONLY = "(primary key only)"


@dataclass(frozen=True)
class IndexBenchConfig:
    rows: int = 60_000  # per measurement
    batch_rows: int = 500  # rows per transaction
    rounds: int = 5
    users: int = 2_000  # distinct user ids the rows refer to


@dataclass
class TableCost:
    group: str
    table: str
    primary_key: str
    indexes: dict[str, str] = field(default_factory=dict)  # secondary name -> definition
    rates: dict[str, list[float]] = field(default_factory=dict)  # variant -> rows/s per round
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # variant -> backend CPU/row

    def median(self, variant: str) -> float:
        values = self.rates.get(variant, [])
        return statistics.median(values) if values else float("nan")

    def cpu(self, variant: str) -> float:
        values = self.cpu_us.get(variant, [])
        return statistics.median(values) if values else float("nan")

    def paired(self, variant: str) -> float:
        """Median over rounds of ``CPU/row with all / CPU/row without`` (how many times faster
        the inserts are without the index), each ratio from one round's pair."""
        pairs = zip(self.cpu_us.get(ALL, []), self.cpu_us.get(variant, []), strict=False)
        ratios = [anchor / without for anchor, without in pairs if without > 0]
        return statistics.median(ratios) if ratios else float("nan")


def write_cost(ratio: float) -> float:
    """The share of insert work an index adds, from the speed-up without it:
    ``1 - 1 / ratio`` (0 when it costs nothing)."""
    if not ratio > 0:
        return float("nan")
    return 1.0 - 1.0 / ratio


def _rows_following(cfg: IndexBenchConfig, rng: random.Random) -> list[tuple[Any, ...]]:
    users = [f"u{i:06d}{rng.getrandbits(32):08x}" for i in range(cfg.users)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < cfg.rows:
        a, b = rng.sample(users, 2)
        pairs.add((a, b))
    ordered = sorted(pairs)
    rng.shuffle(ordered)  # arrival order: not sorted by key
    return [(a, b, start + timedelta(seconds=i)) for i, (a, b) in enumerate(ordered)]


def _rows_photos(cfg: IndexBenchConfig, rng: random.Random) -> list[tuple[Any, ...]]:
    users = [f"u{i:06d}{rng.getrandbits(32):08x}" for i in range(cfg.users)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(cfg.rows):
        owner = rng.choice(users)
        photo = f"{owner}_{i:016x}"
        ready = rng.random() < 0.9
        rows.append(
            (
                photo,
                owner,
                "a caption",
                start + timedelta(seconds=i),
                "ready" if ready else "processing",
                "image/jpeg",
                rng.randint(20_000, 4_000_000),
                f"originals/{photo}.jpg",
                f"thumbnails/{photo}.webp" if ready else None,
            )
        )
    return rows


# table -> (group, insert statement, row maker): the columns the app's writes fill
TABLES: dict[str, tuple[str, str, Callable[[IndexBenchConfig, random.Random], list[Any]]]] = {
    "following": (
        "social",
        "INSERT INTO following (user_id, target_id, created_at) VALUES ($1, $2, $3)",
        _rows_following,
    ),
    "followers": (
        "social",
        "INSERT INTO followers (user_id, follower_id, created_at) VALUES ($1, $2, $3)",
        _rows_following,
    ),
    "photos": (
        "photos",
        "INSERT INTO photos (id, owner_id, caption, created_at, status, content_type, "
        "size_bytes, original_key, thumbnail_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        _rows_photos,
    ),
}


def run_indexes_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    cfg = IndexBenchConfig()
    with tempfile.TemporaryDirectory(prefix="photostack-bench-indexes-") as tmp:
        try:
            pg = start_postgres(Path(tmp) / "pg", name="bench-indexes-pg")
        except EngineError as exc:
            raise SuiteError(f"cannot start postgres: {exc}") from exc
        try:
            costs = asyncio.run(measure(pg.dsn, cfg, out))
        except (OSError, asyncpg.PostgresError, EngineError) as exc:
            raise SuiteError(f"indexes bench: {exc}") from exc
        finally:
            pg.stop()
    return SuiteResult(sections=(section(costs, cfg),), figures=_json(costs))


async def _indexes(conn: asyncpg.Connection[Any], table: str) -> tuple[str, dict[str, str]]:
    """(primary key index, {secondary index: definition}) of ``table``, from the catalog."""
    pkey = await conn.fetchval(
        "SELECT i.relname FROM pg_constraint c JOIN pg_class i ON i.oid = c.conindid "
        "WHERE c.conrelid = $1::regclass AND c.contype = 'p'",
        table,
    )
    rows = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' AND tablename = $1 ORDER BY indexname",
        table,
    )
    return str(pkey), {r["indexname"]: r["indexdef"] for r in rows if r["indexname"] != pkey}


async def _insert(
    conn: asyncpg.Connection[Any],
    sql: str,
    rows: list[Any],
    batch_rows: int,
    backend: psutil.Process,
) -> tuple[float, float]:
    """(rows/s, server backend CPU µs per row) inserting ``rows`` in transactions of
    ``batch_rows``. CPU time, unlike wall time, does not grow when other processes share the
    machine's cores: it is what the ratios use."""
    cpu_before = backend.cpu_times()
    started = time.perf_counter()
    for offset in range(0, len(rows), batch_rows):
        async with conn.transaction():
            await conn.executemany(sql, rows[offset : offset + batch_rows])
    elapsed = time.perf_counter() - started
    cpu_after = backend.cpu_times()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return len(rows) / elapsed, cpu_s / len(rows) * 1e6


async def _variant(
    conn: asyncpg.Connection[Any],
    cost: TableCost,
    variant: str,
    *,
    sql: str,
    rows: list[Any],
    cfg: IndexBenchConfig,
    backend: psutil.Process,
) -> tuple[float, float]:
    dropped = list(cost.indexes) if variant == PKEY_ONLY else ([] if variant == ALL else [variant])
    await conn.execute(f"TRUNCATE {cost.table}")
    for name in dropped:
        await conn.execute(f"DROP INDEX {name}")
    try:
        await conn.execute("CHECKPOINT")  # each variant starts from the same clean state
        return await _insert(conn, sql, rows, cfg.batch_rows, backend)
    finally:
        await conn.execute(f"TRUNCATE {cost.table}")
        for name in dropped:
            await conn.execute(cost.indexes[name])


async def measure(dsn_of: Callable[[str], str], cfg: IndexBenchConfig, out: Out) -> list[TableCost]:
    costs: list[TableCost] = []
    rng = random.Random(7)
    for table, (group, sql, make_rows) in TABLES.items():
        dbname = f"bench_{group}"
        admin = await asyncpg.connect(dsn_of("postgres"))
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
                await admin.execute(f"CREATE DATABASE {dbname}")
        finally:
            await admin.close()
        await prepare_storage(group, dsn_of(dbname))
        # commits without waiting for the WAL flush: a shared disk's fsync time would drown the
        # index maintenance being measured (every variant commits as often)
        conn = await asyncpg.connect(dsn_of(dbname), server_settings={"synchronous_commit": "off"})
        try:
            pkey, indexes = await _indexes(conn, table)
            cost = TableCost(group, table, pkey, indexes)
            rows = make_rows(cfg, rng)
            variants = [ALL, *indexes, *([PKEY_ONLY] if len(indexes) > 1 else [])]
            out(f"  {table}: primary key {pkey}, secondary {', '.join(indexes) or 'none'}")
            backend = psutil.Process(int(await conn.fetchval("SELECT pg_backend_pid()")))
            await _variant(conn, cost, ALL, sql=sql, rows=rows, cfg=cfg, backend=backend)
            for round_ in range(cfg.rounds):
                for variant in variants if round_ % 2 == 0 else reversed(variants):
                    rate, cpu_us = await _variant(
                        conn, cost, variant, sql=sql, rows=rows, cfg=cfg, backend=backend
                    )
                    cost.rates.setdefault(variant, []).append(rate)
                    cost.cpu_us.setdefault(variant, []).append(cpu_us)
            out(
                "    "
                + ", ".join(
                    f"{v}: {cost.median(v):,.0f} rows/s, {cost.cpu(v):.1f} us/row" for v in variants
                )
            )
            costs.append(cost)
        finally:
            await conn.close()
    return costs


def section(costs: list[TableCost], cfg: IndexBenchConfig) -> Section:
    rows = []
    for cost in costs:
        anchor = cost.median(ALL)
        rows.append(
            (
                f"{cost.table}",
                ALL + f", pk {cost.primary_key}",
                fmt(anchor, 0),
                fmt(cost.cpu(ALL), 1),
                "1.00",
                "",
            )
        )
        for name in [*cost.indexes, PKEY_ONLY]:
            if name not in cost.rates:
                continue
            ratio = cost.paired(name)
            label = f"without {name}" if name != PKEY_ONLY else PKEY_ONLY
            rows.append(
                (
                    cost.table,
                    label,
                    fmt(cost.median(name), 0),
                    fmt(cost.cpu(name), 1),
                    fmt(ratio, 2),
                    f"{write_cost(ratio) * 100:.0f} %",
                )
            )
    return Section(
        "Write cost of each index",
        (
            Paragraph(
                f"Inserts of {cfg.rows:,} rows in transactions of {cfg.batch_rows} into each "
                "emptied table of a bare embedded Postgres, the product's schema and indexes "
                f"(names read from `pg_indexes`), `synchronous_commit = off` (the disk's flush "
                f"time is not the index's); {cfg.rounds} interleaved rounds. Anchor: the same "
                "inserts with every index in each round. Ratios use the Postgres backend's CPU "
                "time per row (the cores are shared with other work, which inflates wall time "
                "but not CPU time): the median of the rounds' paired ratios."
            ),
            Table(
                (
                    "table",
                    "variant",
                    "rows/s (wall)",
                    "backend CPU µs/row",
                    "speed-up vs all indexes",
                    "index's share of insert CPU",
                ),
                tuple(rows),
                numeric_from=2,
            ),
            Bullets(
                (
                    "Each secondary index names the query it serves in `service/schema.py` "
                    "(`INDEX_QUERIES`); `tests/component/test_indexes.py` checks the plans.",
                    "The primary keys stay in every variant: follow/unfollow are idempotent "
                    "upserts on them and photo ids are looked up by them.",
                )
            ),
        ),
    )


def _json(costs: list[TableCost]) -> dict[str, Any]:
    return {
        cost.table: {
            "primary_key": cost.primary_key,
            "rows_per_s": {v: cost.median(v) for v in cost.rates},
            "backend_cpu_us_per_row": {v: cost.cpu(v) for v in cost.cpu_us},
            "ratio_without_vs_all": {n: cost.paired(n) for n in cost.rates if n != ALL},
            "write_cost": {n: write_cost(cost.paired(n)) for n in cost.rates if n != ALL},
        }
        for cost in costs
    }
