"""The asyncio side of the chaos proxy: listen, connect upstream, pump bytes through the toxics.

One ``ChaosLink`` is one listen address forwarding to one upstream. Each accepted connection
gets an upstream connection and two flows; each flow is a reader task (applies blackhole and
reset budgets, stamps each chunk with its due time) and a writer task (waits for the due time,
paces under a bandwidth cap, writes). A bounded queue between them keeps TCP back-pressure.
Toxics are read per chunk, so switching one acts on open connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from photostack.blocks.chaos._errors import LinkNotFound
from photostack.blocks.chaos._toxics import (
    Flow,
    LinkToxics,
    OrderedDelay,
    Pacer,
    ResetBudget,
    Toxic,
    ToxicKind,
    split_for_rate,
)

__all__ = ["ChaosLink", "ChaosProxy", "LinkConfig"]

log = logging.getLogger("photostack.chaos")

_QUEUE_CHUNKS = 64  # per flow: beyond this the reader stops reading (back-pressure)
_EOF = b""


@dataclass(frozen=True)
class LinkConfig:
    """One link: clients connect to ``listen_*``; the proxy connects to ``upstream_*``."""

    name: str
    listen_host: str
    listen_port: int  # 0: any free port (tests)
    upstream_host: str
    upstream_port: int
    connect_timeout_s: float = 5.0
    read_chunk_bytes: int = 65536


class ChaosLink:
    """A TCP forwarder whose behaviour is set by the toxics active on it."""

    def __init__(self, config: LinkConfig, *, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.toxics = LinkToxics()
        self._rand = rand
        self._server: asyncio.Server | None = None
        self._port = config.listen_port
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.connections_total = 0
        self.resets_total = 0
        self.bytes_total = {Flow.UPSTREAM: 0, Flow.DOWNSTREAM: 0}
        self.dropped_bytes_total = 0

    def __repr__(self) -> str:
        state = "down" if self.toxics.is_down else "up"
        return f"<ChaosLink {self.config.name} :{self._port} {state} {self.toxics!r}>"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def port(self) -> int:
        """The port clients connect to (known after ``start`` when configured as 0)."""
        return self._port

    @property
    def is_listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen. Raises OSError when the port is taken."""
        await self._listen()

    async def aclose(self) -> None:
        self._closed = True
        await self._stop_listening()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- toxics --------------------------------------------------------------------------------

    async def add_toxic(self, body: Mapping[str, Any]) -> Toxic:
        """Activate a toxic (raises ToxicConfigError) and apply what it changes at once."""
        toxic = self.toxics.add(body)
        log.info("%s: +%s %s", self.name, toxic.id, toxic.to_json())
        await self._reconcile()
        return toxic

    async def remove_toxic(self, toxic_id: str) -> Toxic:
        """Deactivate a toxic (raises ToxicNotFound); the link heals what it no longer has."""
        toxic = self.toxics.remove(toxic_id)
        log.info("%s: -%s", self.name, toxic.id)
        self._healed(toxic)
        await self._reconcile()
        return toxic

    async def clear_toxics(self) -> list[Toxic]:
        removed = self.toxics.clear()
        for toxic in removed:
            self._healed(toxic)
        await self._reconcile()
        return removed

    def _healed(self, toxic: Toxic) -> None:
        if toxic.kind is ToxicKind.BLACKHOLE:
            # bytes were dropped mid-stream: those connections are corrupt, so end them
            for conn in list(self._conns):
                if conn.dropped_bytes:
                    conn.abort()
        if toxic.kind is ToxicKind.BANDWIDTH:
            for conn in self._conns:
                conn.forget_pacing()

    async def _reconcile(self) -> None:
        if self.toxics.is_down:
            await self._stop_listening()
            for conn in list(self._conns):
                conn.abort()
            return
        if self.toxics.resets_at_once():
            for conn in list(self._conns):
                conn.reset()
        if self._server is None and not self._closed:
            await self._listen()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": c.name,
            "listen": f"{c.listen_host}:{self._port}",
            "upstream": f"{c.upstream_host}:{c.upstream_port}",
            "state": "down" if self.toxics.is_down else "up",
            "toxics": [t.to_json() for t in self.toxics.active()],
            "connections": len(self._conns),
            "connections_total": self.connections_total,
            "resets_total": self.resets_total,
            "bytes_total": {flow.value: n for flow, n in self.bytes_total.items()},
            "dropped_bytes_total": self.dropped_bytes_total,
        }

    # -- listening -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        server = await asyncio.start_server(
            self._accepted, self.config.listen_host, self._port, reuse_address=True
        )
        self._port = server.sockets[0].getsockname()[1]
        self._server = server

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket is gone: new connections are refused

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self.connections_total += 1
        if self.toxics.is_down:
            conn.abort()
            return
        if self.toxics.resets_at_once():
            conn.reset()
            return
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _Connection:
    """One client connection and its upstream twin."""

    def __init__(
        self, link: ChaosLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.dropped_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._pacers = {Flow.UPSTREAM: Pacer(), Flow.DOWNSTREAM: Pacer()}
        self._budgets: dict[tuple[str, Flow], ResetBudget] = {}
        self._ended = False

    async def run(self) -> None:
        cfg = self.link.config
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                self.upstream = await asyncio.open_connection(cfg.upstream_host, cfg.upstream_port)
        except (OSError, TimeoutError) as exc:
            log.info("%s: upstream unreachable: %r", cfg.name, exc)
            self.abort()
            return
        up_reader, up_writer = self.upstream
        c_reader, c_writer = self.client
        flows = [
            self._flow(Flow.UPSTREAM, c_reader, up_writer),
            self._flow(Flow.DOWNSTREAM, up_reader, c_writer),
        ]
        self._tasks = [self.link._spawn(f) for f in flows]
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close()

    async def _flow(
        self, flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        chunks: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(_QUEUE_CHUNKS)
        pump = self.link._spawn(self._read(flow, reader, chunks))
        try:
            await self._write(flow, writer, chunks)
        except (OSError, ConnectionError):
            self.abort()
        finally:
            pump.cancel()

    async def _read(
        self,
        flow: Flow,
        reader: asyncio.StreamReader,
        chunks: asyncio.Queue[tuple[float, bytes | None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        order = OrderedDelay()
        toxics = self.link.toxics
        try:
            while True:
                data = await reader.read(self.link.config.read_chunk_bytes)
                now = loop.time()
                if not data:
                    await chunks.put((order.due(now, 0.0), _EOF))
                    return
                if toxics.is_blackholed(flow):
                    self.dropped_bytes += len(data)
                    self.link.dropped_bytes_total += len(data)
                    continue
                data, reset = self._spend_budgets(flow, data)
                due = order.due(now, toxics.latency_s(flow, self.link._rand))
                if data:
                    await chunks.put((due, data))
                if reset:
                    await chunks.put((due, None))  # None: reset once what came before is out
                    return
        except (OSError, ConnectionError):
            self.abort()

    def _spend_budgets(self, flow: Flow, data: bytes) -> tuple[bytes, bool]:
        forward, reset = len(data), False
        for toxic in self.link.toxics.resets(flow):
            budget = self._budgets.setdefault(
                (toxic.id, flow), ResetBudget(int(toxic.attribute("after_bytes")))
            )
            allowed, fires = budget.consume(forward)
            forward, reset = allowed, reset or fires
        return data[:forward], reset

    async def _write(
        self,
        flow: Flow,
        writer: asyncio.StreamWriter,
        chunks: asyncio.Queue[tuple[float, bytes | None]],
    ) -> None:
        loop = asyncio.get_running_loop()
        toxics = self.link.toxics
        while True:
            due, data = await chunks.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the latency toxic: this wait is the fault
            if data is None:
                self.reset()
                return
            if data == _EOF:
                delay = toxics.close_delay_s(flow)
                if delay > 0:
                    await asyncio.sleep(delay)  # the slow-close toxic: the FIN comes late
                if writer.can_write_eof():
                    writer.write_eof()
                return
            await self._send(flow, writer, data)

    async def _send(self, flow: Flow, writer: asyncio.StreamWriter, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        rate = self.link.toxics.rate_bytes_per_s(flow)
        if rate is None:
            writer.write(data)
        else:
            offset = 0
            for size in split_for_rate(len(data), rate):
                start = self._pacers[flow].start_at(loop.time(), size, rate)
                if start > loop.time():
                    await asyncio.sleep(start - loop.time())  # the bandwidth toxic's pacing
                writer.write(data[offset : offset + size])
                offset += size
                await writer.drain()
        await writer.drain()
        self.link.bytes_total[flow] += len(data)

    def forget_pacing(self) -> None:
        for pacer in self._pacers.values():
            pacer.reset()

    # -- endings -------------------------------------------------------------------------------

    def _writers(self) -> list[asyncio.StreamWriter]:
        writers = [self.client[1]]
        if self.upstream is not None:
            writers.append(self.upstream[1])
        return writers

    def _close(self) -> None:
        if self._ended:
            return
        self._ended = True
        for writer in self._writers():
            writer.close()

    def abort(self) -> None:
        """Drop both sides at once (no orderly close)."""
        if self._ended:
            return
        self._ended = True
        for task in self._tasks:
            task.cancel()
        for writer in self._writers():
            writer.transport.abort()

    def reset(self) -> None:
        """Send RST to both peers: SO_LINGER 0, then close."""
        if self._ended:
            return
        self.link.resets_total += 1
        for writer in self._writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()


class ChaosProxy:
    """Several links served from one event loop (the chaos node's)."""

    def __init__(
        self, configs: list[LinkConfig], *, rand: Callable[[], float] = random.random
    ) -> None:
        self.links = {c.name: ChaosLink(c, rand=rand) for c in configs}

    def __repr__(self) -> str:
        return f"<ChaosProxy {list(self.links)}>"

    def link(self, name: str) -> ChaosLink:
        try:
            return self.links[name]
        except KeyError:
            raise LinkNotFound(f"no link named {name!r}") from None

    async def start(self) -> None:
        started: list[ChaosLink] = []
        try:
            for link in self.links.values():
                await link.start()
                started.append(link)
        except OSError:
            for link in started:
                await link.aclose()
            raise

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self.links.values()))
