"""Scatter-gather over shards: one coroutine per shard, each under its own deadline.

A cross-shard read (a count per shard, an orphan scan, a fan-out query) must not wait forever
for one slow shard, and must not pretend that a partial answer is complete. :func:`scatter_gather`
runs every shard's call concurrently, cuts each one at ``deadline_s``, and returns what answered
together with a report naming the shards that failed or timed out.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["GatherResult", "ShardFailure", "ShardOutcome", "scatter_gather"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class ShardOutcome(enum.Enum):
    """Why a shard's part is missing from a :class:`GatherResult`."""

    TIMED_OUT = "timed_out"
    FAILED = "failed"


@dataclass(frozen=True)
class ShardFailure:
    outcome: ShardOutcome
    detail: str  # the exception's type and first line, or the deadline that passed
    elapsed_s: float


@dataclass(frozen=True)
class GatherResult(Generic[K, T]):
    """The shards that answered (``results``) and those that did not (``failures``)."""

    results: Mapping[K, T]
    failures: Mapping[K, ShardFailure]
    elapsed_s: float

    @property
    def complete(self) -> bool:
        return not self.failures

    def report(self) -> dict[str, Any]:
        """JSON-ready: ``complete``, the shards that answered, each missing shard and why."""
        return {
            "complete": self.complete,
            "answered": [str(k) for k in self.results],
            "missing": {
                str(k): {"outcome": f.outcome.value, "detail": f.detail}
                for k, f in self.failures.items()
            },
            "elapsed_s": round(self.elapsed_s, 4),
        }


async def scatter_gather(
    calls: Mapping[K, Callable[[], Awaitable[T]]],
    *,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> GatherResult[K, T]:
    """Run ``calls[shard]()`` for every shard concurrently, each cut at ``deadline_s``.

    An ``Exception`` from one shard becomes a FAILED entry, an expired deadline a TIMED_OUT one
    (the call is cancelled); neither affects the other shards. Cancelling the caller cancels
    every shard's call. Raises ValueError for a non-positive deadline.
    """
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
    started = clock()

    async def one(call: Callable[[], Awaitable[T]]) -> tuple[bool, T | ShardFailure]:
        begin = clock()
        try:
            async with asyncio.timeout(deadline_s) as scope:
                return True, await call()
        except TimeoutError as exc:
            if scope.expired():
                detail = f"no answer within {deadline_s:g}s"
                return False, ShardFailure(ShardOutcome.TIMED_OUT, detail, clock() - begin)
            return False, ShardFailure(ShardOutcome.FAILED, _describe(exc), clock() - begin)
        except Exception as exc:  # noqa: BLE001 - each shard's failure is reported, not raised
            return False, ShardFailure(ShardOutcome.FAILED, _describe(exc), clock() - begin)

    keys = list(calls)
    outcomes = await asyncio.gather(*(one(calls[k]) for k in keys))
    results: dict[K, T] = {}
    failures: dict[K, ShardFailure] = {}
    for key, (ok, value) in zip(keys, outcomes, strict=True):
        if ok:
            results[key] = value  # type: ignore[assignment]
        else:
            assert isinstance(value, ShardFailure)
            failures[key] = value
    return GatherResult(results, failures, clock() - started)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
