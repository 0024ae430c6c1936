"""The global cache's two forms over an in-memory remote tier, the invalidation messages, and
the product cache's local coherence and configuration (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import pytest
from prometheus_client import CollectorRegistry

from photostack.blocks.cache import (
    CacheAside,
    CacheStatus,
    FailureMode,
    GlobalReadThrough,
    PolicyName,
    ReadThroughConfig,
)
from photostack.blocks.cache._invalidation import decode_message, encode_message
from photostack.blocks.cache.testing import ManualClock
from photostack.service._caching import CachingConfig, GlobalForm, ProductCache, WriteMode


class Remote:
    """A remote tier in memory (TTL ignored: the envelope's freshness is what is tested)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.deleted: list[str] = []

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> bool:
        self.data[key] = value
        return True

    async def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.deleted.append(key)
            self.data.pop(key, None)


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.value = b"v1"

    async def __call__(self, key: str) -> bytes | None:
        self.calls += 1
        for _ in range(3):
            await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("database down")
        return self.value


@pytest.mark.parametrize(("single_flight", "loads"), [(True, 1), (False, 20)])
def test_concurrent_misses_share_one_load(single_flight: bool, loads: int) -> None:
    async def scenario() -> None:
        remote, loader = Remote(), Loader()
        g = GlobalReadThrough(
            remote, loader, ReadThroughConfig(60.0, beta=0.0), single_flight=single_flight
        )
        results = await asyncio.gather(*(g.lookup("k") for _ in range(20)))
        assert {r.value for r in results} == {b"v1"}
        assert loader.calls == loads
        assert (await g.lookup("k")).status is CacheStatus.HIT

    asyncio.run(scenario())


def test_stale_if_error_serves_the_old_value_within_its_window() -> None:
    async def scenario() -> None:
        clock, remote, loader = ManualClock(), Remote(), Loader()
        cfg = ReadThroughConfig(10.0, beta=0.0, stale_if_error_s=5.0)
        g = GlobalReadThrough(remote, loader, cfg, clock=clock)
        await g.lookup("k")
        clock.advance(12.0)
        loader.fail = True
        found = await g.lookup("k")
        assert (found.value, found.status) == (b"v1", CacheStatus.STALE)
        clock.advance(5.0)  # past the stale window: the error propagates
        with pytest.raises(RuntimeError):
            await g.lookup("k")

    asyncio.run(scenario())


def test_xfetch_refreshes_early_in_the_background() -> None:
    async def scenario() -> None:
        clock, remote, loader = ManualClock(), Remote(), Loader()

        async def slow_load(key: str) -> bytes | None:  # takes 1 s: XFetch's delta
            clock.advance(1.0)
            return await loader(key)

        # rand() -> 1 - 1e-300: ln() is hugely negative, so XFetch always says "refresh now"
        g = GlobalReadThrough(
            remote, slow_load, ReadThroughConfig(10.0, beta=1.0), clock=clock, rand=lambda: 1.0
        )
        await g.lookup("k")
        loader.value = b"v2"
        found = await g.lookup("k")
        assert (found.value, found.status) == (b"v1", CacheStatus.HIT)  # served at once
        assert g.stats.early_refreshes == 1
        for _ in range(10):
            await asyncio.sleep(0)
        assert loader.calls == 2
        assert (await g.lookup("k")).value == b"v2"  # the refreshed value replaced it
        await g.aclose()

    asyncio.run(scenario())


def test_cache_aside_get_fill_invalidate() -> None:
    async def scenario() -> None:
        clock, remote = ManualClock(), Remote()
        aside = CacheAside(remote, ReadThroughConfig(10.0), clock=clock)
        assert await aside.get("k") is None
        await aside.fill("k", b"v")
        assert await aside.get("k") == b"v"
        clock.advance(11.0)
        assert await aside.get("k") is None  # past its freshness: the app loads again
        await aside.fill("k", b"w")
        await aside.invalidate(["k"])
        assert await aside.get("k") is None
        assert remote.deleted == ["k"]

    asyncio.run(scenario())


def test_invalidation_messages_round_trip() -> None:
    assert decode_message(encode_message("app-1", ["user:1", "followers:2"])) == (
        "app-1",
        ["user:1", "followers:2"],
    )
    assert decode_message(b"not json") is None
    assert decode_message(b'{"o": 1, "k": []}') is None
    assert decode_message(b'{"o": "a", "k": [1]}') is None


def test_caching_config_parses_validates_and_round_trips() -> None:
    config = CachingConfig.from_dict(
        {
            "local_policy": "lfu",
            "local_max_entries": 500,
            "failure_mode": "fail-closed",
            "node_failure_modes": {"cache-2": "remap"},
            "types": {"user": {"ttl_s": 30, "form": "cache-aside", "write": "through"}},
        }
    )
    assert config.local_policy is PolicyName.LFU
    assert config.mode_of("cache-1") is FailureMode.FAIL_CLOSED
    assert config.mode_of("cache-2") is FailureMode.REMAP
    user = config.types["user"]
    assert (user.ttl_s, user.form, user.write) == (30.0, GlobalForm.CACHE_ASIDE, WriteMode.THROUGH)
    assert config.types["followers"].form is GlobalForm.READ_THROUGH  # defaults kept
    assert CachingConfig.from_dict(config.to_dict()) == config
    for bad, match in [
        ({"nope": 1}, "unknown key"),
        ({"types": {"feed": {}}}, "unknown data type"),
        ({"types": {"user": {"ttl_s": 0}}}, "types.user"),
        ({"types": {"user": {"form": "write-back"}}}, "read-through"),
        ({"failure_mode": "retry"}, "fail-closed"),
        ({"local_max_entries": 0}, "positive"),
        ({"local_policy": "arc"}, "arc"),
    ]:
        with pytest.raises(ValueError, match=match):
            CachingConfig.from_dict(bad)


def test_local_cache_is_invalidated_by_writes_and_by_the_bus() -> None:
    async def scenario() -> None:
        cache = ProductCache(CachingConfig(), (), origin="app-1", registry=CollectorRegistry())
        db = {"user:1": b'{"n":1}'}
        loads = 0

        def loader(key: str) -> Callable[[], Awaitable[bytes | None]]:
            async def load() -> bytes | None:
                nonlocal loads
                loads += 1
                return db[key]

            return load

        assert await cache.read("user", "user:1", loader("user:1")) == (b'{"n":1}', False)
        assert await cache.read("user", "user:1", loader("user:1")) == (b'{"n":1}', True)
        db["user:1"] = b'{"n":2}'
        await cache.invalidate(["user:1"])  # this node's write
        assert await cache.read("user", "user:1", loader("user:1")) == (b'{"n":2}', False)
        db["user:1"] = b'{"n":3}'
        cache._drop_local(["user:1"])  # what the bus delivers from another node
        assert (await cache.read("user", "user:1", loader("user:1")))[0] == b'{"n":3}'
        cache.flush_local()  # a subscription gap
        assert (await cache.read("user", "user:1", loader("user:1")))[1] is False
        assert loads == 4
        await cache.aclose()

    asyncio.run(scenario())


def test_local_hit_ratios_read_the_app_metrics() -> None:
    from photostack.ops._bench_cache_product import local_hit_ratios

    name = "photostack_cache_requests_total"
    text = (
        f'{name}{{policy="lru",result="hit",tier="local",type="user"}} 30.0\n'
        f'{name}{{policy="lru",result="miss",tier="local",type="user"}} 10.0\n'
        f'{name}{{policy="read-through",result="miss",tier="global",type="user"}} 10.0\n'
    )
    assert local_hit_ratios({"app-1": text, "app-2": ""}) == {
        "app-1": (30.0, 40.0),
        "app-2": (0.0, 0.0),
    }
