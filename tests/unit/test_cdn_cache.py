"""The CDN's cached objects, freshness states, byte bound and collapse bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from photostack.blocks.media import CachedObject, CacheState, CdnCache, Flights, Freshness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def obj(key: str, size: int, clock: Clock, freshness: Freshness | None = None) -> CachedObject:
    return CachedObject(
        key,
        body=b"x" * size,
        content_type="image/png",
        etag=f'"{key}"',
        cache_control="public, max-age=60",
        freshness=freshness or Freshness(storable=True, max_age_s=60),
        now=clock(),
    )


def test_the_hit_response_is_whole_and_the_body_a_view_of_it() -> None:
    clock = Clock()
    o = obj("k", 100, clock)
    head, _, body = o.hit_response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 100" in head
    assert b"X-Cache: HIT" in head
    assert body == b"x" * 100 == bytes(o.body)


def test_freshness_states_follow_max_age_and_stale_while_revalidate() -> None:
    clock = Clock()
    terms = Freshness(storable=True, max_age_s=10, stale_while_revalidate_s=20, stale_if_error_s=50)
    o = obj("k", 10, clock, terms)
    assert o.state(clock.now + 9.9) is CacheState.FRESH
    assert o.state(clock.now + 10) is CacheState.STALE
    assert o.state(clock.now + 29.9) is CacheState.STALE
    assert o.state(clock.now + 30) is CacheState.EXPIRED
    assert o.usable_on_error(clock.now + 59)
    assert not o.usable_on_error(clock.now + 61)
    o.refresh(terms, clock.now + 100)
    assert o.state(clock.now + 105) is CacheState.FRESH


def test_the_cache_never_holds_more_than_its_bytes_and_evicts_least_recently_used() -> None:
    clock = Clock()
    cache = CdnCache(10_000, clock=clock)
    objects = [obj(f"k{i}", 1000, clock) for i in range(30)]
    for _i, o in enumerate(objects):
        assert cache.store(o)
        assert cache.get("k0") is not None  # read every time: never the LRU victim
        assert cache.stats().bytes_used <= 10_000
    stats = cache.stats()
    assert stats.evictions > 0
    assert "k29" in cache
    assert "k0" in cache
    assert "k1" not in cache  # cold and old: evicted first


def test_objects_over_the_entry_limit_are_not_kept() -> None:
    clock = Clock()
    cache = CdnCache(100_000, max_entry_bytes=2_000, clock=clock)
    assert not cache.store(obj("big", 5_000, clock))
    assert "big" not in cache
    assert cache.store(obj("small", 1_000, clock))
    assert cache.purge("small")
    assert not cache.purge("small")


def test_flights_run_one_fetch_per_key_and_count_joiners() -> None:
    async def main() -> None:
        flights: Flights[str] = Flights()
        gate = asyncio.Event()
        calls = 0

        async def fetch() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            return "body"

        tasks = [flights.run("k", fetch) for _ in range(200)]
        other = flights.run("other", fetch)
        assert len({id(t) for t in tasks}) == 1
        assert (flights.started, flights.joined, len(flights)) == (2, 199, 2)
        flights.mark_purged("k")
        assert flights.was_purged("k")
        gate.set()
        assert await tasks[0] == "body"
        assert await other == "body"
        await asyncio.sleep(0)
        assert calls == 2
        assert len(flights) == 0
        assert not flights.was_purged("k")  # forgotten with its flight
        flights.mark_purged("k")  # nothing in flight: nothing to mark
        assert not flights.was_purged("k")

    asyncio.run(main())


def test_a_failed_fetch_is_shared_and_then_forgotten() -> None:
    async def main() -> None:
        flights: Flights[str] = Flights()

        async def fail() -> str:
            raise OSError("origin down")

        first, second = flights.run("k", fail), flights.run("k", fail)
        for task in (first, second):
            with pytest.raises(OSError, match="origin down"):
                await task
        await asyncio.sleep(0)
        assert len(flights) == 0

    asyncio.run(main())
