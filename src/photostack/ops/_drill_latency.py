"""``latency``: add latency on every storage link through the chaos proxy, under load.

Three windows of the same load: before, with the toxic, after removing it. Expected: nothing
fails, every write pays at least the added latency (each makes database round trips), and the
latencies come back once the toxic is gone. Needs ``[chaos] links = ["storage"]``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from photostack.ops._drill_base import DrillContext, Scenario
from photostack.ops._drill_control import ChaosDisabled
from photostack.ops._drill_load import ApiLoad, create_population
from photostack.ops._drill_model import Check, LoadLog, ScenarioResult, equals, standard_figures

__all__ = ["JITTER_MS", "LATENCY", "LATENCY_MS"]

LATENCY_MS = 50.0
JITTER_MS = 5.0
WINDOW_S = 5.0


async def _latency(ctx: DrillContext) -> ScenarioResult:
    summary = LATENCY.summary
    try:
        links = [
            link["name"]
            for link in await ctx.control.links()
            if link["name"].startswith("storage.")
        ]
    except ChaosDisabled:
        links = []
    if not links:
        return ScenarioResult.skipped(
            "latency", summary, 'needs a topology with [chaos] links = ["storage"]'
        )
    toxic = {
        "type": "latency",
        "direction": "downstream",
        "attributes": {"latency_ms": LATENCY_MS, "jitter_ms": JITTER_MS},
    }
    marks: dict[str, float] = {}
    async with ctx.api() as api:
        population = await create_population(api, ctx.options.load)
        load = ApiLoad(api, population, ctx.options.load, ctx.clock)
        load.start()
        try:
            marks["before"] = ctx.clock()
            await asyncio.sleep(WINDOW_S)  # the baseline window
            marks["fault"] = ctx.clock()
            try:
                for name in links:
                    await ctx.control.add_toxic(name, toxic)
                ctx.out(f"  +{LATENCY_MS:.0f} ms (±{JITTER_MS:.0f}) on {len(links)} storage links")
                marks["toxic"] = ctx.clock()
                await asyncio.sleep(WINDOW_S)  # the window under the toxic
            finally:
                for name in links:
                    await ctx.control.clear_toxics(name)
            marks["healed"] = ctx.clock()
            await asyncio.sleep(WINDOW_S)  # the window after removing it
            marks["end"] = ctx.clock()
        finally:
            await load.stop()
        missing = await load.missing_writes()
    return _judge(summary, load.log, marks, len(missing), len(links))


def _windows(log: LoadLog, marks: dict[str, float]) -> dict[str, dict[str, float]]:
    spans = {
        "before": (marks["before"], marks["fault"]),
        "with_toxic": (marks["toxic"], marks["healed"]),
        "after": (marks["healed"], marks["end"]),
    }
    figures: dict[str, dict[str, float]] = {}
    for label, (since, until) in spans.items():
        figures[label] = {
            f"{kind}_{pct_name}_ms": _ms(log.latency_ms(kind, pct, since, until))
            for kind in ("write", "read")
            for pct_name, pct in (("p50", 50), ("p99", 99))
        }
    return figures


def _ms(value: float) -> float:
    return round(value, 1) if not math.isnan(value) else math.nan


def _judge(
    summary: str, log: LoadLog, marks: dict[str, float], missing: int, links: int
) -> ScenarioResult:
    w = _windows(log, marks)
    before, during, after = w["before"], w["with_toxic"], w["after"]
    added = during["write_p50_ms"] - before["write_p50_ms"]
    failed = log.failed()
    checks = [
        Check(
            "failed requests",
            "0",
            f"{len(failed)}" + (f" ({log.error_summary(failed)})" if failed else ""),
            not failed,
        ),
        equals("acknowledged writes missing afterwards", 0, missing),
        Check(
            "write p50 rises by at least the added latency",
            f">= +{0.8 * LATENCY_MS:.0f} ms",
            f"+{added:.1f} ms ({before['write_p50_ms']} -> {during['write_p50_ms']} ms)",
            added >= 0.8 * LATENCY_MS,
        ),
        Check(
            "write p99 rises by at least the added latency",
            f">= +{0.8 * LATENCY_MS:.0f} ms",
            f"{before['write_p99_ms']} -> {during['write_p99_ms']} ms",
            during["write_p99_ms"] - before["write_p99_ms"] >= 0.8 * LATENCY_MS,
        ),
        Check(
            "write p50 comes back after removal",
            f"<= {before['write_p50_ms'] * 1.5 + 10:.1f} ms",
            f"{after['write_p50_ms']} ms",
            after["write_p50_ms"] <= before["write_p50_ms"] * 1.5 + 10,
        ),
    ]
    figures: dict[str, Any] = standard_figures(log, marks["fault"], missing)
    figures.update(latency_ms=LATENCY_MS, jitter_ms=JITTER_MS, links=links, **w)
    return ScenarioResult.judged(
        "latency", summary, checks, figures, duration_s=marks["end"] - marks["before"]
    )


LATENCY = Scenario(
    "latency",
    f"+{LATENCY_MS:.0f} ms on every storage link (chaos proxy): p99 rises, nothing fails",
    _latency,
)
