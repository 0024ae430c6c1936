"""Eviction policies and BoundedCache: each policy's defining behaviour against a reference
model, bounds never exceeded, TTL with a manual clock."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photostack.blocks.cache import (
    BoundedCache,
    CacheFullError,
    LFUPolicy,
    PolicyName,
    RandomSet,
    UnknownPolicyError,
    make_policy,
    parse_policy_name,
)
from photostack.blocks.cache.testing import ManualClock


@dataclass
class _Meta:
    inserted: int
    touched: int
    count: int = 1


@dataclass
class Reference:
    """An O(n) model of a bounded cache: each policy is a choice over explicit timestamps.

    LFU's stated tie-break: the least recently used among the least frequently used.
    """

    choose: Callable[[dict[int, _Meta]], int]
    max_entries: int
    max_bytes: int
    data: dict[int, bytes] = field(default_factory=dict)
    meta: dict[int, _Meta] = field(default_factory=dict)
    tick: int = 0
    evictions: int = 0

    def _bytes(self) -> int:
        return sum(len(v) for v in self.data.values())

    def _needs_room(self, key: int, size: int) -> bool:
        old = self.data.get(key)
        count = len(self.data) + (0 if old is not None else 1)
        total = self._bytes() - (len(old) if old is not None else 0) + size
        return count > self.max_entries or total > self.max_bytes

    def put(self, key: int, value: bytes) -> None:
        self.tick += 1
        while self._needs_room(key, len(value)):
            victim = self.choose(self.meta)
            del self.data[victim], self.meta[victim]
            self.evictions += 1
        if key in self.data:
            self.meta[key].touched = self.tick
            self.meta[key].count += 1
        else:
            self.meta[key] = _Meta(self.tick, self.tick)
        self.data[key] = value

    def get(self, key: int) -> bytes | None:
        self.tick += 1
        if key in self.data:
            self.meta[key].touched = self.tick
            self.meta[key].count += 1
        return self.data.get(key)

    def delete(self, key: int) -> None:
        self.data.pop(key, None)
        self.meta.pop(key, None)


CHOOSERS: dict[PolicyName, Callable[[dict[int, _Meta]], int]] = {
    PolicyName.FIFO: lambda m: min(m, key=lambda k: m[k].inserted),
    PolicyName.LIFO: lambda m: max(m, key=lambda k: m[k].inserted),
    PolicyName.LRU: lambda m: min(m, key=lambda k: m[k].touched),
    PolicyName.MRU: lambda m: max(m, key=lambda k: m[k].touched),
    PolicyName.LFU: lambda m: min(m, key=lambda k: (m[k].count, m[k].touched)),
}

ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "delete"]),
        st.integers(0, 12),
        st.integers(1, 40),
    ),
    max_size=200,
)


def _sizer(key: object, value: object) -> int:
    assert isinstance(value, bytes)
    return len(value)


@pytest.mark.parametrize("name", list(CHOOSERS))
@settings(max_examples=150, deadline=None)
@given(ops=ops, max_entries=st.integers(1, 6), max_bytes=st.integers(40, 120))
def test_policy_evicts_what_its_definition_says(
    name: PolicyName, ops: list[tuple[str, int, int]], max_entries: int, max_bytes: int
) -> None:
    cache: BoundedCache[int, bytes] = BoundedCache(
        make_policy(name), max_entries=max_entries, max_bytes=max_bytes, sizer=_sizer
    )
    ref = Reference(CHOOSERS[name], max_entries, max_bytes)
    for op, key, size in ops:
        value = bytes([key]) * size
        if op == "put":
            cache.put(key, value)
            ref.put(key, value)
        elif op == "get":
            assert cache.get(key) == ref.get(key)
        else:
            cache.delete(key)
            ref.delete(key)
        assert set(cache) == set(ref.data)
        assert cache.stats.evictions == ref.evictions
        assert len(cache) <= max_entries
        assert cache.bytes_used <= max_bytes
        assert cache.bytes_used == sum(len(v) for v in ref.data.values())
        assert len(cache.policy) == len(cache)


@settings(max_examples=100, deadline=None)
@given(ops=ops, max_entries=st.integers(1, 6), seed=st.integers(0, 2**32))
def test_random_policy_stays_in_bounds_and_evicts_only_to_make_room(
    ops: list[tuple[str, int, int]], max_entries: int, seed: int
) -> None:
    rng = random.Random(seed)
    cache: BoundedCache[int, bytes] = BoundedCache(
        make_policy(PolicyName.RANDOM, rng.randrange), max_entries=max_entries, sizer=_sizer
    )
    for op, key, size in ops:
        before = set(cache)
        if op == "put":
            cache.put(key, b"x" * size)
            after = set(cache)
            assert key in after
            assert after - {key} <= before
            dropped = before - after
            assert len(dropped) == (1 if key not in before and len(before) == max_entries else 0)
        elif op == "get":
            cache.get(key)
        else:
            cache.delete(key)
        assert len(cache) <= max_entries
        assert len(cache.policy) == len(cache)


def test_random_policy_spreads_its_victims() -> None:
    rng = random.Random(7)
    victims: dict[int, int] = {}
    for _ in range(2000):
        policy = make_policy(PolicyName.RANDOM, rng.randrange)
        for key in range(4):
            policy.on_insert(key)
        victim = policy.evict()
        victims[victim] = victims.get(victim, 0) + 1
    assert set(victims) == {0, 1, 2, 3}
    assert all(400 < n < 600 for n in victims.values())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=200))
def test_random_set_matches_a_set(steps: list[tuple[bool, int]]) -> None:
    rs: RandomSet[int] = RandomSet(random.Random(1).randrange)
    model: set[int] = set()
    for add, key in steps:
        if add:
            rs.add(key)
            model.add(key)
        else:
            rs.discard(key)
            model.discard(key)
        assert len(rs) == len(model)
        assert all(k in rs for k in model)
        if model:
            assert rs.choice() in model


def test_lfu_breaks_ties_by_recency() -> None:
    lfu: LFUPolicy[str] = LFUPolicy()
    for key in "abc":
        lfu.on_insert(key)
    lfu.on_access("a")  # a: 2, b: 1, c: 1 — b is older than c
    assert lfu.evict() == "b"
    lfu.on_access("c")  # a: 2, c: 2 — a reached 2 first
    assert lfu.count("c") == 2
    assert lfu.evict() == "a"
    assert lfu.evict() == "c"
    with pytest.raises(KeyError):
        lfu.evict()


def test_mru_and_lifo_never_evict_the_key_being_stored() -> None:
    for name in (PolicyName.MRU, PolicyName.LIFO):
        cache: BoundedCache[str, int] = BoundedCache(make_policy(name), max_entries=2)
        cache.put("a", 1)
        cache.put("b", 2)
        cache.put("c", 3)
        assert set(cache) == {"a", "c"}, name


def test_noeviction_refuses_and_leaves_the_cache_unchanged() -> None:
    cache: BoundedCache[str, bytes] = BoundedCache(
        make_policy(PolicyName.NOEVICTION), max_bytes=10, sizer=_sizer
    )
    cache.put("a", b"12345")
    with pytest.raises(CacheFullError):
        cache.put("b", b"123456")
    assert set(cache) == {"a"}
    assert cache.bytes_used == 5
    cache.put("a", b"1234567890")  # an overwrite that fits is fine
    assert cache.peek("a") == b"1234567890"


def test_an_entry_larger_than_max_bytes_is_refused_without_evicting() -> None:
    cache: BoundedCache[str, bytes] = BoundedCache(
        make_policy(PolicyName.LRU), max_bytes=10, sizer=_sizer
    )
    cache.put("a", b"1234")
    with pytest.raises(CacheFullError):
        cache.put("b", b"x" * 11)
    assert set(cache) == {"a"}


def test_resize_and_set_policy() -> None:
    cache: BoundedCache[int, int] = BoundedCache(make_policy(PolicyName.FIFO))
    for key in range(10):
        cache.put(key, key)
    cache.resize(max_entries=4, max_bytes=None)
    assert set(cache) == {6, 7, 8, 9}
    cache.set_policy(make_policy(PolicyName.LIFO))
    cache.put(10, 10)
    assert set(cache) == {6, 7, 8, 10}


def test_parse_policy_name() -> None:
    assert parse_policy_name("LRU") is PolicyName.LRU
    assert parse_policy_name("allkeys-lfu") is PolicyName.LFU
    assert parse_policy_name("mru") is PolicyName.MRU
    assert not PolicyName.FIFO.redis_supports
    with pytest.raises(UnknownPolicyError):
        parse_policy_name("volatile-lru")


# -- TTL -------------------------------------------------------------------------------------


def _ttl_cache(clock: ManualClock) -> BoundedCache[str, str]:
    return BoundedCache(
        make_policy(PolicyName.LRU), clock=clock, randbelow=random.Random(3).randrange
    )


def test_ttl_expires_lazily_on_read() -> None:
    clock = ManualClock()
    cache = _ttl_cache(clock)
    cache.put("k", "v", ttl_s=10)
    clock.advance(9.999)
    assert cache.get("k") == "v"
    assert cache.expires_in("k") == pytest.approx(0.001)
    clock.advance(0.001)
    assert cache.get("k") is None
    assert len(cache) == 0
    assert cache.stats.expirations == 1
    assert cache.stats.misses == 1


def test_overwrite_clears_ttl_unless_kept() -> None:
    clock = ManualClock()
    cache = _ttl_cache(clock)
    cache.put("k", "v", ttl_s=10)
    cache.put("k", "w", keep_ttl=True)
    assert cache.expires_in("k") == pytest.approx(10)
    cache.put("k", "x")
    assert cache.expires_in("k") is None
    assert cache.expiring_count == 0
    assert cache.expire("k", 5)
    assert cache.expires_in("k") == pytest.approx(5)
    assert cache.expire("k", None)
    assert cache.expires_in("k") is None
    assert cache.expire("k", 0)
    assert "k" not in cache
    assert not cache.expire("k", 3)
    with pytest.raises(KeyError):
        cache.expires_in("k")
    with pytest.raises(ValueError, match="positive"):
        cache.put("k", "v", ttl_s=0)


def test_active_sweep_drops_expired_keys_without_reads() -> None:
    clock = ManualClock()
    cache = _ttl_cache(clock)
    for i in range(200):
        cache.put(f"short{i}", "v", ttl_s=1)
    for i in range(50):
        cache.put(f"long{i}", "v", ttl_s=100)
    for i in range(50):
        cache.put(f"forever{i}", "v")
    clock.advance(2)
    dropped = 0
    for _ in range(50):  # a server runs one cycle every 100 ms
        dropped += cache.sweep()
        if cache.expiring_count == 50:
            break
    assert dropped == 200
    assert len(cache) == 100
    assert cache.stats.expirations == 200


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 8), st.one_of(st.none(), st.floats(0.1, 5)), st.floats(0, 3)),
        max_size=60,
    )
)
def test_no_read_ever_returns_an_expired_value(
    steps: list[tuple[int, float | None, float]],
) -> None:
    clock = ManualClock()
    cache = _ttl_cache(clock)
    deadline: dict[int, float | None] = {}
    for key, ttl, wait in steps:
        cache.put(str(key), "v", ttl_s=ttl)
        deadline[key] = None if ttl is None else clock() + ttl
        clock.advance(wait)
        if wait > 1:
            cache.sweep()
        for k, until in deadline.items():
            alive = until is None or clock() < until
            assert (cache.get(str(k)) is not None) == alive
