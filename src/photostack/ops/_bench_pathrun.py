"""The `path` bench suite: the public request path beside a bare uvicorn app.

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
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

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
from photostack.ops._bench_report import detect_machine
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult
from photostack.ops.loadgen import TIMES, LoadError, LoadPlan, run_load, summarize

__all__ = ["requests_for_window", "run_path_suite"]

HOST = "127.0.0.1"


def run_path_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """Measure ``GET /v1/users/{id}`` through a cluster and a uvicorn hello. Raises SuiteError."""
    machine = detect_machine(len(os.sched_getaffinity(0)), datetime.now().astimezone())
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
        raise SuiteError(str(exc)) from exc
    figures = RequestPathFigures(
        hello=hello,
        cluster=cluster,
        requests=options.requests,
        concurrency=options.concurrency,
        cpus=machine.cpus,
        clock_tick_s=1 / os.sysconf("SC_CLK_TCK"),
    )
    _print_summary(figures, out)
    return SuiteResult(
        sections=(request_path_section(figures),),
        figures=_as_json(figures),
        failed=figures.has_errors,
    )


def _measure_hello(runner: asyncio.Runner, options: SuiteOptions, out: Out) -> TargetFigures:
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
    options: SuiteOptions,
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
def _cluster(options: SuiteOptions, out: Out) -> Iterator[tuple[str, list[TierRoots]]]:
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


def _print_summary(figures: RequestPathFigures, out: Out) -> None:
    for target in (figures.hello, figures.cluster):
        load = target.load
        out(
            f"{target.label}: {load.requests_per_s:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
            f"p99 {load.p99_ms:.2f} ms, {target.cpu_us_per_request():,.0f} CPU µs/req, "
            f"{load.errors} errors"
        )
    out(
        f"ratios: req/s {figures.throughput_ratio:.2f}{TIMES}, "
        f"CPU/req {figures.cpu_ratio:.2f}{TIMES}, "
        f"edge CPU/req ÷ hello {figures.edge_cpu_ratio:.2f}{TIMES}"
    )


def _as_json(figures: RequestPathFigures) -> dict[str, Any]:
    def target(t: TargetFigures) -> dict[str, Any]:
        body = asdict(t)
        body["cpu_us_per_request"] = t.cpu_us_per_request()
        body["cpu_us_per_request_by_tier"] = {k: t.cpu_us_per_request(k) for k in t.cpu_s_by_tier}
        body["loadgen_us_per_request"] = t.loadgen_us_per_request
        return body

    return _finite(
        {
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
