"""Single-flight, XFetch and stale-if-error, driven by asyncio with a manual clock."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from photostack.blocks.cache import (
    BoundedCache,
    CacheStatus,
    Freshness,
    PolicyName,
    ReadThrough,
    ReadThroughConfig,
    SingleFlight,
    Stored,
    classify,
    make_policy,
    xfetch_refresh_due,
)
from photostack.blocks.cache.testing import FakeStoreError, ManualClock


class Loader:
    """Counts calls; each call waits for ``release`` so tests choose when a load lands."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail = False
        self.value = "v1"

    async def __call__(self, key: str) -> str:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise FakeStoreError("database down")
        return f"{key}={self.value}"


class SlowLoader(Loader):
    """A load that takes ``compute_s`` on the manual clock (XFetch's delta)."""

    def __init__(self, clock: ManualClock, compute_s: float) -> None:
        super().__init__()
        self.clock, self.compute_s = clock, compute_s

    async def __call__(self, key: str) -> str:
        self.clock.advance(self.compute_s)
        return await super().__call__(key)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_n_concurrent_misses_make_one_load() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, str] = SingleFlight()
        loader = Loader()
        waiters = [asyncio.create_task(flights.do("k", lambda: loader("k"))) for _ in range(50)]
        await _settle()
        loader.release.set()
        assert await asyncio.gather(*waiters) == ["k=v1"] * 50
        assert loader.calls == 1
        assert (flights.loads, flights.joined) == (1, 49)
        assert not flights.in_flight("k")

    asyncio.run(scenario())


def test_an_error_reaches_every_waiter_and_the_next_call_retries() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, str] = SingleFlight()
        loader = Loader()
        loader.fail = True
        waiters = [asyncio.create_task(flights.do("k", lambda: loader("k"))) for _ in range(5)]
        await _settle()
        loader.release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, FakeStoreError) for r in results)
        loader.fail = False
        assert await flights.do("k", lambda: loader("k")) == "k=v1"
        assert loader.calls == 2

    asyncio.run(scenario())


def test_cancelling_one_waiter_does_not_cancel_the_load() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, str] = SingleFlight()
        loader = Loader()
        first = asyncio.create_task(flights.do("k", lambda: loader("k")))
        second = asyncio.create_task(flights.do("k", lambda: loader("k")))
        await _settle()
        first.cancel()
        await _settle()
        assert first.cancelled()
        loader.release.set()
        assert await second == "k=v1"
        assert loader.calls == 1

    asyncio.run(scenario())


def test_a_load_whose_waiters_all_left_still_finishes_without_warnings() -> None:
    async def scenario() -> None:
        flights: SingleFlight[str, str] = SingleFlight()
        loader = Loader()
        loader.fail = True
        only = asyncio.create_task(flights.do("k", lambda: loader("k")))
        await _settle()
        only.cancel()
        loader.release.set()
        await _settle()
        assert not flights.in_flight("k")  # landed; its error was retrieved

    asyncio.run(scenario())


def test_xfetch_probability_rises_as_expiry_nears() -> None:
    rng = random.Random(11)

    def share(now_s: float) -> float:
        hits = sum(
            xfetch_refresh_due(
                now_s=now_s, expires_at_s=100.0, delta_s=1.0, beta=1.0, rand=1.0 - rng.random()
            )
            for _ in range(4000)
        )
        return hits / 4000

    early, mid, late = share(95.0), share(98.0), share(99.5)
    assert early < mid < late
    # P(refresh) = P(-ln r >= gap) = exp(-gap) for delta = beta = 1
    assert mid == pytest.approx(math.exp(-2), abs=0.03)
    assert xfetch_refresh_due(now_s=100.0, expires_at_s=100.0, delta_s=1, beta=1, rand=1.0)
    assert xfetch_refresh_due(now_s=0.0, expires_at_s=100.0, delta_s=1, beta=1, rand=0.0)


def test_classify() -> None:
    stored = Stored("v", fresh_until_s=100.0, delta_s=0.5)
    kw = {"beta": 1.0, "stale_if_error_s": 10.0}
    assert classify(None, now_s=0, rand=0.5, **kw) is Freshness.MISSING
    assert classify(stored, now_s=50, rand=1.0, **kw) is Freshness.FRESH
    assert classify(stored, now_s=99.9, rand=0.5, **kw) is Freshness.REFRESH_EARLY
    assert classify(stored, now_s=105, rand=0.5, **kw) is Freshness.STALE
    assert classify(stored, now_s=110, rand=0.5, **kw) is Freshness.MISSING
    assert classify(stored, now_s=99.9, rand=0.5, beta=0, stale_if_error_s=0) is Freshness.FRESH


def _read_through(
    loader: Loader,
    clock: ManualClock,
    *,
    beta: float = 0.0,
    stale_s: float = 0.0,
    rand: float = 0.5,
) -> ReadThrough[str, str]:
    cache: BoundedCache[str, Stored[str]] = BoundedCache(
        make_policy(PolicyName.LRU), max_entries=100, clock=clock
    )
    config = ReadThroughConfig(ttl_s=10.0, beta=beta, stale_if_error_s=stale_s)
    return ReadThrough(cache, loader, config, clock=clock, rand=lambda: rand)


def test_read_through_hit_miss_and_one_load_for_concurrent_misses() -> None:
    async def scenario() -> None:
        clock, loader = ManualClock(), Loader()
        rt = _read_through(loader, clock)
        misses = [asyncio.create_task(rt.lookup("k")) for _ in range(20)]
        await _settle()
        loader.release.set()
        results = await asyncio.gather(*misses)
        assert {r.status for r in results} == {CacheStatus.MISS}
        assert loader.calls == 1
        assert (await rt.lookup("k")).status is CacheStatus.HIT
        clock.advance(10)
        assert (await rt.lookup("k")).status is CacheStatus.MISS
        assert loader.calls == 2

    asyncio.run(scenario())


def test_stale_if_error_serves_the_old_value_for_a_bounded_time() -> None:
    async def scenario() -> None:
        clock, loader = ManualClock(), Loader()
        loader.release.set()
        rt = _read_through(loader, clock, stale_s=30)
        assert await rt.get("k") == "k=v1"
        loader.fail = True
        clock.advance(15)
        got = await rt.lookup("k")
        assert (got.value, got.status) == ("k=v1", CacheStatus.STALE)
        clock.advance(30)  # 45 s after the load: past ttl + stale window
        with pytest.raises(FakeStoreError):
            await rt.get("k")
        assert rt.stats.stale_served == 1

    asyncio.run(scenario())


def test_early_refresh_serves_the_cached_value_and_reloads_in_the_background() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        loader = SlowLoader(clock, compute_s=1.0)
        loader.release.set()
        # rand() = 0.99: XFetch's ln(1 - 0.99) ≈ -4.6, so due within 4.6 * delta of expiry
        rt = _read_through(loader, clock, beta=1.0, rand=0.99)
        assert await rt.get("k") == "k=v1"
        loader.value = "v2"
        clock.advance(5.0)  # 5 s before expiry: not yet
        assert await rt.get("k") == "k=v1"
        await _settle()
        assert loader.calls == 1
        clock.advance(4.0)  # 1 s before expiry, the load takes 1 s: due
        assert await rt.get("k") == "k=v1"
        await _settle()
        assert loader.calls == 2
        assert rt.stats.early_refreshes == 1
        assert await rt.get("k") == "k=v2"
        await rt.aclose()

    asyncio.run(scenario())


def test_invalidate_during_a_load_keeps_the_old_load_out_of_the_cache() -> None:
    async def scenario() -> None:
        clock, loader = ManualClock(), Loader()
        rt = _read_through(loader, clock)
        pending = asyncio.create_task(rt.get("k"))
        await _settle()
        rt.invalidate("k")  # a write happened while the old value was being read
        loader.value = "v2"
        loader.release.set()
        assert await pending == "k=v2"  # the load read after the write finished...
        assert (await rt.lookup("k")).status is CacheStatus.MISS  # ...but was not cached
        assert loader.calls == 2

    asyncio.run(scenario())
