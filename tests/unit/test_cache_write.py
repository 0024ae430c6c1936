"""Write policies over the in-memory fakes: ordering per key, coalescing, bounded dirty set,
flush on close, failed flushes, and the write-ahead log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from photostack.blocks.cache import (
    DirtySetFullError,
    LogCorruptError,
    WhenFull,
    WriteAheadLog,
    WriteAround,
    WriteBack,
    WriteBackClosedError,
    WriteBackConfig,
    WriteThrough,
)
from photostack.blocks.cache.testing import FakeCacheTier, FakeStore, FakeStoreError


async def _settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def test_write_through_keeps_cache_and_store_in_issue_order_per_key() -> None:
    async def scenario() -> None:
        store: FakeStore[str, str] = FakeStore(delays={"old": 5})
        cache: FakeCacheTier[str, str] = FakeCacheTier(delays={"new": 5})
        policy = WriteThrough(store, cache)
        # "old" is slow to reach the store and "new" slow to reach the cache: without the
        # per-key lock the cache would end on "old" while the store holds "new".
        await asyncio.gather(policy.write("k", "old"), policy.write("k", "new"))
        assert store.log == [("k", "old"), ("k", "new")]
        assert cache.data["k"] == store.data["k"] == "new"

    asyncio.run(scenario())


def test_write_through_failed_store_write_leaves_cache_alone() -> None:
    async def scenario() -> None:
        store: FakeStore[str, str] = FakeStore(fail=True)
        cache: FakeCacheTier[str, str] = FakeCacheTier(data={"k": "v0"})
        with pytest.raises(FakeStoreError):
            await WriteThrough(store, cache).write("k", "v1")
        assert cache.data == {"k": "v0"}

    asyncio.run(scenario())


def test_write_through_failed_cache_write_invalidates() -> None:
    async def scenario() -> None:
        store: FakeStore[str, str] = FakeStore()
        cache: FakeCacheTier[str, str] = FakeCacheTier(data={"k": "v0"}, fail=True)
        with pytest.raises(FakeStoreError):
            await WriteThrough(store, cache).write("k", "v1")
        assert store.data == {"k": "v1"}
        assert "k" not in cache.data

    asyncio.run(scenario())


def test_write_around_invalidates_and_the_next_read_loads() -> None:
    async def scenario() -> None:
        store: FakeStore[str, str] = FakeStore()
        cache: FakeCacheTier[str, str] = FakeCacheTier(data={"k": "v0"})
        policy = WriteAround(store, cache)
        await policy.write("k", "v1")
        assert "k" not in cache.data
        assert await policy.read("k") == "v1"
        assert cache.data["k"] == "v1"
        assert store.reads == 1

    asyncio.run(scenario())


def test_write_back_coalesces_and_preserves_order() -> None:
    async def scenario() -> None:
        store: FakeStore[str, int] = FakeStore()
        cache: FakeCacheTier[str, int] = FakeCacheTier()
        wb = WriteBack(store, cache, WriteBackConfig(flush_interval_s=60))
        for i in range(5):
            await wb.write("a", i)
            await wb.write("b", i)
        assert store.log == []
        assert await wb.read("a") == 4
        assert await wb.flush() == 2
        assert store.batches == [[("a", 4), ("b", 4)]]
        await wb.write("a", 5)
        await wb.flush()
        assert [v for k, v in store.log if k == "a"] == [4, 5]  # increasing: never older
        assert wb.dirty_count == 0
        await wb.aclose()

    asyncio.run(scenario())


def test_write_back_keeps_a_write_made_during_a_flush_dirty() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        store: FakeStore[str, int] = FakeStore(gate=gate)
        wb = WriteBack(store, FakeCacheTier(), WriteBackConfig(flush_interval_s=60))
        await wb.write("a", 1)
        flushing = asyncio.create_task(wb.flush())
        await _settle()
        await wb.write("a", 2)  # lands while the batch with a=1 is in flight
        gate.set()
        await flushing
        assert wb.dirty_count == 1
        await wb.flush()
        assert store.log == [("a", 1), ("a", 2)]

    asyncio.run(scenario())


def test_write_back_failed_flush_stays_dirty_and_retries() -> None:
    async def scenario() -> None:
        store: FakeStore[str, int] = FakeStore(fail=True)
        wb = WriteBack(store, FakeCacheTier(), WriteBackConfig(flush_interval_s=60))
        await wb.write("a", 1)
        with pytest.raises(FakeStoreError):
            await wb.flush()
        assert wb.dirty_count == 1
        assert wb.stats.flush_errors == 1
        store.fail = False
        assert await wb.flush() == 1
        assert store.data == {"a": 1}

    asyncio.run(scenario())


def test_write_back_full_dirty_set_forces_a_flush() -> None:
    async def scenario() -> None:
        store: FakeStore[str, int] = FakeStore()
        config = WriteBackConfig(flush_interval_s=60, max_dirty=3, when_full=WhenFull.FLUSH_NOW)
        wb = WriteBack(store, FakeCacheTier(), config)
        wb.start()
        for i in range(10):
            await asyncio.wait_for(wb.write(f"k{i}", i), timeout=5)
            assert wb.dirty_count <= 3
        assert wb.stats.waited_for_room >= 2
        await wb.write("k9", 99)  # an already-dirty key never waits
        await wb.aclose()
        assert store.data == {**{f"k{i}": i for i in range(9)}, "k9": 99}

    asyncio.run(scenario())


def test_write_back_backpressure_times_out_when_the_store_is_down() -> None:
    async def scenario() -> None:
        store: FakeStore[str, int] = FakeStore(fail=True)
        config = WriteBackConfig(
            flush_interval_s=0.01, max_dirty=1, when_full=WhenFull.BACKPRESSURE, full_timeout_s=0.05
        )
        wb = WriteBack(store, FakeCacheTier(), config)
        wb.start()
        await wb.write("a", 1)
        with pytest.raises(DirtySetFullError):
            await wb.write("b", 2)
        store.fail = False
        await wb.aclose()
        assert store.data == {"a": 1}
        with pytest.raises(WriteBackClosedError):
            await wb.write("c", 3)

    asyncio.run(scenario())


def test_write_back_periodic_flush() -> None:
    async def scenario() -> None:
        store: FakeStore[str, int] = FakeStore(landed=asyncio.Event())
        wb = WriteBack(store, FakeCacheTier(), WriteBackConfig(flush_interval_s=0.01))
        wb.start()
        await wb.write("a", 1)
        assert store.landed is not None
        async with asyncio.timeout(5):
            await store.landed.wait()  # no flush() call: the timer did it
        assert store.data == {"a": 1}
        await wb.aclose()

    asyncio.run(scenario())


def test_write_ahead_log_replays_what_no_flush_checkpointed(tmp_path: Path) -> None:
    async def scenario() -> None:
        store: FakeStore[bytes, bytes] = FakeStore()
        log = WriteAheadLog(tmp_path)
        wb = WriteBack(store, FakeCacheTier(), WriteBackConfig(flush_interval_s=60), log=log)
        await wb.write(b"a", b"1")
        await wb.flush()
        await wb.write(b"b", b"2")
        await wb.write(b"a", b"3")
        log.close()  # the process dies here: b=2 and a=3 were never flushed

        store2: FakeStore[bytes, bytes] = FakeStore()
        log2 = WriteAheadLog(tmp_path)
        wb2 = WriteBack(store2, FakeCacheTier(), WriteBackConfig(flush_interval_s=60), log=log2)
        wb2.recover(list(log2.replay()))
        await wb2.flush()
        assert store2.data == {b"b": b"2", b"a": b"3"}
        assert list(log2.replay()) == []
        log2.close()

    asyncio.run(scenario())


def test_write_ahead_log_ignores_a_torn_tail_but_not_damage_inside(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path)
    log.append(b"k1", b"v1")
    log.append(b"k2", b"v2")
    log.close()
    segment = next(tmp_path.glob("wal-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])
    assert list(WriteAheadLog(tmp_path).replay()) == [(b"k1", b"v1")]
    damaged = bytearray(data)
    damaged[14] ^= 0xFF  # inside the first record's body
    segment.write_bytes(bytes(damaged))
    with pytest.raises(LogCorruptError):
        list(WriteAheadLog(tmp_path).replay())
