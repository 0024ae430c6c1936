"""The `failover` bench suite (issue 5): failover time, writes lost, read scaling, sync cost.

One cluster of a bench topology (no chaos proxy): ``users`` synchronous with two replicas,
``social`` asynchronous with one replica serving reads (``max_replica_lag_s = 1``).

- **Failover**: a writer loop through the edge records every acknowledged write; the shard's
  primary gets SIGKILL through the control API; the time from the kill to the first acknowledged
  write that started after it, over ``sync_runs`` kills of ``users-1`` (writes: user creation)
  and ``async_runs`` of ``social-1`` (writes: follows); afterwards every acknowledged write is
  looked up. Between runs: the coordinator's anti-flap window and the old primary rejoining.
- **Read scaling**: uncached reads of follower pages for a fixed time with the replica serving
  the social part, against the same reads forced to the primary (a read-your-writes token no
  replica can satisfy) — the anchor in the same run.
- **Commit cost**: single-row INSERTs on the synchronous primary with ``synchronous_commit`` on
  (waits for the standby's flush) and ``remote_apply``, against ``local`` on the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from photostack.ops._bench_procs import (
    CLUSTER_READY_PREFIX,
    BenchError,
    ServerProcess,
    free_port_base,
)
from photostack.ops._bench_report import Bullets, Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult
from photostack.ops.loadgen import percentile

__all__ = ["BENCH_TOPOLOGY", "FailoverBenchConfig", "run_failover_suite"]

BENCH_TOPOLOGY = """
[cluster]
name = "photostack-failover-bench"
[edge]
count = 1
[web]
count = 1
[app]
count = 2
[cache]
count = 1
[storage.users]
shards = 1
replicas = 2
replication = "sync"
consistency = "cp"
[storage.social]
shards = 1
replicas = 1
replication = "async"
consistency = "ap"
max_replica_lag_s = 1.0
[storage.photos]
shards = 1
replicas = 0
[directory]
count = 2
replicas = 1
[workers]
count = 0
[queue]
replicas = 0
"""

_NEVER = "FFFFFFFF/FFFFFFFF"  # a read-your-writes LSN no replica has replayed: primary reads


@dataclass(frozen=True)
class FailoverBenchConfig:
    sync_runs: int = 10
    async_runs: int = 3
    writers: int = 4
    after_kill_s: float = 2.0  # writes kept going after they resumed
    read_window_s: float = 5.0
    read_concurrency: int = 16
    commits: int = 300
    deadline_s: float = 60.0


@dataclass
class Run:
    shard: str
    mode: str
    victim: str
    promoted: str
    resume_s: float | None
    acknowledged: int
    lost: int
    failed: int


@dataclass
class Figures:
    runs: list[Run] = field(default_factory=list)
    reads_per_s: dict[str, float] = field(default_factory=dict)
    read_targets: dict[str, dict[str, float]] = field(default_factory=dict)
    commit_ms: dict[str, float] = field(default_factory=dict)


def run_failover_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    cfg = FailoverBenchConfig()
    try:
        with _cluster(options, out) as urls:
            figures = asyncio.run(measure(urls, cfg, out))
    except (BenchError, httpx.HTTPError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise SuiteError(f"failover bench: {exc}") from exc
    sync = [r for r in figures.runs if r.mode != "async"]
    lost_sync = sum(r.lost for r in sync)
    return SuiteResult(
        sections=(section(figures, cfg),),
        figures=_json(figures),
        failed=lost_sync > 0 or any(r.resume_s is None for r in figures.runs),
    )


@contextlib.contextmanager
def _cluster(options: SuiteOptions, out: Out) -> Iterator[dict[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="photostack-failover-bench-"))
    topology = work / "topology.toml"
    topology.write_text(BENCH_TOPOLOGY)
    base = options.port_base or free_port_base()
    argv = [sys.executable, "-m", "photostack.cli", "up", "--topology", str(topology)]
    argv += ["--data-dir", str(work / "data"), "--port-base", str(base)]
    out(f"  starting a replicated cluster on port base {base}")
    server = ServerProcess(argv, "photostack up")
    try:
        server.wait_for_line(CLUSTER_READY_PREFIX, options.ready_deadline_s)
        yield {"api": f"http://127.0.0.1:{base}", "control": f"http://127.0.0.1:{base + 10}"}
    finally:
        server.stop(options.stop_timeout_s)
        from photostack.cluster.engines import discard_postgres_data

        discard_postgres_data(work / "data")
        out(f"  cluster logs kept in {work / 'data' / 'logs'}")


async def measure(urls: dict[str, str], cfg: FailoverBenchConfig, out: Out) -> Figures:
    figures = Figures()
    async with (
        httpx.AsyncClient(base_url=urls["api"], timeout=10) as api,
        httpx.AsyncClient(base_url=urls["control"], timeout=30) as control,
    ):
        await _until_coordinated(control, cfg.deadline_s)
        figures.commit_ms = await commit_costs(control, cfg)
        out(f"  commit p50 ms: {figures.commit_ms}")
        figures.reads_per_s, figures.read_targets = await read_scaling(api, control, cfg)
        out(f"  reads/s: {figures.reads_per_s}")
        plan = ["users-1"] * cfg.sync_runs + ["social-1"] * cfg.async_runs
        for index, shard in enumerate(plan, start=1):
            await _ready_for_failover(control, shard, cfg.deadline_s)
            run = await failover_run(api, control, shard, cfg)
            figures.runs.append(run)
            out(
                f"  run {index}/{len(plan)} {shard} ({run.mode}): {run.victim} -> {run.promoted}, "
                f"writes resumed after {run.resume_s} s, lost {run.lost}/{run.acknowledged}"
            )
    return figures


async def _view(control: httpx.AsyncClient) -> dict[str, Any]:
    answer: dict[str, Any] = (await control.get("/v1/replication")).raise_for_status().json()
    return answer


async def _until_coordinated(control: httpx.AsyncClient, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError):
            view = await _view(control)
            if view.get("leader") and len(view.get("shards", {})) >= 2:
                return
        await asyncio.sleep(0.5)  # the coordinator's first rounds
    raise BenchError("no coordinator leader")


async def _ready_for_failover(control: httpx.AsyncClient, shard: str, deadline_s: float) -> None:
    """Every replica streaming and the anti-flap window over (the previous run's failover)."""
    end = time.monotonic() + deadline_s
    view = await _view(control)
    wait = float(view["config"]["min_failover_interval_s"])
    last = [f for f in view.get("failovers", []) if f["shard"] == shard and f["result"] == "done"]
    if last:
        at = _timestamp(str(last[0]["at"]))
        await asyncio.sleep(max(0.0, at + wait + 1.0 - time.time()))  # the anti-flap window
    while time.monotonic() < end:
        replicas = (await _view(control))["shards"][shard]["replicas"].values()
        if replicas and all(r.get("state") == "streaming" for r in replicas):
            return
        await asyncio.sleep(0.5)  # the old primary rejoining
    raise BenchError(f"{shard}: replicas not streaming within {deadline_s:.0f}s")


def _timestamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace(" ", "T")).timestamp()


async def failover_run(  # noqa: PLR0915 - one kill, told in order
    api: httpx.AsyncClient, control: httpx.AsyncClient, shard: str, cfg: FailoverBenchConfig
) -> Run:
    before = (await _view(control))["shards"][shard]
    victim = before["primary"]
    tag = uuid.uuid4().hex[:6]
    owner = ""
    targets: list[str] = []
    if shard.startswith("social"):
        owner_body = (await api.post("/v1/users", json={"username": f"fb_{tag}"})).json()
        owner = owner_body["id"]
        token = owner_body["token"]
        for i in range(60):
            r = await api.post("/v1/users", json={"username": f"fb_{tag}_{i}"})
            targets.append(r.json()["id"])
    acked: list[tuple[float, str]] = []
    failed = 0
    stop = asyncio.Event()
    resumed_event = asyncio.Event()
    kill_at = [float("inf")]
    counter = iter(range(10**6))

    async def writer(w: int) -> None:
        nonlocal failed
        while not stop.is_set():
            n = next(counter)
            started = time.monotonic()
            try:
                if owner:
                    if n >= len(targets):
                        return
                    target = targets[n]
                    r = await api.put(
                        f"/v1/users/{owner}/following/{target}",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    ok, key = r.status_code == 204, target
                else:
                    r = await api.post("/v1/users", json={"username": f"fb_{tag}_{w}_{n}"})
                    ok = r.status_code == 201
                    key = r.json()["id"] if ok else ""
            except httpx.HTTPError:
                ok, key = False, ""
            if ok:
                acked.append((started, key))
                if started > kill_at[0]:
                    resumed_event.set()
            else:
                failed += 1
                await asyncio.sleep(0.02)
            if owner:
                await asyncio.sleep(0.1)  # follows are paced: 60 targets must last the run

    tasks = [asyncio.create_task(writer(w)) for w in range(cfg.writers if not owner else 1)]
    await asyncio.sleep(1.0)
    (await control.post(f"/v1/nodes/{victim}/kill")).raise_for_status()
    killed = kill_at[0] = time.monotonic()  # SIGKILL sent: no later write can reach it
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(resumed_event.wait(), cfg.deadline_s)
    resumed = [t for t, _ in acked if t > killed]
    resume_s = None
    if resumed:
        # first acknowledged write that started after the kill; its completion is within 10 ms
        resume_s = round(min(resumed) - killed, 3)
        await asyncio.sleep(cfg.after_kill_s)
    stop.set()
    await asyncio.gather(*tasks)
    after = (await _view(control))["shards"][shard]
    lost = await _lost(api, owner, [k for _, k in acked])
    return Run(
        shard,
        before["replication"],
        victim,
        after["primary"],
        resume_s,
        len(acked),
        lost,
        failed,
    )


async def _lost(api: httpx.AsyncClient, owner: str, keys: list[str]) -> int:
    if owner:
        r = await api.get(f"/v1/users/{owner}/following", params={"limit": 100})
        seen = {item["id"] for item in r.raise_for_status().json()["items"]}
        return sum(1 for k in keys if k not in seen)
    lost = 0
    for key in keys:
        if (await api.get(f"/v1/users/{key}")).status_code != 200:
            lost += 1
    return lost


async def read_scaling(
    api: httpx.AsyncClient, control: httpx.AsyncClient, cfg: FailoverBenchConfig
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    ids = [
        (await api.post("/v1/users", json={"username": f"rs_{uuid.uuid4().hex[:10]}"})).json()["id"]
        for _ in range(20)
    ]
    await asyncio.sleep(1.5)  # the replica catches up: reads within the bound go there
    rates: dict[str, float] = {}
    targets: dict[str, dict[str, float]] = {}
    for label, headers in (
        ("primary only (anchor)", {"X-Read-After": f"social-1={_NEVER}"}),
        ("replica within 1 s", {}),
    ):
        before = await _read_counters(control)
        rates[label] = await _read_window(api, ids, headers, cfg)
        after = await _read_counters(control)
        targets[label] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return rates, targets


async def _read_window(
    api: httpx.AsyncClient, ids: list[str], headers: dict[str, str], cfg: FailoverBenchConfig
) -> float:
    done = 0
    end = time.monotonic() + cfg.read_window_s

    async def reader(i: int) -> None:
        nonlocal done
        while time.monotonic() < end:
            user = ids[(i + done) % len(ids)]
            r = await api.get(f"/v1/users/{user}/followers?limit=7", headers=headers)
            if r.status_code == 200:
                done += 1

    await asyncio.gather(*(reader(i) for i in range(cfg.read_concurrency)))
    return done / cfg.read_window_s


async def _read_counters(control: httpx.AsyncClient) -> dict[str, float]:
    """photostack_reads_total by target, summed over the app nodes (their /metrics)."""
    cluster = (await control.get("/v1/cluster")).json()
    totals: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for node in cluster["nodes"]:
            if node["role"] != "app":
                continue
            text = (await client.get(f"http://{node['address']}/metrics")).text
            for line in text.splitlines():
                if line.startswith("photostack_reads_total{"):
                    target = line.split('target="')[1].split('"')[0]
                    totals[target] = totals.get(target, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def commit_costs(control: httpx.AsyncClient, cfg: FailoverBenchConfig) -> dict[str, float]:
    """p50 ms of one-row INSERT commits on the synchronous primary, per synchronous_commit."""
    shard_map = (await control.get("/v1/directory/map")).json()
    dsn = shard_map["groups"]["users"]["shards"][0]["primary"]["dsn"]
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, at timestamptz)"
        )
        out = {}
        for mode in ("local", "on", "remote_apply"):
            await conn.execute(f"SET synchronous_commit = {mode}")
            times = []
            for _ in range(cfg.commits):
                started = time.perf_counter()
                await conn.execute("INSERT INTO bench_commit (at) VALUES (now())")
                times.append((time.perf_counter() - started) * 1000)
            out[mode] = statistics.median(times)
        await conn.execute("SET synchronous_commit = local")
        await conn.execute("TRUNCATE bench_commit")
    finally:
        await conn.close()
    return out


def section(figures: Figures, cfg: FailoverBenchConfig) -> Section:
    rows = []
    for mode in ("sync", "async"):
        runs = [r for r in figures.runs if (r.mode == "async") == (mode == "async")]
        times = sorted(r.resume_s for r in runs if r.resume_s is not None)
        if not runs:
            continue
        rows.append(
            (
                f"{runs[0].shard} ({mode}), {len(runs)} kills",
                fmt(percentile(times, 50), 2) if times else "never",
                fmt(max(times), 2) if times else "never",
                str(sum(r.acknowledged for r in runs)),
                str(sum(r.lost for r in runs)),
                str(sum(r.failed for r in runs)),
            )
        )
    local = figures.commit_ms.get("local", float("nan"))
    commit_rows = tuple(
        (mode, fmt(ms, 3), fmt(ms / local, 2)) for mode, ms in figures.commit_ms.items()
    )
    anchor = "primary only (anchor)"
    read_rows = tuple(
        (
            label,
            fmt(rate, 0),
            fmt(rate / figures.reads_per_s[anchor], 2),
            ", ".join(f"{k} {int(v)}" for k, v in sorted(figures.read_targets[label].items())),
        )
        for label, rate in figures.reads_per_s.items()
    )
    return Section(
        "Replication and failover",
        (
            Paragraph(
                "SIGKILL of a shard's primary under a write loop through the edge (goal: writes "
                "resume within 3 s; Patroni's defaults take 20-30 s). Time = kill -> first "
                "acknowledged write that started after it. Lost = acknowledged writes not "
                "readable afterwards."
            ),
            Table(
                (
                    "shard (mode), runs",
                    "resume p50 s",
                    "resume max s",
                    "acknowledged",
                    "lost",
                    "failed requests",
                ),
                tuple(rows),
            ),
            Paragraph(
                f"Commit cost on the synchronous primary: one-row INSERT p50 over {cfg.commits} "
                "commits per setting, same server and table (anchor: `local`)."
            ),
            Table(("synchronous_commit", "p50 ms", "x local"), commit_rows),
            Paragraph(
                f"Read scaling: uncached follower pages, {cfg.read_concurrency} concurrent "
                f"readers for {cfg.read_window_s:g} s each; the anchor forces every read to the "
                "primary with a read-your-writes token no replica satisfies. Reads by target are "
                "the app nodes' `photostack_reads` counters (a page reads users and social)."
            ),
            Table(("reads", "reads/s", "x anchor", "user-store reads by target"), read_rows),
            Bullets(
                (
                    "One machine: primary, replicas and clients share the same cores, so a replica "
                    "adds no CPU; read scaling shows the routing works, not extra capacity.",
                )
            ),
        ),
    )


def _json(figures: Figures) -> dict[str, Any]:
    return {
        "runs": [vars(r) for r in figures.runs],
        "reads_per_s": figures.reads_per_s,
        "read_targets": figures.read_targets,
        "commit_ms": figures.commit_ms,
    }
