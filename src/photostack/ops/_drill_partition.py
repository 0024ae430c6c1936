"""``partition``: cut a shard's primary off from the app nodes and the coordinator, per CAP choice.

Through the chaos proxy's ``storage.<primary>`` link (``down`` toxic, both directions) — the link
every app node and the coordinator use, while the replicas keep streaming over their own link.
One window per replicated group the load reads, ``ap`` first then ``cp``, healed in between.

Expected (docs/replication.md):

- no failover: the replicas still see the primary, so no majority says it is down;
- writes to the cut shard fail (503, Retry-After): no primary the coordinator confirms; and no
  acknowledged write is missing once healed;
- an ``ap`` group keeps answering reads from its replica, marked ``X-Data-Stale: true``;
- a ``cp`` group refuses those reads (503 ``consistency_unavailable``) and serves nothing marked
  stale;
- after healing, reads and writes succeed again.

Needs ``[chaos] links = ["storage"]`` (the bundled ``replication`` topology has it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from photostack.ops._drill_base import DrillContext, Scenario
from photostack.ops._drill_control import ChaosDisabled
from photostack.ops._drill_load import ApiLoad, create_population
from photostack.ops._drill_model import Check, LoadLog, ScenarioResult, equals, holds

__all__ = ["PARTITION", "WINDOW_S"]

WINDOW_S = 6.0  # each partition lasts this long (longer than the 2 s write lease)
SETTLE_S = 4.0
DOWN = {"type": "down", "direction": "both", "attributes": {}}
_READ_GROUPS = ("social", "users")  # profile reads touch both (counts / the user row)


async def _partition(ctx: DrillContext) -> ScenarioResult:
    summary = PARTITION.summary
    try:
        links = {link["name"] for link in await ctx.control.links()}
    except ChaosDisabled:
        links = set()
    view = await ctx.control.call("GET", "/v1/replication")
    shards = {
        name: s
        for name, s in view.get("shards", {}).items()
        if s.get("group") in _READ_GROUPS and f"storage.{s['primary']}" in links
    }
    if not shards:
        return ScenarioResult.skipped(
            "partition",
            summary,
            'needs [chaos] links = ["storage"] and a replicated users or social group',
        )
    order = sorted(shards, key=lambda n: (shards[n]["consistency"] != "ap", n))
    windows: list[dict[str, Any]] = []
    async with ctx.api() as api:
        population = await create_population(api, ctx.options.load)
        load = ApiLoad(api, population, ctx.options.load, ctx.clock)
        load.start()
        try:
            await asyncio.sleep(ctx.options.warmup_s)
            for name in order:
                windows.append(await _window(ctx, name, shards[name]))
                await asyncio.sleep(SETTLE_S)  # healed: everything must work again
            end = ctx.clock()
        finally:
            await load.stop()
        missing = await load.missing_writes()
    after = await ctx.control.call("GET", "/v1/replication")
    return _judge(summary, load.log, windows, after, len(missing), end)


async def _window(ctx: DrillContext, name: str, shard: dict[str, Any]) -> dict[str, Any]:
    link = f"storage.{shard['primary']}"
    ctx.out(f"  partition {shard['primary']} ({name}, {shard['consistency']}) for {WINDOW_S:g} s")
    start = ctx.clock()
    try:
        await ctx.control.add_toxic(link, DOWN)
        await asyncio.sleep(WINDOW_S)  # the partition itself
    finally:
        await ctx.control.clear_toxics(link)
    healed = ctx.clock()
    ctx.out(f"  healed {link}")
    return {
        "shard": name,
        "group": shard["group"],
        "consistency": shard["consistency"],
        "epoch": shard["epoch"],
        "start": start,
        "healed": healed,
    }


def _judge(  # noqa: PLR0917 - the drill's record, field by field
    summary: str,
    log: LoadLog,
    windows: list[dict[str, Any]],
    after: dict[str, Any],
    missing: int,
    end: float,
) -> ScenarioResult:
    checks: list[Check] = []
    figures: dict[str, Any] = {"acknowledged_writes_missing": missing, "windows": {}}
    for w in windows:
        ops = log.window(w["start"] + 2.5, w["healed"])  # past the write lease: the steady state
        reads = [op for op in ops if op.kind == "read"]
        writes = [op for op in ops if op.kind == "write"]
        marked = [op for op in reads if op.marked_stale]
        refused = [op for op in reads if "consistency_unavailable" in op.error]
        writes_ok = [op for op in writes if op.ok]
        label = f"{w['shard']} ({w['consistency']})"
        figures["windows"][w["shard"]] = {
            "consistency": w["consistency"],
            "reads": len(reads),
            "reads_marked_stale": len(marked),
            "reads_refused_cp": len(refused),
            "reads_failed": sum(1 for op in reads if not op.ok),
            "writes": len(writes),
            "writes_acknowledged": len(writes_ok),
        }
        if w["group"] == "social":  # the load's follows land there
            checks.append(equals(f"{label}: writes acknowledged while cut", 0, len(writes_ok)))
        if w["consistency"] == "ap":
            checks.append(
                holds(
                    f"{label}: reads served from the replica, marked stale",
                    "> 0 marked X-Data-Stale",
                    f"{len(marked)} of {len(reads)}",
                    len(marked) > 0,
                )
            )
        else:
            checks.append(
                holds(
                    f"{label}: reads refused (503 consistency_unavailable), none stale",
                    "> 0 refused, 0 marked stale",
                    f"{len(refused)} refused, {len(marked)} marked stale",
                    len(refused) > 0 and not marked,
                )
            )
        epoch_now = after.get("shards", {}).get(w["shard"], {}).get("epoch")
        checks.append(equals(f"{label}: no failover (epoch unchanged)", w["epoch"], epoch_now))
    tail = log.window(windows[-1]["healed"] + 2.0, end) if windows else []
    failed_after = [op for op in tail if not op.ok]
    checks.append(equals("requests failed after healing", 0, len(failed_after)))
    checks.append(equals("acknowledged writes missing afterwards", 0, missing))
    first = windows[0]["start"] if windows else end
    figures.update(
        requests=len(log.ops),
        requests_failed=len(log.failed()),
        stale_reads=len(log.stale_reads(since_s=first)),
        stale_reads_marked=len(log.marked_stale()),
        writes_after_heal_s=_resume(log, windows),
    )
    return ScenarioResult.judged("partition", summary, checks, figures, duration_s=end - first)


def _resume(log: LoadLog, windows: list[dict[str, Any]]) -> float | None:
    """Seconds from the last heal to the first acknowledged write after it."""
    if not windows:
        return None
    healed = windows[-1]["healed"]
    after = [
        op.finished_s for op in log.ops if op.kind == "write" and op.ok and op.started_s >= healed
    ]
    return round(min(after) - healed, 3) if after else None


PARTITION = Scenario(
    "partition",
    "cut a primary off from apps and coordinator: cp refuses reads (503), ap serves them "
    "marked stale, writes wait for a confirmed primary, no failover, nothing lost (issue 5)",
    _partition,
)
