"""Drills that kill a node under load (DESIGN.md section 6.1 and 6.2).

- ``web-node`` / ``app-node``: SIGKILL one node of the tier. Health checks eject it, idempotent
  requests retry elsewhere: no failed request, no acknowledged write missing; the supervisor
  restarts it and it serves requests again (it rejoined).
- ``cache-node``: SIGKILL a cache node. Reads fall back to the database (no failed request), and
  after it returns (empty) no read is stale; the cache tier's counters come from the app nodes'
  ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from photostack.ops._drill_base import DrillContext, FaultRun, Scenario, run_under_load
from photostack.ops._drill_load import ApiLoad
from photostack.ops._drill_model import (
    Check,
    ScenarioResult,
    at_most,
    equals,
    holds,
    standard_figures,
)

__all__ = ["APP_NODE", "CACHE_NODE", "WEB_NODE"]

WRITES_RESUME_LIMIT_S = 3.0  # a killed stateless node may cost a retry, never an outage


async def _pick(ctx: DrillContext, role: str, at_least: int) -> tuple[dict[str, Any] | None, str]:
    nodes = await ctx.control.nodes_of(role)
    ready = [n for n in nodes if n["state"] == "ready"]
    if len(ready) < at_least:
        return None, f"needs {at_least} ready {role} node(s), the cluster has {len(ready)}"
    return ready[-1], ""


def _common_checks(run: FaultRun) -> list[Check]:
    log = run.load.log
    failed = log.failed(idempotent_only=True)
    return [
        Check(
            "failed idempotent requests",
            "0",
            f"{len(failed)}" + (f" ({log.error_summary(failed)})" if failed else ""),
            not failed,
        ),
        equals("acknowledged writes missing afterwards", 0, len(run.missing)),
        at_most("time until writes resume", WRITES_RESUME_LIMIT_S, _resume(run), " s"),
    ]


def _resume(run: FaultRun) -> float | None:
    return run.load.log.writes_resume_s(run.fault_s)


async def _kill_stateless(ctx: DrillContext, name: str, role: str, summary: str) -> ScenarioResult:
    victim, reason = await _pick(ctx, role, at_least=2)
    if victim is None:
        return ScenarioResult.skipped(name, summary, reason)
    target = victim["name"]
    restarts = int(victim["restarts"])
    back: dict[str, float] = {}

    async def inject() -> None:
        ctx.out(f"  kill {target} (SIGKILL) under load")
        await ctx.control.command(target, "kill")

    async def recovered(load: ApiLoad, fault_s: float) -> bool:
        if "ready_s" not in back:
            node = await ctx.control.node(target)
            if node["state"] != "ready" or node["restarts"] <= restarts:
                return False
            back["ready_s"] = ctx.clock()
        return load.log.served_by(target, since_s=back["ready_s"]) > 0  # it rejoined

    run = await run_under_load(ctx, inject, recovered)
    checks = _common_checks(run)
    checks.append(
        holds(
            f"{target} restarted and serves again",
            f"within {ctx.options.recover_deadline_s:.0f} s",
            "never" if run.recovery_s is None else f"after {run.recovery_s:.1f} s",
            run.recovery_s is not None,
        )
    )
    checks.append(equals("stale reads served", 0, len(run.load.log.stale_reads())))
    figures = standard_figures(run.load.log, run.fault_s, len(run.missing))
    figures.update(victim=target, rejoined_after_s=_round(run.recovery_s))
    return ScenarioResult.judged(name, summary, checks, figures, duration_s=run.end_s - run.fault_s)


async def _web_node(ctx: DrillContext) -> ScenarioResult:
    return await _kill_stateless(ctx, "web-node", "web", WEB_NODE.summary)


async def _app_node(ctx: DrillContext) -> ScenarioResult:
    return await _kill_stateless(ctx, "app-node", "app", APP_NODE.summary)


# -- cache node -------------------------------------------------------------------------------

_CACHE_COUNTER = "photostack_cache_requests"


async def _cache_counters(ctx: DrillContext) -> dict[str, float]:
    """Global-tier cache lookups by result, summed over the ready app nodes."""
    totals: dict[str, float] = {}
    for node in await ctx.control.nodes_of("app"):
        if node["state"] != "ready":
            continue
        text = await ctx.control.metrics(node)
        for family in text_string_to_metric_families(text):
            if family.name != _CACHE_COUNTER:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("tier") == "global":
                    result = sample.labels.get("result", "?")
                    totals[result] = totals.get(result, 0.0) + sample.value
    return totals


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(after)}


async def _cache_node(ctx: DrillContext) -> ScenarioResult:
    summary = CACHE_NODE.summary
    victim, reason = await _pick(ctx, "cache", at_least=1)
    if victim is None:
        return ScenarioResult.skipped("cache-node", summary, reason)
    target = victim["name"]
    restarts = int(victim["restarts"])
    counters: dict[str, dict[str, float]] = {}

    async def inject() -> None:
        counters["before"] = await _cache_counters(ctx)
        ctx.out(f"  kill {target} (SIGKILL) under load")
        await ctx.control.command(target, "kill")

    async def recovered(load: ApiLoad, fault_s: float) -> bool:
        node = await ctx.control.node(target)
        if node["state"] == "ready" and node["restarts"] > restarts:
            counters["returned"] = await _cache_counters(ctx)
            return True
        return False

    run = await run_under_load(ctx, inject, recovered)
    counters["end"] = await _cache_counters(ctx)
    log = run.load.log
    returned_s = run.recovered_s if run.recovered_s is not None else run.end_s
    down = log.window(run.fault_s, returned_s)
    checks = _common_checks(run)
    checks.append(
        holds(
            f"{target} back",
            f"within {ctx.options.recover_deadline_s:.0f} s",
            "never" if run.recovery_s is None else f"after {run.recovery_s:.1f} s",
            run.recovery_s is not None,
        )
    )
    stale_after = log.stale_reads(since_s=returned_s)
    checks.append(equals("stale reads after it returned", 0, len(stale_after)))
    # While the node is down, invalidations it would have carried (global tier, pub/sub to the
    # other app nodes' local caches) are lost: staleness then is bounded by the local TTL
    # (docs/caching.md), a documented cost, so it is reported, not judged.
    stale_down = len(log.stale_reads()) - len(stale_after)
    figures = standard_figures(log, run.fault_s, len(run.missing))
    figures.update(
        victim=target,
        back_after_s=_round(run.recovery_s),
        reads_while_down=sum(1 for op in down if op.kind == "read"),
        stale_reads_while_down=stale_down,
        reads_failed_while_down=sum(1 for op in down if op.kind == "read" and not op.ok),
        global_cache_while_down=_delta(
            counters.get("returned", counters["end"]), counters["before"]
        ),
        global_cache_after_return=_delta(
            counters["end"], counters.get("returned", counters["end"])
        ),
    )
    return ScenarioResult.judged(
        "cache-node", summary, checks, figures, duration_s=run.end_s - run.fault_s
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


WEB_NODE = Scenario(
    "web-node",
    "kill a web node under load: no failed idempotent request, it rejoins (6.1)",
    _web_node,
)
APP_NODE = Scenario(
    "app-node",
    "kill an app node under load: no failed idempotent request, it rejoins (6.1)",
    _app_node,
)
CACHE_NODE = Scenario(
    "cache-node",
    "kill a cache node: reads fall back to the database, no stale read after it returns (6.2)",
    _cache_node,
)
