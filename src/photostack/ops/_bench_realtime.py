"""Suite ``realtime``: the four event transports, measured on a running cluster.

1. Same events, four transports at once (through the edge): short polling (every 1 s) against
   long polling, SSE and WebSocket — requests per delivered event, share of empty responses,
   delivery latency (event ``at`` to receipt).
2. One web process holding N idle SSE clients (direct to web-1, goal 10,000; the clients in a
   process of their own, ``_bench_realtime_clients``): memory per idle connection, then one
   event per user for all of them at once — broadcast latency to every one.

Bounded: fixed event counts, per-phase deadlines, loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import websockets
from websockets.asyncio.client import connect

from photostack.cluster.engines import discard_postgres_data
from photostack.cluster.topology import layout, load_topology
from photostack.ops._bench_procs import (
    CLUSTER_READY_PREFIX,
    BenchError,
    free_port_base,
    read_nodes,
    start_cluster,
)
from photostack.ops._bench_realtime_clients import ClientProcess
from photostack.ops._bench_report import Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteError, SuiteOptions, SuiteResult
from photostack.ops.loadgen import percentile

__all__ = ["run_realtime_suite"]

HOST = "127.0.0.1"
USERS = 10  # recipients in the transport comparison
# (events, total rate per s): 1 event/s per user, then 0.1 event/s per user (a quieter feed)
RATES = ((100, 10.0), (20, 1.0))
SHORT_POLL_INTERVAL_S = 1.0
LONG_POLL_TIMEOUT_S = 30
CONNECTIONS = (1_000, 10_000)  # idle SSE clients on one web process (goal 10,000)
BROADCAST_USERS = 100  # the connections are spread over these users; one event each
OPEN_CONCURRENCY = 200
PHASE_DEADLINE_S = 120.0
DIRECT_METRIC = 'photostack_web_event_deliveries_total{path="direct"}'


@dataclass
class TransportStats:
    name: str
    expected: int
    requests: int = 0
    empty: int = 0
    latencies_s: list[float] = field(default_factory=list)
    seen: set[tuple[str, int]] = field(default_factory=set)
    complete: asyncio.Event = field(default_factory=asyncio.Event)  # all expected events delivered

    def record(self, user: str, events: list[dict[str, Any]], now: float) -> None:
        for event in events:
            key = (user, int(event["seq"]))
            if key in self.seen:
                continue  # at-least-once transports may repeat: count each event once
            self.seen.add(key)
            self.latencies_s.append(now - _at(event["at"]))
        if len(self.seen) >= self.expected:
            self.complete.set()


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_realtime_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    try:
        with (
            _cluster(options, out) as (api, web1_url, web1_pid),
            asyncio.Runner(loop_factory=_loop_factory()) as runner,
        ):
            stats = []
            for events, rate in RATES:
                out(f"transports: {events} events at {rate:g}/s to {USERS} users")
                stats.append(runner.run(_compare_transports(api, events, rate)))
            conns = []
            for count in CONNECTIONS:
                out(f"connections: {count} idle SSE clients on web-1")
                conns.append(runner.run(_hold_connections(api, web1_url, web1_pid, count, out)))
    except BenchError as exc:
        raise SuiteError(str(exc)) from exc
    return _result(stats, conns)


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@contextlib.contextmanager
def _cluster(options: SuiteOptions, out: Out) -> Iterator[tuple[str, str, int]]:
    """(API URL, web-1 URL, web-1 pid) of the default-topology cluster to measure."""
    if options.use_running:
        base = options.port_base if options.port_base is not None else 8080
        yield _addresses(base)
        return
    base = options.port_base if options.port_base is not None else free_port_base(HOST)
    data_dir = Path(tempfile.mkdtemp(prefix="photostack-bench-rt-"))
    out(f"starting a cluster: photostack up --data-dir {data_dir} --port-base {base}")
    cluster = start_cluster(data_dir, base)
    try:
        out(cluster.wait_for_line(CLUSTER_READY_PREFIX, options.ready_deadline_s, echo=out))
        yield _addresses(base)
    finally:
        out("stopping the cluster")
        cluster.stop(options.stop_timeout_s)
        discard_postgres_data(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def _addresses(base: int) -> tuple[str, str, int]:
    lay = layout(load_topology(None), base)
    web1 = lay.node("web-1")
    _, nodes = read_nodes(f"http://{HOST}:{lay.control_port}")
    pid = next((n.pid for n in nodes if n.name == "web-1"), None)
    if pid is None:
        raise BenchError("web-1 has no pid (is it running?)")
    return f"http://{HOST}:{lay.api_port}", f"http://{web1.host}:{web1.port}", pid


async def _new_users(api: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    async def one() -> dict[str, Any]:
        r = await api.post("/v1/users", json={"username": f"rt_{uuid.uuid4().hex[:16]}"})
        if r.status_code != 201:
            raise BenchError(f"POST /v1/users answered {r.status_code}: {r.text[:200]}")
        return dict(r.json())

    users: list[dict[str, Any]] = []
    for start in range(0, count, 50):
        users.extend(await asyncio.gather(*(one() for _ in range(min(50, count - start)))))
    return users


async def _follow(api: httpx.AsyncClient, who: dict[str, Any], target: dict[str, Any]) -> None:
    r = await api.put(
        f"/v1/users/{who['id']}/following/{target['id']}",
        headers={"Authorization": f"Bearer {who['token']}"},
    )
    if r.status_code != 204:
        raise BenchError(f"follow answered {r.status_code}: {r.text[:200]}")


# -- 1. transports ---------------------------------------------------------------------------


async def _compare_transports(url: str, events: int, rate: float) -> dict[str, TransportStats]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as api:
        recipients = await _new_users(api, USERS)
        producers = await _new_users(api, math.ceil(events / USERS))
        names = ("short poll", "long poll", "SSE", "WebSocket")
        stats = {n: TransportStats(n, events) for n in names}
        stop = asyncio.Event()
        ready: list[asyncio.Event] = []
        tasks = []
        for user in recipients:
            for name, run in (("SSE", _sse_client), ("WebSocket", _ws_client)):
                event = asyncio.Event()
                ready.append(event)
                tasks.append(asyncio.create_task(run(url, user, stats[name], stop, event)))
            tasks.append(asyncio.create_task(_short_poller(api, user, stats["short poll"], stop)))
            tasks.append(asyncio.create_task(_long_poller(api, user, stats["long poll"], stop)))
        async with asyncio.timeout(PHASE_DEADLINE_S):
            await asyncio.gather(*(e.wait() for e in ready))
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(events):
                await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
                await _follow(api, producers[i // USERS], recipients[i % USERS])
            await asyncio.gather(*(s.complete.wait() for s in stats.values()))
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return stats


async def _short_poller(
    api: httpx.AsyncClient, user: dict[str, Any], stats: TransportStats, stop: asyncio.Event
) -> None:
    after = 0
    headers = {"Authorization": f"Bearer {user['token']}"}
    while not stop.is_set():
        r = await api.get(f"/v1/events?after={after}", headers=headers)
        body = r.json()
        stats.requests += 1
        stats.empty += not body["events"]
        stats.record(user["id"], body["events"], time.time())
        after = body["next"]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHORT_POLL_INTERVAL_S):
                await stop.wait()


async def _long_poller(
    api: httpx.AsyncClient, user: dict[str, Any], stats: TransportStats, stop: asyncio.Event
) -> None:
    after = 0
    headers = {"Authorization": f"Bearer {user['token']}"}
    while not stop.is_set():
        path = f"/v1/events/wait?after={after}&timeout_s={LONG_POLL_TIMEOUT_S}"
        body = (await api.get(path, headers=headers)).json()
        stats.requests += 1
        stats.empty += not body["events"]
        stats.record(user["id"], body["events"], time.time())
        after = body["next"]


async def _sse_client(
    url: str,
    user: dict[str, Any],
    stats: TransportStats,
    stop: asyncio.Event,
    ready: asyncio.Event,
) -> None:
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10.0, read=120.0)) as client,
        client.stream("GET", f"/v1/events/stream?access_token={user['token']}") as response,
    ):
        stats.requests += 1
        async for line in response.aiter_lines():
            if line.startswith("retry:"):
                ready.set()
            elif line.startswith("data: "):
                stats.record(user["id"], [json.loads(line[6:])], time.time())


async def _ws_client(
    url: str,
    user: dict[str, Any],
    stats: TransportStats,
    stop: asyncio.Event,
    ready: asyncio.Event,
) -> None:
    ws_url = url.replace("http://", "ws://") + f"/v1/ws?access_token={user['token']}"
    async with connect(ws_url) as ws:
        stats.requests += 1
        ready.set()
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                event = json.loads(message)
                stats.record(user["id"], [event], time.time())
                await ws.send(json.dumps({"op": "ack", "seq": event["seq"]}))


# -- 2. connections --------------------------------------------------------------------------


@dataclass
class ConnectionFigures:
    target: int
    opened: int = 0
    open_s: float = math.nan
    rss_before: int = 0
    rss_after: int = 0
    delivered: int = 0
    latencies_s: list[float] = field(default_factory=list)
    direct: float = math.nan  # deliveries web-1 wrote straight to the socket (no task wake-up)

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.opened if self.opened else math.nan


async def _hold_connections(
    api_url: str, web_url: str, pid: int, count: int, out: Out
) -> ConnectionFigures:
    """``count`` idle SSE clients on web-1, held by a client process of their own (so this
    process's HTTP work does not delay receipts), then one event for each user at once."""
    figures = ConnectionFigures(count)
    async with httpx.AsyncClient(base_url=api_url, timeout=60.0) as api:
        users = await _new_users(api, BROADCAST_USERS)
        producer = (await _new_users(api, 1))[0]
        web = httpx.URL(web_url)
        process = psutil.Process(pid)
        figures.rss_before = process.memory_info().rss
        pushed_before = await _direct_deliveries(web_url)
        clients = ClientProcess(
            {
                "host": web.host,
                "port": web.port or 80,
                "tokens": [u["token"] for u in users],
                "count": count,
                "concurrency": OPEN_CONCURRENCY,
                "deadline_s": PHASE_DEADLINE_S,
            }
        )
        try:
            opened, open_s = (await clients.line("opened ", PHASE_DEADLINE_S + 30)).split()
            figures.opened, figures.open_s = int(opened), float(open_s)
            figures.rss_after = process.memory_info().rss
            out(f"  {figures.opened} open in {figures.open_s:.1f}s")
            gate = asyncio.Semaphore(20)

            async def follow(user: dict[str, Any]) -> None:
                async with gate:
                    await _follow(api, producer, user)

            async with asyncio.timeout(PHASE_DEADLINE_S):
                await asyncio.gather(*(follow(u) for u in users))
            result = json.loads(await clients.line("result ", PHASE_DEADLINE_S + 30))
        finally:
            clients.close()
        figures.latencies_s = [float(x) for x in result["latencies_s"]]
        figures.delivered = len(figures.latencies_s)
        if figures.delivered < figures.opened:
            out(f"  deadline: {figures.delivered} of {figures.opened} delivered")
        figures.direct = await _direct_deliveries(web_url) - pushed_before
    return figures


async def _direct_deliveries(web_url: str) -> float:
    """web-1's count of deliveries written straight to a connection (its /metrics)."""
    async with httpx.AsyncClient(base_url=web_url, timeout=10.0) as web:
        text = (await web.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(DIRECT_METRIC):
            return float(line.rsplit(" ", 1)[1])
    return math.nan


# -- report ----------------------------------------------------------------------------------


def _share(part: float, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole and not math.isnan(part) else "—"


def _ms(values: list[float], pct: float) -> str:
    return fmt(percentile(sorted(values), pct) * 1000, 1)


def _transport_rows(stats: dict[str, TransportStats], label: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for s in stats.values():
        delivered = len(s.seen)
        per_event = s.requests / delivered if delivered else math.nan
        empty = f"{100 * s.empty / s.requests:.0f}%" if s.name.endswith("poll") else "—"
        rows.append(
            (
                label,
                s.name,
                str(s.requests),
                str(delivered),
                fmt(per_event, 2),
                empty,
                _ms(s.latencies_s, 50),
                _ms(s.latencies_s, 99),
            )
        )
    return rows


def _result(stats: list[dict[str, TransportStats]], conns: list[ConnectionFigures]) -> SuiteResult:
    rows: list[tuple[str, ...]] = []
    for (events, rate), one in zip(RATES, stats, strict=True):
        rows.extend(_transport_rows(one, f"{rate / USERS:g}/s per user ({events} events)"))
    transports = Section(
        "Real-time transports: same events, four transports",
        (
            Paragraph(
                f"`follower.new` events to {USERS} users at two rates; each user has one client "
                f"per transport, all through the edge. Short polling asks every "
                f"{SHORT_POLL_INTERVAL_S:g} s, long polling waits up to {LONG_POLL_TIMEOUT_S} s; "
                "SSE and WebSocket count one request per connection. Latency: from the event's "
                "commit time (`at`) to receipt by the client."
            ),
            Table(
                (
                    "event rate",
                    "transport",
                    "requests",
                    "events",
                    "requests/event",
                    "empty",
                    "p50 ms",
                    "p99 ms",
                ),
                tuple(rows),
                numeric_from=2,
            ),
        ),
    )
    conn_rows: list[tuple[str, ...]] = []
    for c in conns:
        lat = c.latencies_s
        conn_rows.append(
            (
                str(c.target),
                str(c.opened),
                fmt(c.open_s, 1),
                fmt(c.bytes_per_connection / 1024, 1),
                str(c.delivered),
                _share(c.direct, c.delivered),
                _ms(lat, 50),
                _ms(lat, 99),
                _ms(lat, 100),
            )
        )
    capacity = Section(
        "Real-time connections on one web process",
        (
            Paragraph(
                f"Idle SSE clients opened directly on web-1 (spread over {BROADCAST_USERS} users), "
                "then one event for each user at once (20 follows in flight), so every client "
                "gets one. Memory per connection: web-1 RSS growth divided by the connections. "
                "Direct: the share of deliveries web-1 wrote straight to the socket (encoded "
                "once per broadcast, no task wake-up; from its /metrics). Broadcast latency: "
                "event commit (`at`) to receipt at each client, on the same host clock. The "
                "clients run in a process of their own; the benchmark driver, app, Postgres "
                "and Redis share the same two cores. Goal: 10,000 clients, broadcast p99 ≤ 250 ms."
            ),
            Table(
                (
                    "clients",
                    "held",
                    "open s",
                    "KiB/conn",
                    "delivered",
                    "direct",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                ),
                tuple(conn_rows),
            ),
        ),
    )
    figures = {
        "transports": [
            {
                s.name: {
                    "requests": s.requests,
                    "events": len(s.seen),
                    "empty": s.empty,
                    "p50_ms": percentile(sorted(s.latencies_s), 50) * 1000,
                    "p99_ms": percentile(sorted(s.latencies_s), 99) * 1000,
                }
                for s in one.values()
            }
            for one in stats
        ],
        "connections": [
            {
                "target": c.target,
                "opened": c.opened,
                "bytes_per_connection": c.bytes_per_connection,
                "delivered": c.delivered,
                "direct": c.direct,
                "broadcast_p50_ms": percentile(sorted(c.latencies_s), 50) * 1000,
                "broadcast_p99_ms": percentile(sorted(c.latencies_s), 99) * 1000,
            }
            for c in conns
        ],
    }
    failed = any(len(s.seen) < s.expected for one in stats for s in one.values()) or any(
        c.delivered < c.opened for c in conns
    )
    return SuiteResult((transports, capacity), figures, failed=failed)
