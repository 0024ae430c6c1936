"""Suite ``realtime``: the four event transports, measured on a running cluster.

1. Same events, four transports at once (through the edge): short polling (every 1 s) against
   long polling, SSE and WebSocket — requests per delivered event, share of empty responses,
   delivery latency (event ``at`` to receipt).
2. One web process holding N idle SSE clients (direct to web-1, goal 10,000): memory per idle
   connection, then one event per user for all of them at once — broadcast latency to every one.

Bounded: fixed event counts, per-phase deadlines, loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
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
    all_delivered: asyncio.Event = field(default_factory=asyncio.Event)

    def delivered_one(self, latency_s: float) -> None:
        self.delivered += 1
        self.latencies_s.append(latency_s)
        if self.delivered >= self.opened:
            self.all_delivered.set()

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.opened if self.opened else math.nan


class _SseProtocol(asyncio.Protocol):
    """A minimal SSE client: open once the retry hint arrives; the first event's latency."""

    def __init__(self, request: bytes, figures: ConnectionFigures) -> None:
        self._request = request
        self._figures = figures
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._got_event = False
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self._buffer += data  # the head and the first body chunk may come apart
            if b"retry:" not in self._buffer:
                return
            self.opened.set_result(b" 200 " in self._buffer.split(b"\r\n", 1)[0])
            data, self._buffer = self._buffer, b""
        if not self._got_event and b'"at":"' in data:
            now = time.time()
            at = data.split(b'"at":"', 1)[1].split(b'"', 1)[0].decode()
            self._got_event = True
            self._figures.delivered_one(now - _at(at))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)


async def _hold_connections(
    api_url: str, web_url: str, pid: int, count: int, out: Out
) -> ConnectionFigures:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    figures = ConnectionFigures(count)
    async with httpx.AsyncClient(base_url=api_url, timeout=60.0) as api:
        users = await _new_users(api, BROADCAST_USERS)
        producer = (await _new_users(api, 1))[0]
        web = httpx.URL(web_url)
        loop = asyncio.get_running_loop()
        process = psutil.Process(pid)
        figures.rss_before = process.memory_info().rss
        protocols: list[_SseProtocol] = []
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def open_one(index: int) -> None:
            token = users[index % len(users)]["token"]
            request = (
                f"GET /v1/events/stream?access_token={token} HTTP/1.1\r\nHost: {web.host}\r\n\r\n"
            ).encode()
            protocol = _SseProtocol(request, figures)
            async with gate:
                try:
                    await loop.create_connection(lambda: protocol, web.host, web.port or 80)
                except OSError:
                    return
                if await protocol.opened:
                    protocols.append(protocol)

        started = loop.time()
        try:
            async with asyncio.timeout(PHASE_DEADLINE_S):
                await asyncio.gather(*(open_one(i) for i in range(count)))
            figures.opened = len(protocols)
            figures.open_s = loop.time() - started
            figures.rss_after = process.memory_info().rss
            out(f"  {figures.opened} open in {figures.open_s:.1f}s")
            async with asyncio.timeout(PHASE_DEADLINE_S):
                gate = asyncio.Semaphore(20)

                async def follow(user: dict[str, Any]) -> None:
                    async with gate:
                        await _follow(api, producer, user)

                await asyncio.gather(*(follow(u) for u in users))
                await figures.all_delivered.wait()
        except TimeoutError:
            out(f"  deadline: {figures.delivered} of {figures.opened} delivered")
        finally:
            for protocol in protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
    return figures


# -- report ----------------------------------------------------------------------------------


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
                "then one event for each user at once, so every client gets one. Memory per "
                "connection: web-1 RSS growth divided by the connections. Broadcast latency: "
                "event commit to receipt at each client; the clients run in the benchmark "
                "process, and the producers, app, Postgres and Redis on the same two cores. "
                "Goal: 10,000 clients, broadcast p99 ≤ 250 ms."
            ),
            Table(
                (
                    "clients",
                    "held",
                    "open s",
                    "KiB/conn",
                    "delivered",
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
