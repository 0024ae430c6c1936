"""Hot-shard detection and shard skew: rows and transactions per second of every physical shard.

Load figures come from ``pg_stat_database`` on each shard's primary (``xact_commit +
xact_rollback`` of the photostack database). :func:`sample_loads` samples twice ``interval_s``
apart (``photostack reshard hot-shard``); :class:`SkewTracker` instead remembers the previous
sample of each group and gives tx/s since then, so ``photostack status`` and the control API's
``/metrics`` need no sampling wait.

**Skew is std / mean** (the coefficient of variation: 0.0 is even, the same figure as the ring
benchmark's load skew) of the per-shard figures: ``rows_skew`` over the group's rows per shard
(``photostack_shard_skew{group}``), ``load_skew`` over tx/s per shard
(``photostack_shard_load_skew{group}``). :func:`plan_hot` in :mod:`._reshard_plan` turns load
figures into a move off the hottest shard.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ._reshard_plan import GROUP_TABLES, skew

__all__ = ["GroupLoad", "GroupSkew", "SkewTracker", "sample_group", "sample_loads", "spread"]

_XACTS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


def spread(values: Sequence[float]) -> float:
    """Population std / mean of ``values`` (0.0: even, or nothing to compare)."""
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


@dataclass(frozen=True)
class GroupLoad:
    group: str
    tps: tuple[float, ...]  # per physical shard, index order

    @property
    def skew(self) -> float:
        """std / mean of tx/s per shard."""
        return spread(self.tps)

    @property
    def hottest(self) -> int:
        return max(range(len(self.tps)), key=lambda i: self.tps[i]) if self.tps else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "tps": [round(t, 1) for t in self.tps],
            "skew": round(self.skew, 3),
            "max_over_mean": round(skew(self.tps), 3),
            "hottest": self.hottest + 1,
        }


async def _xacts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        return int(await conn.fetchval(_XACTS))
    finally:
        await conn.close()


async def sample_loads(group: str, dsns: Sequence[str], interval_s: float = 1.0) -> GroupLoad:
    """Transactions/s of each shard over ``interval_s``. Raises OSError / asyncpg errors."""
    started = time.monotonic()
    before = await asyncio.gather(*(_xacts(d) for d in dsns))
    await asyncio.sleep(interval_s)  # the sampling window itself
    after = await asyncio.gather(*(_xacts(d) for d in dsns))
    elapsed = max(1e-6, time.monotonic() - started)
    # each sample is one transaction of ours on each shard: subtract it
    return GroupLoad(
        group, tuple(max(0.0, (a - b - 1) / elapsed) for a, b in zip(after, before, strict=True))
    )


def _rows_sql(group: str) -> str:
    counts = " + ".join(f"(SELECT count(*) FROM {t.name})" for t in GROUP_TABLES[group])  # noqa: S608
    return f"SELECT {counts}"


async def _shard_sample(group: str, dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        async with conn.transaction(readonly=True):
            rows = int(await conn.fetchval(_rows_sql(group)))
            xacts = int(await conn.fetchval(_XACTS))
        return rows, xacts
    finally:
        await conn.close()


async def sample_group(group: str, dsns: Sequence[str]) -> tuple[list[int], list[int]]:
    """Rows (the group's tables) and the transaction counter of each shard, in index order.
    Raises OSError / asyncpg errors."""
    samples = await asyncio.gather(*(_shard_sample(group, d) for d in dsns))
    return [s[0] for s in samples], [s[1] for s in samples]


@dataclass(frozen=True)
class GroupSkew:
    group: str
    rows: tuple[int, ...]
    tps: tuple[float, ...] | None  # None until a second sample of the same shards

    @property
    def rows_skew(self) -> float:
        return spread([float(r) for r in self.rows])

    @property
    def load_skew(self) -> float | None:
        return None if self.tps is None else spread(self.tps)

    def to_json(self) -> dict[str, Any]:
        load = self.load_skew
        return {
            "group": self.group,
            "rows": list(self.rows),
            "rows_skew": round(self.rows_skew, 4),
            "tps": None if self.tps is None else [round(t, 1) for t in self.tps],
            "load_skew": None if load is None else round(load, 4),
        }


@dataclass
class SkewTracker:
    """Per group, the previous sample: tx/s are the counters' rise since then."""

    clock: Callable[[], float] = time.monotonic
    _last: dict[str, tuple[tuple[str, ...], tuple[int, ...], float]] = field(default_factory=dict)

    def observe(
        self, group: str, dsns: Sequence[str], rows: Sequence[int], xacts: Sequence[int]
    ) -> GroupSkew:
        """The group's figures from this sample (each sample costs one transaction a shard,
        subtracted). tx/s is None on the first sample or when the shard list changed."""
        now = self.clock()
        key = tuple(dsns)
        tps: tuple[float, ...] | None = None
        last = self._last.get(group)
        if last is not None and last[0] == key and now > last[2]:
            elapsed = now - last[2]
            tps = tuple(
                max(0.0, (x - before - 1) / elapsed)
                for x, before in zip(xacts, last[1], strict=True)
            )
        self._last[group] = (key, tuple(xacts), now)
        return GroupSkew(group, tuple(rows), tps)
