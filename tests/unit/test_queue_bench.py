"""The queue bench's report section, from figures (no engines)."""

from __future__ import annotations

from photostack.ops._bench_queue import (
    OURS_PG,
    OURS_RABBIT,
    PGQUEUER,
    EngineRun,
    QueueBenchConfig,
    queue_section,
)
from photostack.ops._bench_report import Table, render_sections


def test_section_reports_medians_and_ratios_against_pgqueuer() -> None:
    runs = {
        PGQUEUER: [
            EngineRun(PGQUEUER, 100, 100, 1.0, 0.5),
            EngineRun(PGQUEUER, 100, 100, 0.5, 0.4),
        ],
        OURS_PG: [EngineRun(OURS_PG, 100, 100, 0.5, 0.3)],
    }
    section = queue_section(runs, QueueBenchConfig(tasks=100, rounds=2))
    table = next(block for block in section.blocks if isinstance(block, Table))
    rows = {row[0]: row for row in table.rows}
    assert rows[PGQUEUER][1] == "150"  # median of 100 and 200 tasks/s
    assert rows[OURS_PG][4] == "2.00x"  # paired with round 1 (100 tasks/s)
    assert rows[OURS_RABBIT][1:] == ("n/a", "n/a", "n/a", "n/a")
    assert "enqueue" in render_sections((section,))


def test_an_incomplete_run_counts_only_what_finished() -> None:
    run = EngineRun(OURS_PG, 100, 40, 2.0, 1.0)
    assert not run.complete
    assert run.tasks_per_s == 20.0
