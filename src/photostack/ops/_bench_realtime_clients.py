"""The idle SSE clients of the ``realtime`` broadcast benchmark, in a process of their own.

``python -m photostack.ops._bench_realtime_clients`` reads one JSON line from stdin::

    {"host": H, "port": P, "tokens": [...], "count": N, "concurrency": C, "deadline_s": D}

opens ``count`` SSE streams on ``host:port`` (token ``i % len(tokens)`` for stream ``i``), prints
``opened N SECONDS`` once each has its ``retry:`` hint, then waits until every open stream got
its first event (or a ``stop`` line on stdin, or the deadline) and prints ``result {JSON}`` with
each receipt's latency: receipt wall-clock time minus the event's ``at`` (one host, one clock).

The clients run apart from the benchmark driver (which creates users and produces the events), so
the driver's own work does not delay receipts; receipt time is taken in ``data_received`` and
everything else (parsing ``at``) waits until the broadcast is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from photostack.ops._bench_procs import BenchError

__all__ = ["ClientProcess", "main"]

_AT = b'"at":"'


@dataclass
class _Receipts:
    expected: int = 0
    times: list[float] = field(default_factory=list)
    ats: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def got(self, now: float, at: bytes) -> None:
        self.times.append(now)
        self.ats.append(at)
        if self.expected and len(self.times) >= self.expected:
            self.done.set()

    def latencies_s(self) -> list[float]:
        return [
            now - datetime.fromisoformat(at.decode().replace("Z", "+00:00")).timestamp()
            for now, at in zip(self.times, self.ats, strict=True)
        ]


class _SseClient(asyncio.Protocol):
    """Open once the retry hint arrives; records its first event's receipt time."""

    __slots__ = ("_buffer", "_got_event", "_receipts", "_request", "opened", "transport")

    def __init__(self, request: bytes, receipts: _Receipts) -> None:
        self._request = request
        self._receipts = receipts
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._buffer = b""
        self._got_event = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.opened.done():
            self._buffer += data  # the head and the first body chunk may come apart
            if b"retry:" not in self._buffer:
                return
            self.opened.set_result(b" 200 " in self._buffer.split(b"\r\n", 1)[0])
            data, self._buffer = self._buffer, b""
        if self._got_event:
            return
        start = data.find(_AT)
        if start >= 0:
            start += len(_AT)
            self._got_event = True
            self._receipts.got(now, data[start : data.index(b'"', start)])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)


def _say(line: str) -> None:
    """One line to the benchmark driver (our stdout is its pipe)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _run(config: dict[str, Any]) -> None:
    host, port = str(config["host"]), int(config["port"])
    tokens: list[str] = list(config["tokens"])
    count, deadline_s = int(config["count"]), float(config["deadline_s"])
    loop = asyncio.get_running_loop()
    receipts = _Receipts()
    clients: list[_SseClient] = []
    gate = asyncio.Semaphore(int(config["concurrency"]))

    async def open_one(index: int) -> None:
        token = tokens[index % len(tokens)]
        request = (
            f"GET /v1/events/stream?access_token={token} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        ).encode()
        client = _SseClient(request, receipts)
        async with gate:
            try:
                await loop.create_connection(lambda: client, host, port)
            except OSError:
                return
            if await client.opened:
                clients.append(client)

    started = loop.time()
    # the clients that opened by the deadline are held; the report says how many (`held`)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*(open_one(i) for i in range(count)))
    receipts.expected = len(clients)
    gc.freeze()  # the held clients are long-lived: no full collection rescans them mid-broadcast
    _say(f"opened {len(clients)} {loop.time() - started:.3f}")
    stop = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
    done = asyncio.ensure_future(receipts.done.wait())
    await asyncio.wait({stop, done}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
    done.cancel()
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    result = {"opened": len(clients), "latencies_s": receipts.latencies_s()}
    _say("result " + json.dumps(result))
    stop.cancel()


class ClientProcess:
    """The driver's side: this module as a child process, with its config on stdin."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "photostack.ops._bench_realtime_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(config) + "\n")
        self._process.stdin.flush()

    async def line(self, prefix: str, timeout_s: float) -> str:
        """The rest of the next output line, which must start with ``prefix``."""
        assert self._process.stdout is not None
        async with asyncio.timeout(timeout_s):
            text = await asyncio.to_thread(self._process.stdout.readline)
        if not text.startswith(prefix):
            raise BenchError(f"the SSE client process said {text[:200]!r}, not {prefix!r}...")
        return text[len(prefix) :].strip()

    def close(self) -> None:
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()  # also ends its wait for a stop line
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


def main() -> int:
    config = json.loads(sys.stdin.readline())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = int(config["count"]) + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(config))
    else:
        uvloop.run(_run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
