"""`python -m photostack.ops.bench [SUITE ...]` (what `scripts/bench` runs).

Runs the named suites (all of them by default), each measuring against an anchor measured in the
same run, and rewrites each suite's part of BENCHMARKS.md, leaving the other suites' parts as
they were. Adding a suite is one line in ``SUITES``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import click

from photostack.ops._bench_balancer import run_balancer_suite
from photostack.ops._bench_cache import run_cache_suite
from photostack.ops._bench_cache_product import run_cache_product_suite
from photostack.ops._bench_cdn import run_cdn_suite
from photostack.ops._bench_failover import run_failover_suite
from photostack.ops._bench_indexes import run_indexes_suite
from photostack.ops._bench_pathrun import _finite, run_path_suite
from photostack.ops._bench_proxy import run_proxy_suite
from photostack.ops._bench_queue import run_queue_suite
from photostack.ops._bench_realtime import run_realtime_suite
from photostack.ops._bench_report import detect_machine
from photostack.ops._bench_reshard import run_reshard_suite
from photostack.ops._bench_ring import run_ring_suite
from photostack.ops._bench_uploads import run_uploads_suite
from photostack.ops.benchsuite import (
    Out,
    Suite,
    SuiteError,
    SuiteOptions,
    merge_suite_block,
    render_suite_block,
)

__all__ = ["EXIT_BENCH_FAILED", "EXIT_OK", "EXIT_RUN_HAD_ERRORS", "SUITES", "main", "run"]

EXIT_OK = 0
EXIT_BENCH_FAILED = 1
EXIT_RUN_HAD_ERRORS = 3  # BENCHMARKS.md was written, with a warning: some requests failed

REPORT_HEADER = """# photostack benchmarks

Every figure below is measured by `scripts/bench` and shown beside an anchor measured in the same
run, with the same load generator, on the machine named in each suite's line. Rerun one suite with
`scripts/bench NAME`; `scripts/bench` runs them all.
"""

SUITES: tuple[Suite, ...] = (
    Suite("path", "GET /v1/users/{id} through the edge vs a bare uvicorn hello", run_path_suite),
    Suite("balancer", "Smart client latency per call vs a direct connection", run_balancer_suite),
    Suite("cache", "Eviction hit ratios (Zipf); cache node vs redis-server", run_cache_suite),
    Suite("ring", "Consistent-hash lookups/s, skew, keys moved vs uhashring", run_ring_suite),
    Suite("realtime", "Short vs long polling vs SSE vs WebSocket; 10k SSE", run_realtime_suite),
    Suite("proxy", "One backend direct, through nginx and through the edge", run_proxy_suite),
    Suite("queue", "Queue tasks/s enqueue->done: Postgres, RabbitMQ vs PgQueuer", run_queue_suite),
    Suite("cacheproduct", "Ring cost, DB load on cache kill, hit RR/hash", run_cache_product_suite),
    Suite("uploads", "Upload-to-thumbnail latency p50/p99 vs Pillow in-process", run_uploads_suite),
    Suite("cdn", "A cached 10 KB object: CDN edge vs nginx serving the file", run_cdn_suite),
    Suite("failover", "Primary kill: writes resume p50/max, loss; reads; sync", run_failover_suite),
    Suite("reshard", "add-shard under load: keys moved vs k/(n+1), failures", run_reshard_suite),
    Suite("indexes", "Insert rows/s with all indexes vs each index dropped", run_indexes_suite),
)


def run(
    names: list[str],
    options: SuiteOptions,
    output: Path,
    command: str,
    out: Out,
    *,
    as_json: bool = False,
) -> int:
    """Run suites and update ``output``; print their figures as JSON on stdout when asked.

    Returns the process exit code.
    """
    known = {suite.name: suite for suite in SUITES}
    unknown = [name for name in names if name not in known]
    if unknown:
        out(f"error: unknown suite {unknown[0]!r} (known: {', '.join(known)})")
        return EXIT_BENCH_FAILED
    chosen = [known[name] for name in names] if names else list(SUITES)
    machine = detect_machine(len(os.sched_getaffinity(0)), datetime.now().astimezone())
    out(f"machine: {machine.line()}")
    code = EXIT_OK
    figures: dict[str, object] = {}
    for suite in chosen:
        out(f"suite {suite.name}: {suite.summary}")
        try:
            result = suite.run(options, out)
        except SuiteError as exc:
            out(f"error: suite {suite.name}: {exc}")
            code = EXIT_BENCH_FAILED
            continue
        document = output.read_text(encoding="utf-8") if output.exists() else REPORT_HEADER
        block = render_suite_block(suite.name, result, machine, command)
        order = [s.name for s in SUITES]
        output.write_text(merge_suite_block(document, suite.name, block, order), encoding="utf-8")
        out(f"wrote suite {suite.name} to {output}")
        figures[suite.name] = result.figures
        if result.failed and code == EXIT_OK:
            code = EXIT_RUN_HAD_ERRORS
    if as_json and figures:
        click.echo(json.dumps(_finite({"suites": figures}), indent=2))
    return code


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("suites", nargs=-1)
@click.option(
    "--requests",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Measured requests per target (at least).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Concurrent keep-alive connections.",
)
@click.option(
    "--duration-cap-s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Stop a measured run after this many seconds.",
)
@click.option(
    "--min-window-s",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Measure a fast target with more requests so its window lasts this long.",
)
@click.option(
    "--warmup-requests",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Unmeasured requests per target before measuring.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("BENCHMARKS.md"),
    show_default=True,
    help="The report to update.",
)
@click.option("--json", "as_json", is_flag=True, help="Also print the figures as JSON.")
@click.option(
    "--port-base",
    type=click.IntRange(1024, 65000),
    default=None,
    help="Port base of the cluster (default: a free one; 8080 with --use-running).",
)
@click.option(
    "--use-running",
    is_flag=True,
    help="Measure the cluster already running at --port-base instead of starting one.",
)
def cli(
    suites: tuple[str, ...],
    *,
    requests: int,
    concurrency: int,
    duration_cap_s: float,
    min_window_s: float,
    warmup_requests: int,
    output: Path,
    as_json: bool,
    port_base: int | None,
    use_running: bool,
) -> None:
    """Run benchmark SUITES (default: all) and update BENCHMARKS.md."""
    options = SuiteOptions(
        requests=requests,
        concurrency=concurrency,
        duration_cap_s=duration_cap_s,
        min_window_s=min_window_s,
        warmup_requests=warmup_requests,
        port_base=port_base,
        use_running=use_running,
    )
    command = shlex.join(["scripts/bench", *sys.argv[1:]])
    code = run(
        list(suites),
        options,
        output,
        command,
        lambda line: click.echo(line, err=True),
        as_json=as_json,
    )
    sys.exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
