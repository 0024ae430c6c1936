"""BENCHMARKS.md rendering: header, sections of tables, paragraphs and bullets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from photostack.ops._bench_report import (
    Bullets,
    Machine,
    Paragraph,
    Report,
    Section,
    Table,
    cpu_model_from_cpuinfo,
    detect_machine,
    fmt,
    render_report,
)

MACHINE = Machine(cpus=2, cpu_model="AMD EPYC 7B13", python="3.11.7", date="2026-11-27 23:00 UTC")


def test_report_has_title_command_machine_then_sections_in_order() -> None:
    report = Report(
        "photostack benchmarks",
        "scripts/bench --requests 1000",
        MACHINE,
        (
            Section("First", (Paragraph("one"),)),
            Section("Second", (Bullets(("a", "b")),)),
        ),
    )
    text = render_report(report)
    assert text == (
        "# photostack benchmarks\n"
        "\n"
        "How to reproduce: `scripts/bench --requests 1000`\n"
        "\n"
        "Machine: 2 CPUs (AMD EPYC 7B13), Python 3.11.7, 2026-11-27 23:00 UTC\n"
        "\n"
        "## First\n"
        "\n"
        "one\n"
        "\n"
        "## Second\n"
        "\n"
        "- a\n"
        "- b\n"
    )


def test_table_right_aligns_numeric_columns_and_escapes_pipes() -> None:
    table = Table(("target", "req/s", "errors"), (("a|b", "1,000", "0"),), numeric_from=1)
    text = render_report(Report("t", "c", MACHINE, (Section("S", (table,)),)))
    assert "| target | req/s | errors |\n| --- | ---: | ---: |\n| a\\|b | 1,000 | 0 |" in text


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="cells"):
        Table(("a", "b"), (("1",),))


def test_fmt_groups_thousands_and_says_na_for_nan() -> None:
    assert fmt(12345.678) == "12,346"
    assert fmt(1.2345, 2) == "1.23"
    assert fmt(float("nan")) == "n/a"
    assert fmt(float("inf")) == "n/a"


def test_cpu_model_is_the_first_model_name() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: other\n"
    assert cpu_model_from_cpuinfo(text) == "AMD EPYC 7B13"
    assert cpu_model_from_cpuinfo("processor: 0\n") == "unknown CPU"


def test_detect_machine_reads_the_given_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name : Test CPU\n", encoding="utf-8")
    machine = detect_machine(4, datetime(2026, 1, 2, 3, 4, tzinfo=UTC), cpuinfo)
    assert machine.cpus == 4
    assert machine.cpu_model == "Test CPU"
    assert machine.date == "2026-01-02 03:04 UTC"
    assert machine.line().startswith("4 CPUs (Test CPU), Python ")
