"""``failover``: ``kill -9`` the primary of the shard the load writes to, under load.

The load's writes are follows (the ``social`` group); the drill kills that shard's primary
through the control API and watches the coordinator's view (``GET /v1/replication``). Expected:
a replica is promoted and the shard's epoch moves up by one, writes resume within
``WRITES_RESUME_LIMIT_S`` (the goal is 3 s), no acknowledged write is missing afterwards when the
group is synchronous (an asynchronous group's loss is measured and reported, not judged), and the
old primary comes back as a replica (in recovery) — it never takes a write again.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from photostack.ops._drill_base import DrillContext, Scenario, run_under_load
from photostack.ops._drill_load import ApiLoad
from photostack.ops._drill_model import (
    Check,
    ScenarioResult,
    at_most,
    equals,
    holds,
    standard_figures,
)

__all__ = ["FAILOVER", "WRITES_RESUME_LIMIT_S", "replicated_shard"]

WRITES_RESUME_LIMIT_S = 5.0  # judged; the goal (3 s) is reported next to it
GOAL_S = 3.0
WRITTEN_GROUP = "social"  # the drill load's follows


async def replicated_shard(ctx: DrillContext, group: str) -> tuple[str, dict[str, Any]] | None:
    """The first shard of ``group`` with replicas, as the leader coordinator describes it."""
    view = await ctx.control.call("GET", "/v1/replication")
    for name, shard in sorted(view.get("shards", {}).items()):
        if shard.get("group") == group and shard.get("replicas"):
            return name, shard
    return None


async def _shard(ctx: DrillContext, name: str) -> dict[str, Any]:
    view = await ctx.control.call("GET", "/v1/replication")
    shard: dict[str, Any] = view["shards"][name]
    return shard


async def _past_anti_flap(ctx: DrillContext, key: str) -> None:
    """A shard that failed over recently is not failed over again (anti-flap): wait that out,
    and until its replicas stream again (a repeated drill)."""
    view = await ctx.control.call("GET", "/v1/replication")
    interval = float(view.get("config", {}).get("min_failover_interval_s", 0.0))
    last = [f for f in view.get("failovers", []) if f.get("shard") == key]
    if last and last[0].get("at"):
        at = datetime.fromisoformat(str(last[0]["at"]).replace(" ", "T"))
        wait = interval + 1.0 - (time.time() - at.timestamp())
        if wait > 0:
            ctx.out(
                f"  {key} failed over {interval - wait + 1:.0f} s ago: waiting {wait:.0f} s "
                "(anti-flap)"
            )
            await asyncio.sleep(wait)  # the coordinator's anti-flap window
    end = ctx.clock() + 30.0
    while ctx.clock() < end:
        shard = await _shard(ctx, key)
        if any(r.get("state") == "streaming" for r in shard.get("replicas", {}).values()):
            return
        await asyncio.sleep(0.5)  # a rejoining replica catches up


async def _failover(ctx: DrillContext) -> ScenarioResult:
    summary = FAILOVER.summary
    found = await replicated_shard(ctx, WRITTEN_GROUP)
    if found is None:
        return ScenarioResult.skipped(
            "failover", summary, f"needs a [storage.{WRITTEN_GROUP}] group with replicas >= 1"
        )
    key, before = found
    await _past_anti_flap(ctx, key)
    before = await _shard(ctx, key)
    victim = before["primary"]
    restarts = int((await ctx.control.node(victim))["restarts"])
    seen: dict[str, Any] = {}

    async def inject() -> None:
        ctx.out(f"  kill -9 {victim} (primary of {key}, {before['replication']}) under load")
        await ctx.control.command(victim, "kill")

    async def recovered(load: ApiLoad, fault_s: float) -> bool:
        if "promoted" not in seen:
            shard = await _shard(ctx, key)
            if shard["primary"] == victim:
                return False
            seen.update(promoted=shard["primary"], epoch=shard["epoch"], at=ctx.clock())
        node = await ctx.control.node(victim)
        figures = node.get("figures", {})
        if node["state"] != "ready" or node["restarts"] <= restarts:
            return False
        seen["old_in_recovery"] = figures.get("in_recovery")
        return figures.get("in_recovery") is True and load.log.writes_resume_s(fault_s) is not None

    run = await run_under_load(ctx, inject, recovered)
    log = run.load.log
    resume = log.writes_resume_s(run.fault_s)
    sync = before["replication"] != "async"
    checks: list[Check] = [
        holds(
            "a replica promoted, epoch +1",
            f"epoch {before['epoch'] + 1}, primary not {victim}",
            f"epoch {seen.get('epoch')}, primary {seen.get('promoted', victim)}",
            seen.get("epoch") == before["epoch"] + 1,
        ),
        at_most(
            f"time until writes resume (goal {GOAL_S:.0f} s)", WRITES_RESUME_LIMIT_S, resume, " s"
        ),
        holds(
            f"{victim} back as a replica (never a primary again)",
            "in recovery",
            "in recovery" if seen.get("old_in_recovery") else f"{seen.get('old_in_recovery')}",
            seen.get("old_in_recovery") is True,
        ),
    ]
    if sync:
        checks.append(equals("acknowledged writes missing afterwards", 0, len(run.missing)))
    else:
        checks.append(
            holds(
                "acknowledged writes missing afterwards (async: measured)",
                "reported",
                str(len(run.missing)),
                True,
            )
        )
    figures = standard_figures(log, run.fault_s, len(run.missing))
    figures.update(
        shard=key,
        replication=before["replication"],
        consistency=before["consistency"],
        killed=victim,
        promoted=seen.get("promoted"),
        epoch=seen.get("epoch"),
        promoted_after_s=None if "at" not in seen else round(seen["at"] - run.fault_s, 2),
        stale_reads_marked=len(log.marked_stale()),
    )
    return ScenarioResult.judged(
        "failover", summary, checks, figures, duration_s=run.end_s - run.fault_s
    )


FAILOVER = Scenario(
    "failover",
    "kill -9 the primary of the written shard: a replica is promoted, writes resume, no "
    "acknowledged write lost (sync), the old primary rejoins as a replica (issue 5)",
    _failover,
)
