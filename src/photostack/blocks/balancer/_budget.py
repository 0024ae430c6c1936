"""The retry budget: retries may add at most a share of the requests as extra load. Pure.

Over a sliding window of ``window_s`` (kept as one-second buckets), retries are allowed while

    retries < budget_percent/100 · requests + min_retries_per_s · window_s

so a failing backend cannot multiply the load by ``max_tries`` (a retry storm), while a quiet
service still retries a few requests a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryBudgetConfig"]


@dataclass(frozen=True)
class RetryBudgetConfig:
    budget_percent: float = 20.0
    min_retries_per_s: float = 5.0
    window_s: int = 10

    def __post_init__(self) -> None:
        if self.budget_percent < 0 or self.min_retries_per_s < 0 or self.window_s < 1:
            raise ValueError(f"bad retry budget {self}")


class RetryBudget:
    """Counts requests and retries per second over the window; decides whether a retry fits."""

    __slots__ = ("_clock", "_config", "_epoch", "_requests", "_retries", "exhausted")

    def __init__(
        self,
        config: RetryBudgetConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or RetryBudgetConfig()
        self._clock = clock
        size = self._config.window_s
        self._requests = [0] * size
        self._retries = [0] * size
        self._epoch = [0] * size  # which second each bucket counts
        self.exhausted = 0  # retries refused, for metrics

    def _bucket(self) -> int:
        second = int(self._clock())
        index = second % len(self._epoch)
        if self._epoch[index] != second:
            self._epoch[index] = second
            self._requests[index] = 0
            self._retries[index] = 0
        return index

    def _sums(self) -> tuple[int, int]:
        second = int(self._clock())
        oldest = second - len(self._epoch) + 1
        requests = retries = 0
        for index, epoch in enumerate(self._epoch):
            if epoch >= oldest:
                requests += self._requests[index]
                retries += self._retries[index]
        return requests, retries

    def record_request(self) -> None:
        """One original request (not a retry)."""
        second = int(self._clock())
        index = second % len(self._epoch)
        if self._epoch[index] == second:  # the usual case: this second's bucket is current
            self._requests[index] += 1
        else:
            self._requests[self._bucket()] += 1

    def allowance(self) -> float:
        """How many retries the window allows in total right now."""
        requests, _ = self._sums()
        config = self._config
        return config.budget_percent / 100.0 * requests + config.min_retries_per_s * config.window_s

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is used up."""
        _, retries = self._sums()
        if retries + 1 > self.allowance():
            self.exhausted += 1
            return False
        self._retries[self._bucket()] += 1
        return True
