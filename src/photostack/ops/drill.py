"""`photostack drill SCENARIO|all [--json]`: failure scenarios on a running cluster under load.

Each scenario injects one fault through the control API while a bounded read/write load runs
through the public API, observes until the cluster recovers (or a deadline), heals, verifies
every acknowledged write, and reports expected vs observed. Adding a scenario is one line in
``SCENARIOS`` (the ``failover`` and ``partition`` drills of issue 5 plug in there).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Callable
from typing import Any

import httpx

from photostack.blocks.chaos import netns_capability
from photostack.ops._drill_base import DrillContext, DrillOptions, Scenario
from photostack.ops._drill_control import AsyncControl
from photostack.ops._drill_failover import FAILOVER
from photostack.ops._drill_latency import LATENCY
from photostack.ops._drill_model import Outcome, ScenarioResult
from photostack.ops._drill_nodes import APP_NODE, CACHE_NODE, WEB_NODE
from photostack.ops._drill_partition import PARTITION
from photostack.ops._drill_workers import WORKERS
from photostack.ops.client import ControlError

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_RUN",
    "EXIT_OK",
    "EXIT_USAGE",
    "SCENARIOS",
    "DrillOptions",
    "Scenario",
    "run_drill",
    "scenario_names",
]

EXIT_OK = 0
EXIT_FAILED = 1  # a scenario's expectation did not hold (or it could not run to the end)
EXIT_USAGE = 2  # unknown scenario, or no cluster
EXIT_NOT_RUN = 3  # the one scenario asked for was skipped: the cluster lacks what it needs

SCENARIOS: tuple[Scenario, ...] = (
    WEB_NODE,
    APP_NODE,
    CACHE_NODE,
    WORKERS,
    LATENCY,
    FAILOVER,
    PARTITION,
)

Out = Callable[[str], None]


def scenario_names() -> list[str]:
    return [s.name for s in SCENARIOS]


def run_drill(
    name: str, control_url: str, options: DrillOptions, out: Out, *, as_json: bool = False
) -> int:
    """Run scenario ``name`` (or every one for ``all``); print a table or JSON; exit code."""
    known = {s.name: s for s in SCENARIOS}
    if name != "all" and name not in known:
        out(f"error: unknown scenario {name!r} (known: {', '.join(known)}, all)")
        return EXIT_USAGE
    chosen = list(known.values()) if name == "all" else [known[name]]
    progress: Out = (lambda line: None) if as_json else out
    try:
        report = asyncio.run(_run(chosen, control_url, options, progress))
    except ControlError as exc:
        out(f"error: {exc}")
        return EXIT_USAGE
    out(json.dumps(report, indent=2, default=_json_default) if as_json else render(report))
    outcomes = [s["outcome"] for s in report["scenarios"]]
    if Outcome.FAILED in outcomes:
        return EXIT_FAILED
    if name != "all" and outcomes == [Outcome.SKIPPED]:
        return EXIT_NOT_RUN
    return EXIT_OK


async def _run(
    chosen: list[Scenario], control_url: str, options: DrillOptions, out: Out
) -> dict[str, Any]:
    control = AsyncControl(control_url)
    try:
        cluster = await control.cluster()
        netns = await asyncio.to_thread(netns_capability)
        ctx = DrillContext(
            control,
            cluster["urls"]["api"],
            options,
            out,
            capabilities={"netns": netns.to_json()},
        )
        results = []
        for scenario in chosen:
            out(f"drill {scenario.name}: {scenario.summary}")
            results.append(await _one(scenario, ctx))
    finally:
        await control.aclose()
    return {
        "cluster": cluster["name"],
        "capabilities": ctx.capabilities,
        "passed": all(r.outcome is not Outcome.FAILED for r in results),
        "scenarios": [r.to_json() for r in results],
    }


async def _one(scenario: Scenario, ctx: DrillContext) -> ScenarioResult:
    """A scenario that crashes is a failed scenario with its reason, not a traceback."""
    try:
        return await scenario.run(ctx)
    except (ControlError, httpx.HTTPError, OSError, RuntimeError, KeyError, ValueError) as exc:
        return ScenarioResult(
            scenario.name, scenario.summary, Outcome.FAILED, notes=(f"could not run: {exc!r}",)
        )


def _json_default(value: Any) -> Any:
    return str(value)


_FIGURES = (
    ("writes_resume_s", "time until writes resume", " s"),
    ("requests_failed", "requests failed", ""),
    ("acknowledged_writes_missing", "acknowledged writes missing", ""),
    ("stale_reads", "stale reads served", ""),
)


def render(report: dict[str, Any]) -> str:
    """The report as rich tables: one per scenario, checks then the four headline figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, record=True, file=io.StringIO())
    netns = report["capabilities"]["netns"]
    console.print(
        f"cluster {report['cluster']}; netns partitions: "
        f"{'available' if netns['available'] else 'unavailable'} ({netns['reason']})"
    )
    for s in report["scenarios"]:
        console.print(
            f"\n{s['name']}: {s['outcome'].upper()} ({s['duration_s']} s) - {s['summary']}"
        )
        if s["checks"]:
            table = Table()
            for column in ("check", "expected", "observed", "ok"):
                table.add_column(column, overflow="fold")
            for c in s["checks"]:
                ok = "yes" if c["passed"] else "NO"
                table.add_row(c["name"], c["expected"], c["observed"], ok)
            console.print(table)
        figures = s["figures"]
        shown = [
            f"{label} {'never' if figures[key] is None else _num(figures[key])}{unit}"
            for key, label, unit in _FIGURES
            if key in figures
        ]
        if shown:
            console.print("  " + "; ".join(shown))
        for note in s["notes"]:
            console.print(f"  note: {note}")
    verdict = "every expectation held" if report["passed"] else "SOME EXPECTATIONS FAILED"
    console.print(verdict)
    return console.export_text().rstrip()


def _num(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.2f}"
    return str(value)
