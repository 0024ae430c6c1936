"""A drill's bookkeeping, pure: every operation of the load with its times, the figures derived
from them, and the expected-vs-observed checks a scenario is judged by. No I/O, no clock."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from photostack.ops.loadgen import percentile

__all__ = [
    "Check",
    "LoadLog",
    "Op",
    "Outcome",
    "ScenarioResult",
    "at_most",
    "equals",
    "holds",
    "standard_figures",
]


@dataclass(frozen=True)
class Op:
    """One request of the drill's load. Times are seconds on the drill's clock."""

    kind: str  # "read" | "write" | "upload"
    started_s: float
    finished_s: float
    ok: bool
    status: int | None = None  # None: no HTTP answer (connection refused, timeout)
    error: str = ""
    key: str = ""  # a write's id (what must be readable afterwards)
    idempotent: bool = True
    served_by: str = ""  # X-Served-By
    stale: bool = False  # a read older than a write this client had acknowledged before it
    marked_stale: bool = False  # X-Data-Stale: true

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.started_s


class LoadLog:
    """Every operation, in completion order, and the figures a drill reports from them."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def __repr__(self) -> str:
        return f"<LoadLog ops={len(self.ops)} failed={len(self.failed())}>"

    def record(self, op: Op) -> None:
        self.ops.append(op)

    def window(self, since_s: float = -math.inf, until_s: float = math.inf) -> list[Op]:
        """Operations that started in [since_s, until_s)."""
        return [op for op in self.ops if since_s <= op.started_s < until_s]

    def failed(
        self,
        since_s: float = -math.inf,
        until_s: float = math.inf,
        *,
        idempotent_only: bool = False,
    ) -> list[Op]:
        return [
            op
            for op in self.window(since_s, until_s)
            if not op.ok and (op.idempotent or not idempotent_only)
        ]

    def acknowledged_writes(self) -> list[str]:
        return [op.key for op in self.ops if op.kind == "write" and op.ok and op.key]

    def stale_reads(self, since_s: float = -math.inf) -> list[Op]:
        return [op for op in self.window(since_s) if op.stale]

    def marked_stale(self, since_s: float = -math.inf) -> list[Op]:
        return [op for op in self.window(since_s) if op.marked_stale]

    def writes_resume_s(self, fault_s: float) -> float | None:
        """Seconds from the fault to the first acknowledged write that began after the last
        failed write ended (or after the fault, when none failed): a stall counts as well as
        errors.
        None when no write was acknowledged after that point."""
        writes = [op for op in self.ops if op.kind == "write" and op.started_s >= fault_s]
        failures = [op.finished_s for op in writes if not op.ok]
        after = max(failures, default=fault_s)
        resumed = [op.finished_s for op in writes if op.ok and op.started_s >= after]
        return min(resumed) - fault_s if resumed else None

    def latency_ms(
        self, kind: str, pct: float, since_s: float = -math.inf, until_s: float = math.inf
    ) -> float:
        """A latency percentile of successful ``kind`` operations in a window (NaN if none)."""
        values = sorted(
            op.latency_s * 1000 for op in self.window(since_s, until_s) if op.kind == kind and op.ok
        )
        return percentile(values, pct)

    def served_by(self, name: str, since_s: float = -math.inf) -> int:
        """How many successful operations a node took part in (X-Served-By) since a time."""
        return sum(1 for op in self.window(since_s) if op.ok and name in op.served_by.split(","))

    def error_summary(self, ops: Sequence[Op], limit: int = 4) -> str:
        counts: dict[str, int] = {}
        for op in ops:
            reason = op.error or f"HTTP {op.status}"
            counts[reason] = counts.get(reason, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return ", ".join(f"{reason} x{n}" for reason, n in top)


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # the cluster lacks what the scenario needs (said in ``notes``)


@dataclass(frozen=True)
class Check:
    """One expectation of a scenario: what was expected, what was seen, whether it held."""

    name: str
    expected: str
    observed: str
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expected": self.expected,
            "observed": self.observed,
            "passed": self.passed,
        }


def equals(name: str, expected: float | int | str, observed: float | int | str) -> Check:
    return Check(name, str(expected), str(observed), observed == expected)


def at_most(name: str, limit: float, observed: float | None, unit: str = "") -> Check:
    """``observed <= limit``; None (never happened) fails."""
    shown = "never" if observed is None else f"{_fmt(observed)}{unit}"
    passed = observed is not None and observed <= limit
    return Check(name, f"<= {_fmt(limit)}{unit}", shown, passed)


def holds(name: str, expected: str, observed: str, passed: bool) -> Check:
    return Check(name, expected, observed, passed)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"


@dataclass(frozen=True)
class ScenarioResult:
    """What a drill reports for one scenario."""

    name: str
    summary: str
    outcome: Outcome
    checks: tuple[Check, ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    duration_s: float = 0.0

    @classmethod
    def judged(
        cls,
        name: str,
        summary: str,
        checks: Iterable[Check],
        figures: dict[str, Any],
        *,
        notes: Iterable[str] = (),
        duration_s: float = 0.0,
    ) -> ScenarioResult:
        """Passed when every check passed (and there is at least one check)."""
        checks = tuple(checks)
        passed = bool(checks) and all(c.passed for c in checks)
        outcome = Outcome.PASSED if passed else Outcome.FAILED
        return cls(name, summary, outcome, checks, figures, tuple(notes), duration_s)

    @classmethod
    def skipped(cls, name: str, summary: str, reason: str) -> ScenarioResult:
        return cls(name, summary, Outcome.SKIPPED, notes=(reason,))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "outcome": self.outcome.value,
            "passed": self.outcome is Outcome.PASSED,
            "checks": [c.to_json() for c in self.checks],
            "figures": self.figures,
            "notes": list(self.notes),
            "duration_s": round(self.duration_s, 2),
        }


def standard_figures(log: LoadLog, fault_s: float, missing: int) -> dict[str, Any]:
    """The four figures every drill reports (issue 5), plus the load's size."""
    resume = log.writes_resume_s(fault_s)
    return {
        "writes_resume_s": None if resume is None else round(resume, 3),
        "requests": len(log.ops),
        "requests_failed": len(log.failed()),
        "acknowledged_writes": len(log.acknowledged_writes()),
        "acknowledged_writes_missing": missing,
        "stale_reads": len(log.stale_reads()),
        "stale_reads_marked": len(log.marked_stale()),
    }
