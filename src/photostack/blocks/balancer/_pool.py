"""Backend choice: round-robin over the backends that are up, with passive health.

Pure policy with an injected clock, driven by the asyncio adapters (``_upstream``). A later
strategy (least-connections, weighted, consistent hash) is another ``choose`` over the same
health records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

from photostack.blocks.balancer._errors import NoBackendAvailable
from photostack.blocks.balancer._health import (
    Backend,
    BackendHealth,
    BackendState,
    HealthConfig,
    HealthEvent,
)

__all__ = ["BackendPool", "Clock"]

Clock = Callable[[], float]


class BackendPool:
    """The backends of one upstream group and their health.

    ``choose`` never refuses while some backend is not excluded: when every backend is cooling
    down, the one whose cool-down ends first is tried, because refusing outright turns a
    short blip into an outage.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        config: HealthConfig | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        self._config = config or HealthConfig()
        self._clock = clock
        self._healths = [BackendHealth(b) for b in backends]
        self._by_name = {h.backend.name: h for h in self._healths}
        self._cursor = 0

    def __repr__(self) -> str:
        return f"<BackendPool {self._healths!r}>"

    def __len__(self) -> int:
        return len(self._healths)

    @property
    def backends(self) -> list[Backend]:
        return [h.backend for h in self._healths]

    def health(self, name: str) -> BackendHealth:
        """The live health record of ``name`` (KeyError if unknown)."""
        return self._by_name[name]

    def choose(self, exclude: Collection[str] = ()) -> Backend:
        """Next backend in round-robin order, skipping excluded and cooling-down ones.

        Raises NoBackendAvailable only when every backend is excluded (or there are none).
        """
        now = self._clock()
        count = len(self._healths)
        for step in range(count):
            index = (self._cursor + step) % count
            health = self._healths[index]
            if health.backend.name in exclude or not health.is_available(now):
                continue
            self._cursor = index + 1
            if health.state is BackendState.DOWN:
                health.apply(HealthEvent.PROBE, now=now, config=self._config)
            return health.backend
        left = [h for h in self._healths if h.backend.name not in exclude]
        if not left:
            raise NoBackendAvailable("no backend left to try")
        health = min(left, key=lambda h: h.down_until)
        if health.state is BackendState.DOWN:
            health.apply(HealthEvent.PROBE, now=now, config=self._config)
        return health.backend

    def record_success(self, backend: Backend) -> None:
        health = self._by_name[backend.name]
        health.apply(HealthEvent.SUCCESS, now=self._clock(), config=self._config)

    def record_failure(self, backend: Backend) -> None:
        health = self._by_name[backend.name]
        health.apply(HealthEvent.FAILURE, now=self._clock(), config=self._config)

    def started(self, backend: Backend) -> None:
        self._by_name[backend.name].in_flight += 1

    def finished(self, backend: Backend) -> None:
        self._by_name[backend.name].in_flight -= 1

    def snapshot(self) -> list[dict[str, object]]:
        """One plain dict per backend, for /metrics and status pages."""
        now = self._clock()
        return [
            {
                "name": h.backend.name,
                "address": f"{h.backend.host}:{h.backend.port}",
                "state": h.state.value,
                "in_flight": h.in_flight,
                "failures": h.consecutive_failures,
                "markdowns": h.markdowns,
                "down_for_s": round(max(0.0, h.down_until - now), 3)
                if h.state is not BackendState.UP
                else 0.0,
            }
            for h in self._healths
        ]
