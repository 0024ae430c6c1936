"""Hot-shard detection: transactions per second of every physical shard of a group.

Load figures come from ``pg_stat_database`` on each shard's primary (``xact_commit +
xact_rollback`` of the photostack database), sampled twice ``interval_s`` apart. The group's
skew is hottest / mean (``photostack_shard_skew``: 1.0 is even). :func:`plan_hot` in
:mod:`._reshard_plan` turns the figures into a move off the hottest shard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ._reshard_plan import skew

__all__ = ["GroupLoad", "sample_loads"]

_XACTS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


@dataclass(frozen=True)
class GroupLoad:
    group: str
    tps: tuple[float, ...]  # per physical shard, index order

    @property
    def skew(self) -> float:
        return skew(self.tps)

    @property
    def hottest(self) -> int:
        return max(range(len(self.tps)), key=lambda i: self.tps[i]) if self.tps else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "tps": [round(t, 1) for t in self.tps],
            "skew": round(self.skew, 3),
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
