from __future__ import annotations

from pathlib import Path

import pytest

from photostack.ops import bench
from photostack.ops._bench_report import Machine, Paragraph, Section
from photostack.ops.benchsuite import (
    Suite,
    SuiteError,
    SuiteOptions,
    SuiteResult,
    merge_suite_block,
    render_suite_block,
)

MACHINE = Machine(cpus=2, cpu_model="test cpu", python="3.11", date="2026-11-27")


def _block(name: str, text: str) -> str:
    result = SuiteResult(sections=(Section(f"{name} section", (Paragraph(text),)),))
    return render_suite_block(name, result, MACHINE, f"scripts/bench {name}")


def test_a_suite_block_names_its_command_and_machine() -> None:
    block = _block("ring", "fast")
    assert block.startswith("<!-- bench:ring -->\n")
    assert block.endswith("<!-- /bench:ring -->\n")
    assert "`scripts/bench ring`" in block
    assert "2 CPUs (test cpu)" in block
    assert "## ring section" in block


def test_rerunning_a_suite_replaces_only_its_block() -> None:
    order = ["path", "proxy", "ring"]
    doc = "# header\n"
    doc = merge_suite_block(doc, "ring", _block("ring", "first ring"), order)
    doc = merge_suite_block(doc, "path", _block("path", "first path"), order)
    assert doc.index("bench:path") < doc.index("bench:ring")  # inserted in registry order
    doc = merge_suite_block(doc, "ring", _block("ring", "second ring"), order)
    assert "first ring" not in doc
    assert "second ring" in doc
    assert "first path" in doc
    assert doc.count("<!-- bench:ring -->") == 1


def test_unknown_suite_is_refused_without_touching_the_report(tmp_path: Path) -> None:
    output = tmp_path / "B.md"
    lines: list[str] = []
    code = bench.run(["nope"], SuiteOptions(), output, "scripts/bench nope", lines.append)
    assert code == bench.EXIT_BENCH_FAILED
    assert "unknown suite 'nope'" in lines[-1]
    assert not output.exists()


def test_a_failing_suite_reports_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ok(options: SuiteOptions, out: object) -> SuiteResult:
        return SuiteResult(sections=(Section("ok", (Paragraph("fine"),)),))

    def broken(options: SuiteOptions, out: object) -> SuiteResult:
        raise SuiteError("target did not start")

    monkeypatch.setattr(bench, "SUITES", (Suite("a", "ok", ok), Suite("b", "broken", broken)))
    output = tmp_path / "B.md"
    lines: list[str] = []
    code = bench.run([], SuiteOptions(), output, "scripts/bench", lines.append)
    assert code == bench.EXIT_BENCH_FAILED
    assert "error: suite b: target did not start" in lines
    assert "<!-- bench:a -->" in output.read_text()
