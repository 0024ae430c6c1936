"""`python -m photostack.ops.bench` (what `scripts/bench` runs): measure, then write BENCHMARKS.md.

Every figure is measured in one run and shown beside an anchor measured in the same run with
the same load generator and concurrency: today, ``GET /v1/users/{id}`` through a whole cluster
(edge → web → app → Postgres) against a bare uvicorn hello-world.

By default the bench starts its own cluster (`photostack up` on the default topology, in a
temporary data directory, on free ports), and stops it and removes its Postgres data at the
end. ``--use-running`` measures the cluster already running at ``--port-base`` instead.
The cluster is reached only through its control API and its public HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx

from photostack.cluster.engines import discard_postgres_data
from photostack.cluster.topology import CONTROL_PORT_OFFSET
from photostack.ops._bench_cpu import (
    TierRoots,
    busy_fraction,
    sample_machine,
    sample_self,
    sample_tiers,
    tier_cpu_used_s,
)
from photostack.ops._bench_path import (
    CLUSTER_LABEL,
    HELLO_LABEL,
    HELLO_TIER,
    TIERS,
    RequestPathFigures,
    TargetFigures,
    request_path_section,
)
from photostack.ops._bench_procs import (
    CLUSTER_READY_PREFIX,
    BenchError,
    create_user,
    free_port_base,
    read_nodes,
    start_cluster,
    start_hello,
    tier_roots,
)
from photostack.ops._bench_report import Machine, Report, detect_machine, render_report
from photostack.ops.loadgen import TIMES, LoadError, LoadPlan, run_load, summarize

__all__ = [
    "EXIT_BENCH_FAILED",
    "EXIT_OK",
    "EXIT_RUN_HAD_ERRORS",
    "BenchOptions",
    "main",
    "requests_for_window",
    "run",
]

EXIT_OK = 0
EXIT_BENCH_FAILED = 1
EXIT_RUN_HAD_ERRORS = 3  # BENCHMARKS.md was written, with a warning: some requests failed

HOST = "127.0.0.1"
REPORT_TITLE = "photostack benchmarks"

Out = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    requests: int = 3000
    concurrency: int = 16
    duration_cap_s: float = 60.0
    min_window_s: float = 2.0
    warmup_requests: int = 300
    output: Path = Path("BENCHMARKS.md")
    as_json: bool = False
    port_base: int | None = None
    use_running: bool = False
    ready_deadline_s: float = 240.0
    hello_ready_deadline_s: float = 30.0
    stop_timeout_s: float = 120.0


def run(options: BenchOptions, command: str, out: Out) -> int:
    """Run the benchmark and write the report. Returns the process exit code."""
    machine = detect_machine(len(os.sched_getaffinity(0)), datetime.now().astimezone())
    out(f"machine: {machine.line()}")
    try:
        with _loop() as runner, _cluster(options, out) as (api_url, roots):
            out(f"creating a user through {api_url}")
            user_id = create_user(api_url, f"bench_{secrets.token_hex(6)}")
            path = f"/v1/users/{user_id}"
            _check_ok(f"{api_url}{path}")
            hello = _measure_hello(runner, options, out)
            out(f"measuring GET {path} through the edge")
            cluster = _measure(
                runner,
                options,
                port=_port_of(api_url),
                path=path,
                roots=roots,
                label=CLUSTER_LABEL,
                tiers=TIERS,
            )
    except (BenchError, LoadError) as exc:
        out(f"error: {exc}")
        return EXIT_BENCH_FAILED
    figures = RequestPathFigures(
        hello=hello,
        cluster=cluster,
        requests=options.requests,
        concurrency=options.concurrency,
        cpus=machine.cpus,
        clock_tick_s=1 / os.sysconf("SC_CLK_TCK"),
    )
    report = Report(REPORT_TITLE, command, machine, (request_path_section(figures),))
    options.output.write_text(render_report(report), encoding="utf-8")
    out(f"wrote {options.output}")
    if options.as_json:
        click.echo(json.dumps(_as_json(machine, figures), indent=2))
    else:
        _print_summary(figures)
    return EXIT_RUN_HAD_ERRORS if figures.has_errors else EXIT_OK


def _measure_hello(runner: asyncio.Runner, options: BenchOptions, out: Out) -> TargetFigures:
    out("starting the uvicorn hello anchor")
    server, port = start_hello(options.hello_ready_deadline_s)
    try:
        out(f"measuring the hello anchor on port {port}")
        roots = [TierRoots(HELLO_TIER, (server.pid,))]
        return _measure(
            runner,
            options,
            port=port,
            path="/",
            roots=roots,
            label=HELLO_LABEL,
            tiers=(HELLO_TIER,),
        )
    finally:
        server.stop(options.stop_timeout_s)


def _measure(
    runner: asyncio.Runner,
    options: BenchOptions,
    *,
    port: int,
    path: str,
    roots: Sequence[TierRoots],
    label: str,
    tiers: Sequence[str],
) -> TargetFigures:
    """Warm up, then one measured run bracketed by CPU samples. Raises LoadError.

    The measured run has ``options.requests`` requests, or more when the warm-up's rate says
    that would take less than ``options.min_window_s``: CPU times move in clock ticks, and a
    fast target's window must hold enough of them.
    """
    requests = options.requests
    if options.warmup_requests > 0:
        warmup = runner.run(
            run_load(
                LoadPlan(
                    host=HOST,
                    port=port,
                    path=path,
                    requests=options.warmup_requests,
                    concurrency=options.concurrency,
                    duration_cap_s=options.duration_cap_s,
                )
            )
        )
        latencies_s = [ns / 1e9 for ns in warmup.latencies_ns]
        requests = requests_for_window(
            options.requests,
            options.concurrency,
            sum(latencies_s) / len(latencies_s) if latencies_s else math.nan,
            options.min_window_s,
        )
    plan = LoadPlan(
        host=HOST,
        port=port,
        path=path,
        requests=requests,
        concurrency=options.concurrency,
        duration_cap_s=options.duration_cap_s,
    )
    before = sample_tiers(roots)
    self_before, machine_before = sample_self(), sample_machine()
    result = runner.run(run_load(plan))
    # first: sampling the servers' trees costs CPU in this process
    self_after, machine_after = sample_self(), sample_machine()
    after = sample_tiers(roots)
    return TargetFigures(
        label=label,
        load=summarize(result),
        cpu_s_by_tier=tier_cpu_used_s(tiers, before, after),
        processes_by_tier={tier: len(after.get(tier, {})) for tier in tiers},
        loadgen_cpu_s=self_after - self_before,
        machine_busy_fraction=busy_fraction(machine_before, machine_after),
    )


def requests_for_window(
    requests: int, concurrency: int, mean_latency_s: float, min_window_s: float
) -> int:
    """``requests``, raised so that a run at the warm-up's pace lasts ``min_window_s``.

    The pace is Little's law (concurrency ÷ mean latency), which unlike the warm-up's
    wall time leaves out connection set-up.
    """
    if not math.isfinite(mean_latency_s) or mean_latency_s <= 0:
        return requests
    rate_per_s = concurrency / mean_latency_s
    return max(requests, math.ceil(rate_per_s * min_window_s))


@contextlib.contextmanager
def _loop() -> Iterator[asyncio.Runner]:
    """The generator's event loop: uvloop where available, to keep its own cost low."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


@contextlib.contextmanager
def _cluster(options: BenchOptions, out: Out) -> Iterator[tuple[str, list[TierRoots]]]:
    """The cluster to measure: (public API URL, process roots per tier). Raises BenchError."""
    if options.use_running:
        base = options.port_base if options.port_base is not None else 8080
        out(f"using the cluster running at port base {base}")
        yield f"http://{HOST}:{base}", _roots(base)
        return
    base = options.port_base if options.port_base is not None else free_port_base(HOST)
    data_dir = Path(tempfile.mkdtemp(prefix="photostack-bench-"))
    out(f"starting a cluster: photostack up --data-dir {data_dir} --port-base {base}")
    cluster = start_cluster(data_dir, base)
    ready = False
    try:
        line = cluster.wait_for_line(CLUSTER_READY_PREFIX, options.ready_deadline_s, echo=out)
        ready = True
        out(line)
        yield f"http://{HOST}:{base}", _roots(base)
    finally:
        out("stopping the cluster")
        code = cluster.stop(options.stop_timeout_s)
        if ready and code != 0:
            out(f"warning: photostack up exited with code {code}{cluster.tail()}")
        discard_postgres_data(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def _roots(port_base: int) -> list[TierRoots]:
    control_url = f"http://{HOST}:{port_base + CONTROL_PORT_OFFSET}"
    cluster, nodes = read_nodes(control_url)
    if not cluster.get("ready"):
        raise BenchError(f"the cluster at {control_url} is not ready")
    return tier_roots(nodes, TIERS)


def _check_ok(url: str) -> None:
    """One request before measuring, so a broken path fails loudly instead of as 100% errors."""
    try:
        response = httpx.get(url, timeout=30.0)
    except httpx.HTTPError as exc:
        raise BenchError(f"GET {url} failed: {exc}") from exc
    if response.status_code != 200:
        raise BenchError(f"GET {url} answered {response.status_code}: {response.text[:300]}")


def _port_of(url: str) -> int:
    port = httpx.URL(url).port
    if port is None:
        raise BenchError(f"no port in {url}")
    return port


def _print_summary(figures: RequestPathFigures) -> None:
    for target in (figures.hello, figures.cluster):
        load = target.load
        click.echo(
            f"{target.label}: {load.requests_per_s:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
            f"p99 {load.p99_ms:.2f} ms, {target.cpu_us_per_request():,.0f} CPU µs/req, "
            f"{load.errors} errors"
        )
    click.echo(
        f"ratios: req/s {figures.throughput_ratio:.2f}{TIMES}, "
        f"CPU/req {figures.cpu_ratio:.2f}{TIMES}, "
        f"edge CPU/req ÷ hello {figures.edge_cpu_ratio:.2f}{TIMES}"
    )


def _as_json(machine: Machine, figures: RequestPathFigures) -> dict[str, Any]:
    def target(t: TargetFigures) -> dict[str, Any]:
        body = asdict(t)
        body["cpu_us_per_request"] = t.cpu_us_per_request()
        body["cpu_us_per_request_by_tier"] = {k: t.cpu_us_per_request(k) for k in t.cpu_s_by_tier}
        body["loadgen_us_per_request"] = t.loadgen_us_per_request
        return body

    return _finite(
        {
            "machine": asdict(machine),
            "request_path": {
                "requests": figures.requests,
                "concurrency": figures.concurrency,
                "hello": target(figures.hello),
                "cluster": target(figures.cluster),
                "ratios": {
                    "throughput_cluster_over_hello": figures.throughput_ratio,
                    "cpu_per_request_cluster_over_hello": figures.cpu_ratio,
                    "cpu_per_request_edge_over_hello": figures.edge_cpu_ratio,
                },
            },
        }
    )


def _finite(value: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity become null: they are not JSON."""
    cleaned: dict[str, Any] = {k: _finite_any(v) for k, v in value.items()}
    return cleaned


def _finite_any(value: Any) -> Any:
    """NaN and infinity become null: they are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_any(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_any(v) for v in value]
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--requests",
    "requests",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Measured requests per target (at least: see --min-window-s).",
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
    help="Measure a fast target with more requests so its window lasts at least this long.",
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
    help="Where to write the report (relative to the repository root under scripts/bench).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
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
    """Measure photostack against a bare uvicorn hello and write BENCHMARKS.md."""
    options = BenchOptions(
        requests=requests,
        concurrency=concurrency,
        duration_cap_s=duration_cap_s,
        min_window_s=min_window_s,
        warmup_requests=warmup_requests,
        output=output,
        as_json=as_json,
        port_base=port_base,
        use_running=use_running,
    )
    command = shlex.join(["scripts/bench", *sys.argv[1:]])
    sys.exit(run(options, command, out=lambda line: click.echo(line, err=True)))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
