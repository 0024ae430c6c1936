"""Passive health of one backend: a small state machine driven by request outcomes and a clock.

No I/O here: adapters report outcomes, the pool asks ``is_available(now)``. A backend that fails
is cooled down for ``cooldown_initial_s``, doubling per consecutive failure up to
``cooldown_max_s``; after the cool-down one trial request (PROBING) decides whether it is UP again.
Only one trial at a time, so a recovering backend is not hit by a burst it may not survive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from photostack.blocks.balancer._errors import IllegalTransition

__all__ = ["Backend", "BackendHealth", "BackendState", "HealthConfig", "HealthEvent"]


@dataclass(frozen=True)
class Backend:
    """One upstream server, addressed by host and port; ``name`` is what metrics and logs show."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class HealthConfig:
    cooldown_initial_s: float = 1.0
    cooldown_max_s: float = 10.0
    cooldown_factor: float = 2.0

    def cooldown_s(self, consecutive_failures: int) -> float:
        """Cool-down after the n-th consecutive failure (n >= 1)."""
        exponent = max(0, consecutive_failures - 1)
        # Cap the exponent first so a long outage cannot overflow the float.
        raw = self.cooldown_initial_s * self.cooldown_factor ** min(exponent, 64)
        return min(raw, self.cooldown_max_s)


class BackendState(enum.Enum):
    UP = "up"
    DOWN = "down"  # cooling down after a failure; not chosen unless nothing else is left
    PROBING = "probing"  # cool-down over, one trial request in flight


class HealthEvent(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    PROBE = "probe"  # the pool picked a DOWN backend for a trial request


_S = BackendState
_E = HealthEvent
TRANSITIONS: dict[tuple[BackendState, HealthEvent], BackendState] = {
    (_S.UP, _E.SUCCESS): _S.UP,
    (_S.UP, _E.FAILURE): _S.DOWN,
    (_S.DOWN, _E.PROBE): _S.PROBING,
    # A request sent before the mark-down came back fine: the backend is alive after all.
    (_S.DOWN, _E.SUCCESS): _S.UP,
    # Late failures of requests sent before the mark-down: already counted, do not extend.
    (_S.DOWN, _E.FAILURE): _S.DOWN,
    (_S.PROBING, _E.SUCCESS): _S.UP,
    (_S.PROBING, _E.FAILURE): _S.DOWN,
}


class BackendHealth:
    """Mutable health record of one backend. Times are seconds on the pool's injected clock."""

    __slots__ = ("backend", "consecutive_failures", "down_until", "in_flight", "markdowns", "state")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.state = BackendState.UP
        self.consecutive_failures = 0
        self.down_until = 0.0
        self.in_flight = 0
        self.markdowns = 0

    def __repr__(self) -> str:
        return (
            f"<BackendHealth {self.backend.name} state={self.state.name} "
            f"failures={self.consecutive_failures} in_flight={self.in_flight}>"
        )

    def apply(self, event: HealthEvent, *, now: float, config: HealthConfig) -> BackendState:
        """Move to the next state; raises IllegalTransition if the table has no such edge."""
        try:
            target = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{self!r} cannot take {event.name}") from None
        if event is HealthEvent.SUCCESS:
            self.consecutive_failures = 0
        elif event is HealthEvent.FAILURE and self.state is not BackendState.DOWN:
            self.consecutive_failures += 1
            self.markdowns += 1
            self.down_until = now + config.cooldown_s(self.consecutive_failures)
        self.state = target
        return target

    def is_available(self, now: float) -> bool:
        """Whether the pool may choose it in its normal round (not as a last resort)."""
        if self.state is BackendState.UP:
            return True
        return self.state is BackendState.DOWN and now >= self.down_until
