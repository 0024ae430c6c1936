"""Suite `balancer`: the smart client's added latency per call, vs one direct keep-alive connection.

Both clients call the same local backend (the balancer's FakeBackend, raw asyncio + httptools)
one request at a time, in alternating blocks so drift hits both alike. The anchor is a minimal
client on one keep-alive connection (write the request, read head and Content-Length body); the
smart client adds backend choice, health bookkeeping, the retry rule and budget and its pool.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvloop

from photostack.blocks.balancer import (
    ActiveCheckConfig,
    Backend,
    ClientConfig,
    HealthConfig,
    SmartClient,
    StrategyName,
)
from photostack.blocks.balancer.testing import FakeBackend
from photostack.ops._bench_report import Paragraph, Section, Table, fmt
from photostack.ops.benchsuite import Out, SuiteOptions, SuiteResult

__all__ = ["LatencyFigures", "measure_added_latency", "run_balancer_suite"]

_BLOCK = 200


@dataclass(frozen=True)
class LatencyFigures:
    name: str
    samples_us: tuple[float, ...]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50_us(self) -> float:
        return statistics.median(self.samples_us)


class _DirectClient:
    """One keep-alive connection, nothing else: the anchor."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._request = (
            f"GET /bench HTTP/1.1\r\nHost: {backend.host}:{backend.port}\r\n\r\n"
        ).encode()

    async def call(self) -> None:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._backend.host, self._backend.port
            )
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _measure(requests: int, warmup: int) -> tuple[LatencyFigures, ...]:
    fakes = [FakeBackend("app-1"), FakeBackend("app-2")]
    backends = [await fake.start() for fake in fakes]
    direct = _DirectClient(backends[0])
    one = SmartClient(backends[:1])
    checked = ClientConfig(
        strategy=StrategyName.POWER_OF_TWO,
        health=HealthConfig(checks=ActiveCheckConfig(enabled=True)),
    )
    two = SmartClient(backends, checked)
    await two.start()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "direct keep-alive connection (anchor)": direct.call,
        "smart client, 1 backend, round-robin": lambda: one.request("GET", "/bench"),
        "smart client, 2 backends, power-of-two, checks on": lambda: two.request("GET", "/bench"),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for call in calls.values():
            for _ in range(warmup):
                await call()
        done = 0
        while done < requests:
            for name, call in calls.items():
                for _ in range(_BLOCK):
                    started = time.perf_counter()
                    await call()
                    samples[name].append((time.perf_counter() - started) * 1e6)
            done += _BLOCK
    finally:
        await direct.aclose()
        await one.aclose()
        await two.aclose()
        for fake in fakes:
            await fake.aclose()
    return tuple(LatencyFigures(name, tuple(values)) for name, values in samples.items())


def measure_added_latency(requests: int = 3000, warmup: int = 300) -> tuple[LatencyFigures, ...]:
    """Per-call latency of each client, the anchor first (runs its own event loop)."""
    return uvloop.run(_measure(requests, warmup))


def run_balancer_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    out(f"balancer: {options.requests} sequential calls per client, alternating blocks")
    figures = measure_added_latency(options.requests, options.warmup_requests)
    anchor = figures[0]
    rows = []
    for fig in figures:
        rows.append(
            (
                fig.name,
                fmt(fig.p50_us, 1),
                fmt(fig.quantile(0.99), 1),
                fmt(fig.p50_us - anchor.p50_us, 1),
                f"{fig.p50_us / anchor.p50_us:.2f}x",
            )
        )
    table = Table(("client", "p50 µs", "p99 µs", "added p50 µs", "p50 vs anchor"), tuple(rows))
    note = Paragraph(
        "One process, one request at a time against a local FakeBackend; the anchor is a bare "
        "asyncio client on one keep-alive connection. The difference is what the smart client "
        "costs per call: choice, health bookkeeping, retry rule and budget, connection pool."
    )
    return SuiteResult(
        sections=(Section("Smart client added latency", (table, note)),),
        figures={f.name: {"p50_us": f.p50_us, "p99_us": f.quantile(0.99)} for f in figures},
    )
