"""BENCHMARKS.md as data: a report is a header plus a list of sections, rendered without I/O.

Later benchmarks add a :class:`Section` (built from their own figures) to the list; nothing
here knows what a section measures.
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = [
    "Block",
    "Bullets",
    "Machine",
    "Paragraph",
    "Report",
    "Section",
    "Table",
    "cpu_model_from_cpuinfo",
    "detect_machine",
    "fmt",
    "render_report",
    "render_sections",
]


@dataclass(frozen=True)
class Table:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric_from: int = 1

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(f"row {row!r} has {len(row)} cells, table has {len(self.headers)}")


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


Block = Table | Paragraph | Bullets


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Machine:
    cpus: int
    cpu_model: str
    python: str
    date: str

    def line(self) -> str:
        return (
            f"{self.cpus} CPU{'s' if self.cpus != 1 else ''} ({self.cpu_model}), "
            f"Python {self.python}, {self.date}"
        )


@dataclass(frozen=True)
class Report:
    title: str
    command: str
    machine: Machine
    sections: tuple[Section, ...]
    preamble: str = ""


def fmt(value: float, digits: int = 0) -> str:
    """A figure for a table: thousands separators, ``n/a`` for NaN or infinity."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def render_report(report: Report) -> str:
    """The whole markdown document, ending with one newline."""
    lines = [
        f"# {report.title}",
        "",
        f"How to reproduce: `{report.command}`",
        "",
        f"Machine: {report.machine.line()}",
        "",
    ]
    if report.preamble:
        lines += [report.preamble, ""]
    for section in report.sections:
        lines += _render_section(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def render_sections(sections: Sequence[Section]) -> str:
    """Sections alone (no title or machine line), ending with one newline."""
    lines: list[str] = []
    for section in sections:
        lines += _render_section(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def _render_section(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    for block in section.blocks:
        lines += _render_block(block)
        lines.append("")
    return lines


def _render_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    align = [
        "---:" if index >= block.numeric_from else "---" for index in range(len(block.headers))
    ]
    return [
        _row(block.headers),
        _row(tuple(align)),
        *(_row(row) for row in block.rows),
    ]


def _row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def cpu_model_from_cpuinfo(text: str) -> str:
    """The first ``model name`` in /proc/cpuinfo's text, or ``unknown CPU``."""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "unknown CPU"


def detect_machine(cpus: int, now: datetime, cpuinfo: Path = Path("/proc/cpuinfo")) -> Machine:
    """Describe this machine. ``cpus`` is passed in (the caller decides: nproc or affinity)."""
    try:
        model = cpu_model_from_cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        model = platform.processor() or "unknown CPU"
    return Machine(
        cpus=cpus,
        cpu_model=model,
        python=platform.python_version(),
        date=now.strftime("%Y-%m-%d %H:%M %Z").strip(),
    )
