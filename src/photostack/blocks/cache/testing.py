"""Fakes for tests of code that uses the cache block: a manual clock, an in-memory store and an
in-memory cache tier, both recording what they were asked and able to fail or stall on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from photostack.blocks.cache._errors import CacheError

__all__ = ["FakeCacheTier", "FakeStore", "FakeStoreError", "ManualClock"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FakeStoreError(CacheError):
    """What a fake fails with when told to fail."""


@dataclass
class ManualClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance(s)`` moves it."""

    now_s: float = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go back")
        self.now_s += seconds


@dataclass
class FakeStore(Generic[K, V]):
    """The system of record in memory. ``log`` lists every write as it lands, in order;
    set ``fail`` to make writes and reads raise; ``gate`` (when set) holds writes until it is
    set; ``delays`` makes the write of a given value wait for that many event-loop turns;
    ``landed`` (when given) is set after every successful write."""

    data: dict[K, V] = field(default_factory=dict)
    log: list[tuple[K, V]] = field(default_factory=list)
    batches: list[list[tuple[K, V]]] = field(default_factory=list)
    reads: int = 0
    fail: bool = False
    gate: asyncio.Event | None = None
    delays: dict[object, int] = field(default_factory=dict)
    landed: asyncio.Event | None = None

    async def read(self, key: K) -> V | None:
        self.reads += 1
        await asyncio.sleep(0)
        if self.fail:
            raise FakeStoreError("store down")
        return self.data.get(key)

    async def write(self, key: K, value: V) -> None:
        await self._wait(value)
        self.data[key] = value
        self.log.append((key, value))
        if self.landed is not None:
            self.landed.set()

    async def write_many(self, items: Sequence[tuple[K, V]]) -> None:
        await self._wait(None)
        batch = list(items)
        for key, value in batch:
            self.data[key] = value
            self.log.append((key, value))
        self.batches.append(batch)
        if self.landed is not None:
            self.landed.set()

    async def _wait(self, value: object) -> None:
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(self.delays.get(value, 0)):
            await asyncio.sleep(0)
        if self.fail:
            raise FakeStoreError("store down")


@dataclass
class FakeCacheTier(Generic[K, V]):
    """A remote cache tier in memory; ``delays`` works as in :class:`FakeStore`."""

    data: dict[K, V] = field(default_factory=dict)
    log: list[tuple[str, K]] = field(default_factory=list)
    fail: bool = False
    delays: dict[object, int] = field(default_factory=dict)

    async def get(self, key: K) -> V | None:
        await asyncio.sleep(0)
        return self.data.get(key)

    async def set(self, key: K, value: V) -> None:
        for _ in range(self.delays.get(value, 0)):
            await asyncio.sleep(0)
        if self.fail:
            raise FakeStoreError("cache down")
        self.data[key] = value
        self.log.append(("set", key))

    async def delete(self, key: K) -> None:
        await asyncio.sleep(0)
        self.data.pop(key, None)
        self.log.append(("delete", key))
