"""The request-path figures, ratios, section and interpretation, from made-up measurements."""
# ruff: noqa: RUF001 - the reports print ratios and counts with the multiplication sign

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from photostack.ops._bench_path import (
    CLUSTER_LABEL,
    HELLO_LABEL,
    SECTION_TITLE,
    RequestPathFigures,
    TargetFigures,
    interpret,
    request_path_section,
)
from photostack.ops._bench_report import Bullets, Machine, Paragraph, Report, Table, render_report
from photostack.ops.loadgen import LoadSummary


def _load(ok: int, elapsed_s: float, errors: int = 0, detail: str = "") -> LoadSummary:
    return LoadSummary(
        ok=ok,
        errors=errors,
        elapsed_s=elapsed_s,
        requests_per_s=ok / elapsed_s,
        p50_ms=1.5,
        p99_ms=9.25,
        error_detail=detail,
    )


def _figures(cluster_errors: int = 0) -> RequestPathFigures:
    # hello: 1000 req in 0.1 s, 0.05 s CPU -> 10,000 req/s, 50 µs/req
    hello = TargetFigures(
        label=HELLO_LABEL,
        load=_load(1000, 0.1),
        cpu_s_by_tier={"uvicorn hello": 0.05},
        processes_by_tier={"uvicorn hello": 1},
        loadgen_cpu_s=0.02,
    )
    # cluster: 1000 req in 2 s, 1.0 s CPU -> 500 req/s, 1000 µs/req
    cluster = TargetFigures(
        label=CLUSTER_LABEL,
        load=_load(1000, 2.0, cluster_errors, "503×2" if cluster_errors else ""),
        cpu_s_by_tier={"edge": 0.1, "web": 0.4, "app": 0.3, "cache": 0.0, "postgres": 0.2},
        processes_by_tier={"edge": 1, "web": 2, "app": 2, "cache": 3, "postgres": 40},
        loadgen_cpu_s=0.03,
    )
    return RequestPathFigures(
        hello=hello, cluster=cluster, requests=1000, concurrency=16, cpus=2, clock_tick_s=0.001
    )


def test_cpu_per_request_sums_tiers_over_2xx_responses() -> None:
    figures = _figures()
    assert figures.hello.cpu_us_per_request() == pytest.approx(50.0)
    assert figures.cluster.cpu_us_per_request() == pytest.approx(1000.0)
    assert figures.cluster.cpu_us_per_request("web") == pytest.approx(400.0)
    assert figures.cluster.cpu_us_per_request("missing") == 0.0
    assert figures.cluster.loadgen_us_per_request == pytest.approx(30.0)


def test_ratios_are_cluster_over_hello() -> None:
    figures = _figures()
    assert figures.throughput_ratio == pytest.approx(0.05)
    assert figures.cpu_ratio == pytest.approx(20.0)
    assert figures.edge_cpu_ratio == pytest.approx(2.0)


def test_no_successes_give_nan_figures_not_a_crash() -> None:
    figures = _figures()
    failed = replace(figures.cluster, load=_load(0, 1.0, errors=5, detail="502×5"))
    figures = replace(figures, cluster=failed)
    assert math.isnan(figures.cluster.cpu_us_per_request())
    assert math.isnan(figures.cpu_ratio)
    assert "no successful responses" in interpret(figures)


def test_busy_fraction_counts_servers_and_generator() -> None:
    # (1.0 + 0.03) CPU seconds over 2 s on 2 CPUs
    assert _figures().cluster.busy_fraction(2) == pytest.approx(1.03 / 4)


def test_section_has_summary_tier_table_and_ratios() -> None:
    section = request_path_section(_figures())
    assert section.title == SECTION_TITLE
    tables = [b for b in section.blocks if isinstance(b, Table)]
    summary, tiers = tables
    assert summary.headers == ("target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors")
    assert summary.rows == (
        (HELLO_LABEL, "10,000", "1.50", "9.25", "50", "0"),
        (CLUSTER_LABEL, "500", "1.50", "9.25", "1,000", "0"),
    )
    by_tier = {row[0]: row for row in tiers.rows}
    assert by_tier["web"] == ("web", "2", "400", "40%", "8.00×")
    assert by_tier["postgres"][1:3] == ("40", "200")
    assert by_tier["**cluster total**"][2:] == ("1,000", "100%", "20.0×")
    (ratios,) = [b for b in section.blocks if isinstance(b, Bullets)]
    assert ratios.items == (
        "throughput, cluster ÷ hello: **0.0500×**",
        "CPU µs/request, cluster ÷ hello: **20.0×**",
        "CPU µs/request, edge alone ÷ hello: **2.00×**",
    )


def test_errors_are_announced_first_and_shown_in_the_table() -> None:
    section = request_path_section(_figures(cluster_errors=2))
    first = section.blocks[0]
    assert isinstance(first, Paragraph)
    assert first.text.startswith("**Warning: this run had errors**")
    assert "503×2" in first.text
    summary = next(b for b in section.blocks if isinstance(b, Table))
    assert summary.rows[1][-1] == "2 (503×2)"


def test_a_clean_run_has_no_warning() -> None:
    section = request_path_section(_figures())
    assert not any(isinstance(b, Paragraph) and "Warning" in b.text for b in section.blocks)


def test_interpretation_is_written_from_the_numbers() -> None:
    text = interpret(_figures())
    assert "5.0% of the bare hello's request rate" in text
    assert "20.0× its CPU per request (1,000 µs vs 50 µs)" in text
    assert "The web tier costs the most (40%" in text
    assert "then app (30%)" in text
    assert "edge proxy alone spends 2.00× the CPU" in text
    assert "forwarding a request costs more than answering it" in text
    assert "only 26% busy" in text  # latency-bound, not CPU-bound
    assert "clock ticks" not in text


def test_interpretation_says_when_cpu_bound_and_when_cpu_times_are_coarse() -> None:
    figures = _figures()
    busy = replace(figures.cluster, cpu_s_by_tier={"edge": 0.4, "web": 3.2})
    coarse = replace(figures, cluster=busy, clock_tick_s=0.01)
    text = interpret(coarse)
    assert "bound by CPU" in text
    assert "bare uvicorn hello (5 ticks)" in text


def test_section_renders_into_a_report() -> None:
    machine = Machine(2, "cpu", "3.11", "today")
    text = render_report(Report("t", "scripts/bench", machine, (request_path_section(_figures()),)))
    assert f"## {SECTION_TITLE}\n" in text
    assert f"| {CLUSTER_LABEL} | 500 |" in text


def test_the_method_paragraph_gives_each_targets_measured_count() -> None:
    section = request_path_section(_figures(cluster_errors=2))
    text = " ".join(b.text for b in section.blocks if isinstance(b, Paragraph))
    assert "at least 1,000 measured requests per target" in text
    assert "1,000 in 0.1 s for the hello, 1,002 in 2.0 s for the cluster" in text


def test_the_machine_wide_figure_decides_saturation_and_flags_other_load() -> None:
    figures = _figures()
    # ours: 26% busy; the machine: 95% -> someone else used ~69% of the CPUs
    cluster = replace(figures.cluster, machine_busy_fraction=0.95)
    hello = replace(figures.hello, machine_busy_fraction=0.55)  # ours 35%
    text = interpret(replace(figures, cluster=cluster, hello=hello))
    assert "CPUs were 95% busy, so its req/s is bound by CPU" in text
    assert "outside the benchmark" in text
    assert "20% during the hello run, 69% during the cluster run" in text


def test_a_quiet_machine_gets_no_noise_note() -> None:
    figures = _figures()
    cluster = replace(figures.cluster, machine_busy_fraction=0.30)
    hello = replace(figures.hello, machine_busy_fraction=0.20)
    text = interpret(replace(figures, cluster=cluster, hello=hello))
    assert "only 30% busy" in text
    assert "outside the benchmark" not in text
