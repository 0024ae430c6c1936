"""What a benchmark suite is, and how its part of BENCHMARKS.md is kept.

A suite measures one thing against an anchor measured in the same run and returns report
sections. `scripts/bench NAME` runs one suite and replaces only that suite's part of the file,
between ``<!-- bench:NAME -->`` markers, so suites can be rerun separately on the same machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from photostack.ops._bench_report import Machine, Section, render_sections

__all__ = [
    "Out",
    "Suite",
    "SuiteError",
    "SuiteOptions",
    "SuiteResult",
    "merge_suite_block",
    "render_suite_block",
]

Out = Callable[[str], None]

_BEGIN = "<!-- bench:{name} -->"
_END = "<!-- /bench:{name} -->"


class SuiteError(Exception):
    """A suite could not measure (a target did not start, a check failed). One line."""


@dataclass(frozen=True)
class SuiteOptions:
    """Options every suite receives; each suite uses those that apply to it."""

    requests: int = 3000
    concurrency: int = 16
    duration_cap_s: float = 60.0
    min_window_s: float = 2.0
    warmup_requests: int = 300
    port_base: int | None = None
    use_running: bool = False
    ready_deadline_s: float = 240.0
    hello_ready_deadline_s: float = 30.0
    stop_timeout_s: float = 120.0


@dataclass(frozen=True)
class SuiteResult:
    sections: tuple[Section, ...]
    figures: dict[str, Any] = field(default_factory=dict)  # for --json
    failed: bool = False  # measured, but some requests failed: the report says so


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    run: Callable[[SuiteOptions, Out], SuiteResult]


def render_suite_block(name: str, result: SuiteResult, machine: Machine, command: str) -> str:
    """One suite's part of the report, with its own machine line and reproduce command."""
    body = render_sections(result.sections)
    return (
        f"{_BEGIN.format(name=name)}\n"
        f"_Suite `{name}`: measured with `{command}` on {machine.line()}._\n\n"
        f"{body.rstrip()}\n"
        f"{_END.format(name=name)}\n"
    )


def merge_suite_block(document: str, name: str, block: str, order: Sequence[str]) -> str:
    """``document`` with suite ``name``'s block replaced, or inserted in registry ``order``."""
    pattern = re.compile(
        re.escape(_BEGIN.format(name=name)) + r".*?" + re.escape(_END.format(name=name)) + r"\n?",
        re.S,
    )
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    later = order[order.index(name) + 1 :] if name in order else []
    for other in later:
        marker = _BEGIN.format(name=other)
        at = document.find(marker)
        if at >= 0:
            return document[:at] + block + "\n" + document[at:]
    return document.rstrip("\n") + "\n\n" + block
