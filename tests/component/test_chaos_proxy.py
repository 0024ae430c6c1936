"""The chaos proxy over real loopback sockets: every toxic does what it says, measured, and
removing it restores the link."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from photostack.blocks.chaos import ChaosLink, LinkConfig

pytestmark = pytest.mark.component

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _serve_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream: echo a line; ``bulk N`` sends N bytes; ``bye`` answers and closes."""
    try:
        while line := await reader.readline():
            if line.startswith(b"bulk "):
                writer.write(b"x" * int(line.split()[1]))
            elif line == b"bye\n":
                writer.write(b"bye\n")
                await writer.drain()
                break
            else:
                writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def _link() -> AsyncIterator[ChaosLink]:
    upstream = await asyncio.start_server(_serve_line, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    link = ChaosLink(LinkConfig("test", "127.0.0.1", 0, "127.0.0.1", port))
    await link.start()
    try:
        yield link
    finally:
        await link.aclose()
        upstream.close()


async def _connect(link: ChaosLink) -> Streams:
    return await asyncio.open_connection("127.0.0.1", link.port)


async def _rtt_s(streams: Streams) -> float:
    reader, writer = streams
    start = time.perf_counter()
    writer.write(b"ping\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
    return time.perf_counter() - start


async def _median_rtt_s(streams: Streams, n: int = 5) -> float:
    return statistics.median([await _rtt_s(streams) for _ in range(n)])


def _run(test: Callable[[ChaosLink], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _link() as link:
            await test(link)

    asyncio.run(main())


def test_a_clean_link_forwards_both_ways_and_counts_bytes() -> None:
    async def test(link: ChaosLink) -> None:
        streams = await _connect(link)
        assert await _rtt_s(streams) < 0.5
        described = link.describe()
        assert described["bytes_total"] == {"upstream": 5, "downstream": 5}
        assert described["connections"] == 1
        streams[1].close()

    _run(test)


def test_latency_adds_the_configured_delay_per_direction_and_removal_restores() -> None:
    async def test(link: ChaosLink) -> None:
        streams = await _connect(link)
        base = await _median_rtt_s(streams)
        toxic = await link.add_toxic(
            {"type": "latency", "direction": "downstream", "attributes": {"latency_ms": 100}}
        )
        one_way = await _median_rtt_s(streams)
        assert 0.1 <= one_way - base < 0.16, (base, one_way)
        both = await link.add_toxic(
            {"type": "latency", "direction": "upstream", "attributes": {"latency_ms": 50}}
        )
        two_way = await _median_rtt_s(streams)
        assert 0.15 <= two_way - base < 0.21, (base, two_way)
        await link.remove_toxic(toxic.id)
        await link.remove_toxic(both.id)
        assert await _median_rtt_s(streams) < base + 0.03
        streams[1].close()

    _run(test)


def test_jitter_spreads_delays_around_the_latency() -> None:
    async def test(link: ChaosLink) -> None:
        streams = await _connect(link)
        await link.add_toxic({"type": "latency", "attributes": {"latency_ms": 60, "jitter_ms": 40}})
        rtts = [await _rtt_s(streams) for _ in range(12)]
        # two draws per round trip, each in [20, 100) ms
        assert all(0.04 <= r < 0.25 for r in rtts), rtts
        assert max(rtts) - min(rtts) > 0.01, rtts
        streams[1].close()

    _run(test)


def test_bandwidth_caps_throughput() -> None:
    async def download(link: ChaosLink, nbytes: int) -> float:
        reader, writer = await _connect(link)
        start = time.perf_counter()
        writer.write(f"bulk {nbytes}\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(nbytes), 10)
        writer.close()
        return time.perf_counter() - start

    async def test(link: ChaosLink) -> None:
        free = await download(link, 200_000)
        await link.add_toxic(
            {
                "type": "bandwidth",
                "direction": "downstream",
                "attributes": {"rate_bytes_per_s": 400_000},
            }
        )
        capped = await download(link, 200_000)
        assert 0.45 <= capped < 0.8, capped  # 200 kB at 400 kB/s: 0.5 s
        assert free < capped / 4, (free, capped)

    _run(test)


def test_blackhole_makes_the_client_time_out_and_removal_restores() -> None:
    async def test(link: ChaosLink) -> None:
        toxic = await link.add_toxic({"type": "blackhole"})
        reader, writer = await _connect(link)  # accepted: the peer cannot tell
        writer.write(b"ping\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        assert link.describe()["dropped_bytes_total"] == 5
        await link.remove_toxic(toxic.id)
        # the blackholed connection lost bytes mid-stream: it is ended, not resumed corrupt
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        streams = await _connect(link)
        assert await _rtt_s(streams) < 0.5
        streams[1].close()

    _run(test)


def test_down_refuses_new_connections_closes_open_ones_and_comes_back() -> None:
    async def test(link: ChaosLink) -> None:
        reader, writer = await _connect(link)
        assert await _rtt_s((reader, writer)) < 0.5
        toxic = await link.add_toxic({"type": "down"})
        with pytest.raises(ConnectionRefusedError):
            await _connect(link)
        with contextlib.suppress(ConnectionError):  # dropped: EOF or a reset, never an answer
            assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert link.describe()["state"] == "down"
        await link.remove_toxic(toxic.id)
        streams = await _connect(link)
        assert await _rtt_s(streams) < 0.5
        streams[1].close()

    _run(test)


def test_reset_at_once_resets_open_and_new_connections() -> None:
    async def test(link: ChaosLink) -> None:
        reader, writer = await _connect(link)
        assert await _rtt_s((reader, writer)) < 0.5
        toxic = await link.add_toxic({"type": "reset"})
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 2)
        fresh_reader, fresh_writer = await _connect(link)
        fresh_writer.write(b"ping\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(fresh_reader.read(), 2)
        writer.close()
        fresh_writer.close()
        assert link.resets_total >= 2
        await link.remove_toxic(toxic.id)
        streams = await _connect(link)
        assert await _rtt_s(streams) < 0.5
        streams[1].close()

    _run(test)


def test_reset_after_bytes_lets_that_many_through_first() -> None:
    async def test(link: ChaosLink) -> None:
        await link.add_toxic(
            {"type": "reset", "direction": "downstream", "attributes": {"after_bytes": 8}}
        )
        reader, writer = await _connect(link)
        writer.write(b"0123456789abcdef\n")
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(8), 2)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 2)
        writer.close()
        assert got == b"01234567"

    _run(test)


def test_slow_close_delays_the_fin() -> None:
    async def time_to_eof(link: ChaosLink) -> float:
        reader, writer = await _connect(link)
        writer.write(b"bye\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 2) == b"bye\n"
        start = time.perf_counter()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        return time.perf_counter() - start

    async def test(link: ChaosLink) -> None:
        assert await time_to_eof(link) < 0.1
        await link.add_toxic(
            {"type": "slow_close", "direction": "downstream", "attributes": {"delay_ms": 300}}
        )
        assert 0.29 <= await time_to_eof(link) < 0.6

    _run(test)
