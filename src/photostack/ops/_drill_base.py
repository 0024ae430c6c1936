"""What a drill scenario is, what it gets to work with, and the common shape of a run:
set up users, run the load, inject the fault, observe until recovered (or a deadline), heal,
let the load run on, stop it, and verify every acknowledged write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from photostack.ops._drill_control import AsyncControl
from photostack.ops._drill_load import ApiLoad, LoadConfig, create_population
from photostack.ops._drill_model import ScenarioResult

__all__ = ["DrillContext", "DrillOptions", "FaultRun", "Scenario", "run_under_load"]

_POLL_S = 0.2


@dataclass(frozen=True)
class DrillOptions:
    warmup_s: float = 3.0  # load before the fault (the baseline)
    recover_deadline_s: float = 90.0  # the fault's effects must be over by then
    settle_s: float = 3.0  # load after recovery and healing, before verifying
    load: LoadConfig = field(default_factory=LoadConfig)


@dataclass
class DrillContext:
    """What a scenario may use: the control API, the public API's URL, options, and output."""

    control: AsyncControl
    api_url: str
    options: DrillOptions
    out: Callable[[str], None]
    capabilities: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def api(self) -> httpx.AsyncClient:
        timeout = self.options.load.request_timeout_s
        return httpx.AsyncClient(base_url=self.api_url, timeout=timeout)


@dataclass(frozen=True)
class Scenario:
    """A registered drill. ``run`` returns the verdict; it must heal what it broke."""

    name: str
    summary: str  # one line: the fault and the promise it tests (DESIGN.md section 6)
    run: Callable[[DrillContext], Awaitable[ScenarioResult]]


@dataclass
class FaultRun:
    """The record of one fault under load (times on the context's clock)."""

    load: ApiLoad
    fault_s: float
    recovered_s: float | None
    end_s: float
    missing: list[str]

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_s is None else self.recovered_s - self.fault_s


Hook = Callable[[], Awaitable[None]]
Probe = Callable[[ApiLoad, float], Awaitable[bool]]


async def run_under_load(
    ctx: DrillContext, inject: Hook, recovered: Probe, heal: Hook | None = None
) -> FaultRun:
    """The common run. ``recovered(load, fault_s)`` is polled until true or the deadline;
    ``heal`` always runs (even when injecting or observing failed)."""
    opts = ctx.options
    async with ctx.api() as api:
        population = await create_population(api, opts.load)
        load = ApiLoad(api, population, opts.load, ctx.clock)
        load.start()
        try:
            fault_s, recovered_s = await _fault(ctx, load, inject, recovered, heal)
            await asyncio.sleep(opts.settle_s)  # load after recovery: does it stay well?
        finally:
            await load.stop()
        missing = await load.missing_writes()
        return FaultRun(load, fault_s, recovered_s, ctx.clock(), missing)


async def _fault(
    ctx: DrillContext, load: ApiLoad, inject: Hook, recovered: Probe, heal: Hook | None
) -> tuple[float, float | None]:
    try:
        await asyncio.sleep(ctx.options.warmup_s)  # the baseline: load before the fault
        fault_s = ctx.clock()
        await inject()
        ctx.out(f"  fault injected; observing for up to {ctx.options.recover_deadline_s:.0f}s")
        end = fault_s + ctx.options.recover_deadline_s
        while ctx.clock() < end:
            if await recovered(load, fault_s):
                return fault_s, ctx.clock()
            await asyncio.sleep(_POLL_S)  # polling recovery under a deadline
        return fault_s, None
    finally:
        if heal is not None:
            await heal()
