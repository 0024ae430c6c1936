"""A small HTTP/1.1 load generator: C keep-alive connections, bounded in requests and in time.

Cheap on purpose: on a 2-core machine the generator shares the CPU with the servers it measures,
so it uses raw asyncio Protocols, httptools for parsing (the same C parser uvicorn uses), one
pre-encoded request, and a timer handle per request instead of a task. It runs in its own
process (the bench process); the servers are other processes.

Every response is timed; non-2xx responses and transport failures are counted as errors and
reported, never dropped. A chunked response fails the run loudly: the generator reads
Content-Length bodies only, and a server that switches to chunked encoding is a finding.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import httptools

__all__ = [
    "TIMES",
    "LoadError",
    "LoadPlan",
    "LoadProtocolError",
    "LoadResult",
    "LoadSummary",
    "percentile",
    "run_load",
    "summarize",
]


TIMES = "\N{MULTIPLICATION SIGN}"  # "503 times 4" in error details, and ratios in reports


class LoadError(Exception):
    """The load generator could not do its job (root of this module's errors)."""


class LoadProtocolError(LoadError):
    """The server answered something the generator does not read (bad HTTP, chunked body)."""


@dataclass(frozen=True)
class LoadPlan:
    """One run: ``requests`` GETs of ``path`` over ``concurrency`` keep-alive connections.

    The run ends when ``requests`` responses (or failures) are in, or ``duration_cap_s`` has
    passed since the first request, whichever comes first.
    """

    host: str
    port: int
    path: str
    requests: int
    concurrency: int
    duration_cap_s: float
    connect_timeout_s: float = 5.0
    response_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError("requests and concurrency must be at least 1")
        if self.duration_cap_s <= 0:
            raise ValueError("duration_cap_s must be positive")

    def request_bytes(self) -> bytes:
        """The one request every connection sends, encoded once."""
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "User-Agent: photostack-loadgen\r\n"
            "Accept: */*\r\n"
            "\r\n"
        ).encode("ascii")


@dataclass(frozen=True)
class LoadResult:
    """Raw outcome of a run: every response's latency and status, every transport failure."""

    latencies_ns: tuple[int, ...]
    statuses: Mapping[int, int]
    transport_errors: Mapping[str, int]
    elapsed_s: float
    hit_duration_cap: bool = False

    @property
    def responses(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        """Responses with a 2xx status."""
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def errors(self) -> int:
        """Non-2xx responses plus transport failures."""
        return self.responses - self.ok + sum(self.transport_errors.values())


@dataclass(frozen=True)
class LoadSummary:
    """The figures a benchmark table shows for one run."""

    ok: int
    errors: int
    elapsed_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    error_detail: str = ""
    hit_duration_cap: bool = False


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN when there are none.

    Raises ValueError when ``pct`` is outside (0, 100].
    """
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    if not sorted_values:
        return math.nan
    rank = math.ceil(pct / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


def summarize(result: LoadResult) -> LoadSummary:
    """Throughput counts 2xx responses only; latency percentiles cover every response."""
    ordered = sorted(result.latencies_ns)
    details = [
        f"{status}{TIMES}{n}"
        for status, n in sorted(result.statuses.items())
        if not 200 <= status < 300
    ]
    details += [f"{kind}{TIMES}{n}" for kind, n in sorted(result.transport_errors.items())]
    return LoadSummary(
        ok=result.ok,
        errors=result.errors,
        elapsed_s=result.elapsed_s,
        requests_per_s=result.ok / result.elapsed_s if result.elapsed_s > 0 else math.nan,
        p50_ms=percentile(ordered, 50) / 1e6,
        p99_ms=percentile(ordered, 99) / 1e6,
        error_detail=", ".join(details),
        hit_duration_cap=result.hit_duration_cap,
    )


async def run_load(plan: LoadPlan) -> LoadResult:
    """Run ``plan`` against a live server. Raises LoadProtocolError on a response it can't read.

    Connection failures and timeouts are not raised: they are counted in the result, and the
    worker reconnects for its next request.
    """
    loop = asyncio.get_running_loop()
    recorder = _Recorder()
    started = loop.time()
    tickets = _Tickets(plan.requests, deadline=started + plan.duration_cap_s, loop=loop)
    workers = [
        asyncio.create_task(_worker(plan, tickets, recorder))
        for _ in range(min(plan.concurrency, plan.requests))
    ]
    try:
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
    return LoadResult(
        latencies_ns=tuple(recorder.latencies_ns),
        statuses=dict(recorder.statuses),
        transport_errors=dict(recorder.transport_errors),
        elapsed_s=loop.time() - started,
        hit_duration_cap=tickets.hit_deadline,
    )


@dataclass
class _Recorder:
    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)


class _Tickets:
    """Hands out request slots until the count is spent or the deadline has passed."""

    def __init__(self, count: int, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        self._left = count
        self._deadline = deadline
        self._loop = loop
        self.hit_deadline = False

    def take(self) -> bool:
        if self._left <= 0:
            return False
        if self._loop.time() >= self._deadline:
            self.hit_deadline = True
            return False
        self._left -= 1
        return True


async def _worker(plan: LoadPlan, tickets: _Tickets, recorder: _Recorder) -> None:
    loop = asyncio.get_running_loop()
    request = plan.request_bytes()
    conn: _Connection | None = None
    try:
        while tickets.take():
            if conn is None or not conn.is_open:
                try:
                    conn = await _connect(loop, plan)
                except (OSError, TimeoutError) as exc:
                    recorder.transport_errors[_failure_kind(exc)] += 1
                    conn = None
                    continue
            start_ns = time.perf_counter_ns()
            try:
                status = await conn.exchange(request, plan.response_timeout_s)
            except (OSError, TimeoutError) as exc:
                recorder.transport_errors[_failure_kind(exc)] += 1
                conn.abort()
                conn = None
                continue
            recorder.latencies_ns.append(time.perf_counter_ns() - start_ns)
            recorder.statuses[status] += 1
    finally:
        if conn is not None:
            conn.close()


async def _connect(loop: asyncio.AbstractEventLoop, plan: LoadPlan) -> _Connection:
    async with asyncio.timeout(plan.connect_timeout_s):
        _, protocol = await loop.create_connection(lambda: _Connection(loop), plan.host, plan.port)
    return protocol


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError):
        return "connection lost"
    return type(exc).__name__


class _Connection(asyncio.Protocol):
    """One keep-alive client connection: send a request, resolve a future with the status."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._chunked = False
        self._keep_alive = True

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._keep_alive

    async def exchange(self, request: bytes, timeout_s: float) -> int:
        """Send ``request`` and return the response status.

        Raises TimeoutError, ConnectionError (the server closed), LoadProtocolError.
        """
        if self._transport is None:
            raise ConnectionResetError("connection closed before the request")
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._waiter = waiter
        self._timer = self._loop.call_later(timeout_s, self._on_timeout)
        self._transport.write(request)
        try:
            return await waiter
        finally:
            self._timer.cancel()
            self._waiter = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(LoadProtocolError(f"unreadable HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionResetError("the server closed the connection"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True

    def on_message_complete(self) -> None:
        if self._chunked:
            self._fail(
                LoadProtocolError("the server sent a chunked body; loadgen reads Content-Length")
            )
            return
        self._keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._parser.get_status_code())
        if not self._keep_alive:
            self.close()

    # -- failures ------------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        self._fail(TimeoutError("no response in time"))

    def _fail(self, exc: BaseException) -> None:
        self._keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
