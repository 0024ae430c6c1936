"""CPU time of serving processes over a measurement window, per tier.

A tier (edge, web, app, postgres, ...) is a set of root pids; each root counts with all its
descendants (the Postgres postmaster and every backend, a uvicorn parent and its workers). A
process is keyed by (pid, create time) so a pid reused inside the window is never subtracted
from another process's time. Processes that start inside the window count in full; processes
that exit inside it are lost (their time went to a parent's ``children_*`` fields, which we do
not read because we walk descendants ourselves).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

__all__ = [
    "CpuSample",
    "MachineSample",
    "TierRoots",
    "busy_fraction",
    "cpu_used_s",
    "sample_machine",
    "sample_self",
    "sample_tiers",
    "tier_cpu_used_s",
]

ProcessKey = tuple[int, float]
CpuSample = Mapping[ProcessKey, float]
"""(pid, create time) -> user + system CPU seconds, at one instant."""


@dataclass(frozen=True)
class MachineSample:
    """Whole-machine CPU seconds since boot, summed over CPUs: busy and idle (incl. iowait)."""

    busy_s: float
    idle_s: float


@dataclass(frozen=True)
class TierRoots:
    """The processes one tier's CPU is summed over: these pids and all their descendants."""

    tier: str
    pids: tuple[int, ...]


def cpu_used_s(before: CpuSample, after: CpuSample) -> float:
    """CPU seconds spent between two samples of the same process set.

    Processes absent from ``before`` started in the window and count from zero; a counter that
    went backwards (it never should) counts as zero rather than a negative time.
    """
    return sum(max(0.0, cpu - before.get(key, 0.0)) for key, cpu in after.items())


def tier_cpu_used_s(
    tiers: Iterable[str], before: Mapping[str, CpuSample], after: Mapping[str, CpuSample]
) -> dict[str, float]:
    """CPU seconds per tier, in the order ``tiers`` gives; a tier never sampled counts 0."""
    return {tier: cpu_used_s(before.get(tier, {}), after.get(tier, {})) for tier in tiers}


def sample_tiers(roots: Iterable[TierRoots]) -> dict[str, CpuSample]:
    """Sample every tier's process trees now. Vanished processes are skipped, not raised."""
    samples: dict[str, CpuSample] = {}
    for tier in roots:
        sample = dict(samples.get(tier.tier, {}))
        for pid in tier.pids:
            sample.update(_sample_tree(pid))
        samples[tier.tier] = sample
    return samples


def busy_fraction(before: MachineSample, after: MachineSample) -> float:
    """Share of all the machine's CPU time that was busy between two samples (NaN if none)."""
    busy_s = after.busy_s - before.busy_s
    total_s = busy_s + after.idle_s - before.idle_s
    return busy_s / total_s if total_s > 0 else math.nan


def sample_machine() -> MachineSample:
    """Every CPU's time now, by every process on the machine (ours and anyone else's)."""
    times = psutil.cpu_times()
    idle_s = times.idle + getattr(times, "iowait", 0.0)
    busy_s = sum(times) - idle_s - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return MachineSample(busy_s=float(busy_s), idle_s=float(idle_s))


def sample_self() -> float:
    """This process's user + system CPU seconds (all its threads)."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def _sample_tree(pid: int) -> dict[ProcessKey, float]:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[ProcessKey, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error), proc.oneshot():
            times = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = float(times.user + times.system)
    return out
