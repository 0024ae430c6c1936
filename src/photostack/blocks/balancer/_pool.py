"""The backends of one upstream group: membership, health records and the choice of a backend.

Pure policy with an injected clock: the asyncio adapters report outcomes and check results and
ask ``choose``. The strategy is pluggable (``_strategy``); health (``_health``) decides who is
a candidate; slow start scales each candidate's share.
"""

from __future__ import annotations

import math
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
from photostack.blocks.balancer._strategy import Candidate, RoundRobin, Strategy

__all__ = ["BackendPool", "Clock"]

Clock = Callable[[], float]
Listener = Callable[[str, BackendState, BackendState], None]

_EJECTED_STATES = frozenset({BackendState.DOWN, BackendState.PROBING})
_UP = BackendState.UP


class BackendPool:
    """The backends of one upstream group and their health.

    ``choose`` never refuses while some backend is neither excluded nor draining: when no backend
    is a candidate (all ejected or down), the one whose ejection ends first is tried (panic
    routing), because refusing outright turns a short blip into an outage.

    Expired ejections are probed by one trial request unless ``probe_by_checks`` is set (an
    active checker runs and its next check is the probe).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        config: HealthConfig | None = None,
        *,
        strategy: Strategy | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        self.config = config or HealthConfig()
        self._clock = clock
        now = clock()
        self._healths = {b.name: BackendHealth(b, now=now) for b in backends}
        self._strategy: Strategy = strategy or RoundRobin()
        self._strategy.members_changed(self._weights())
        self.probe_by_checks = False
        self.on_transition: Listener | None = None

    def __repr__(self) -> str:
        return f"<BackendPool {self._strategy.name} {list(self._healths.values())!r}>"

    def __len__(self) -> int:
        return len(self._healths)

    def __contains__(self, name: object) -> bool:
        return name in self._healths

    @property
    def backends(self) -> list[Backend]:
        return [h.backend for h in self._healths.values()]

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        strategy.members_changed(self._weights())
        self._strategy = strategy

    def health(self, name: str) -> BackendHealth:
        """The live health record of ``name`` (KeyError if unknown)."""
        return self._healths[name]

    def _weights(self) -> dict[str, float]:
        return {name: h.weight for name, h in self._healths.items()}

    # -- membership --------------------------------------------------------------------------

    def add(self, backend: Backend) -> BackendHealth:
        """A new member; it serves at once, its share ramping over the slow-start window.

        Raises ValueError if the name is taken.
        """
        if backend.name in self._healths:
            raise ValueError(f"backend {backend.name!r} is already in the pool")
        health = BackendHealth(backend, now=self._clock(), ramp=True)
        self._healths[backend.name] = health
        self._strategy.members_changed(self._weights())
        return health

    def remove(self, name: str) -> BackendHealth:
        """Forget a member (KeyError if unknown); drain it first to let its requests finish."""
        health = self._healths.pop(name)
        self._strategy.members_changed(self._weights())
        return health

    def drain(self, name: str) -> None:
        """No new requests for ``name``; those in flight finish (KeyError if unknown)."""
        self._apply(self._healths[name], HealthEvent.DRAIN)

    def restore(self, name: str) -> None:
        """A drained member may serve again after a probe passes (KeyError if unknown)."""
        health = self._healths[name]
        if health.state is BackendState.DRAINING:
            self._apply(health, HealthEvent.RESTORE)

    # -- choice ------------------------------------------------------------------------------

    def choose(self, exclude: Collection[str] = (), key: bytes | None = None) -> Backend:
        """A backend for one try, by the strategy, skipping excluded and unavailable ones.

        Raises NoBackendAvailable only when every backend is excluded or draining.
        """
        now = self._clock()
        slow_start = self.config.slow_start
        candidates: list[Candidate] = []
        chosen: BackendHealth | None = None  # the candidate, while there is only one
        trial: BackendHealth | None = None
        for name, health in self._healths.items():
            state = health.state
            if state is _UP:
                if exclude and name in exclude:
                    continue
                chosen = health if not candidates else None
                if health.ramp_since is None and health.reported_weight is None:
                    weight = health.backend.weight
                    candidates.append(Candidate(name, weight, 1.0, health.in_flight))
                else:
                    share = health.share(now, slow_start)
                    candidates.append(
                        Candidate(name, health.weight * share, share, health.in_flight)
                    )
            elif (
                trial is None
                and state is BackendState.DOWN
                and not self.probe_by_checks
                and now >= health.ejected_until
                and name not in exclude
            ):
                trial = health
        if trial is not None:
            self._apply(trial, HealthEvent.PROBE)
            return trial.backend
        if chosen is not None:
            # One candidate: every strategy picks it (nginx's "single peer" shortcut too).
            return chosen.backend
        if candidates:
            return self._healths[self._strategy.choose(candidates, key)].backend
        left = [
            h
            for h in self._healths.values()
            if h.name not in exclude and h.state is not BackendState.DRAINING
        ]
        if not left:
            raise NoBackendAvailable("no backend left to try")
        health = min(left, key=lambda h: h.ejected_until if h.state in _EJECTED_STATES else now)
        if health.state is BackendState.DOWN:
            self._apply(health, HealthEvent.PROBE)
        return health.backend

    # -- outcomes ----------------------------------------------------------------------------

    def record_success(self, backend: Backend) -> None:
        health = self._healths.get(backend.name)
        if health is None:
            return
        if health.state is _UP and health.consecutive_failures == 0:
            return  # UP --SUCCESS--> UP with nothing to reset: the table's answer, without lookup
        self._apply(health, HealthEvent.SUCCESS)

    def record_failure(self, backend: Backend) -> None:
        """A failed request blamed on ``backend``; may eject it (within the ejection cap)."""
        health = self._healths.get(backend.name)
        if health is None:
            return
        self._apply(health, HealthEvent.FAILURE)
        if (
            health.state is BackendState.UP
            and health.consecutive_failures >= self.config.eject_after_failures
            and self._may_eject()
        ):
            self._apply(health, HealthEvent.EJECT)

    def _may_eject(self) -> bool:
        members = [h for h in self._healths.values() if h.state is not BackendState.DRAINING]
        ejected = sum(1 for h in members if h.state in _EJECTED_STATES)
        allowed = max(1, math.floor(len(members) * self.config.max_ejection_percent / 100.0))
        return ejected + 1 <= allowed

    def record_check(self, name: str, ok: bool, *, weight: float | None = None) -> None:
        """One active check result for ``name`` (ignored if it left the pool meanwhile)."""
        health = self._healths.get(name)
        if health is None:
            return
        if weight is not None and weight != health.reported_weight:
            health.reported_weight = weight
            self._strategy.members_changed(self._weights())
        checks = self.config.checks
        state = health.state
        if ok:
            health.check_passes += 1
            health.check_fails = 0
            if (
                (state is BackendState.UNHEALTHY and health.check_passes >= checks.rise)
                or (state is BackendState.DOWN and health.ejection_over(self._clock()))
                or state is BackendState.PROBING
            ):
                self._apply(health, HealthEvent.RISE)
        else:
            health.check_fails += 1
            health.check_passes = 0
            if state in (BackendState.UP, *_EJECTED_STATES) and health.check_fails >= checks.fall:
                self._apply(health, HealthEvent.FALL)

    def started(self, backend: Backend) -> None:
        health = self._healths.get(backend.name)
        if health is not None:
            health.in_flight += 1

    def finished(self, backend: Backend) -> int:
        """One request to ``backend`` ended; returns how many are still in flight there."""
        health = self._healths.get(backend.name)
        if health is None:
            return 0
        health.in_flight -= 1
        return health.in_flight

    def _apply(self, health: BackendHealth, event: HealthEvent) -> None:
        before = health.state
        after = health.apply(event, now=self._clock(), config=self.config)
        if after is not before and self.on_transition is not None:
            self.on_transition(health.name, before, after)

    def snapshot(self) -> list[dict[str, object]]:
        """One plain dict per backend, for /metrics, status pages and the admin endpoint."""
        now = self._clock()
        slow_start = self.config.slow_start
        return [
            {
                "name": h.name,
                "address": f"{h.backend.host}:{h.backend.port}",
                "state": h.state.value,
                "weight": h.weight,
                "share": round(h.share(now, slow_start), 3),
                "in_flight": h.in_flight,
                "failures": h.consecutive_failures,
                "ejections": h.ejections,
                "markdowns": h.ejections,  # the walking skeleton's name for an ejection
                "down_for_s": round(max(0.0, h.ejected_until - now), 3)
                if h.state in _EJECTED_STATES
                else 0.0,
            }
            for h in self._healths.values()
        ]
