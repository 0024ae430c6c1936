"""Health of one backend: an explicit state machine driven by outcomes, checks and a clock.

No I/O here. Adapters report request outcomes (passive) and active check results; the pool asks
who may be chosen. States:

- UP: chosen normally (its share ramps during slow start after it (re)joined).
- DOWN: ejected by passive outlier detection after ``eject_after_failures`` consecutive
  failures; the ejection lasts ``ejection_s(streak)``, growing with repeated ejections.
- PROBING: the ejection is over and one probe (a trial request, or the next active check) is
  out; its result re-adds the backend or ejects it again, longer.
- UNHEALTHY: ``fall`` consecutive active checks failed; ``rise`` passing ones bring it back.
- DRAINING: no new requests; requests in flight finish. Left by RESTORE only (through DOWN
  with the ejection already over, so it is probed before it serves again).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from photostack.blocks.balancer._errors import IllegalTransition
from photostack.blocks.balancer._slowstart import SlowStart

__all__ = [
    "TRANSITIONS",
    "ActiveCheckConfig",
    "Backend",
    "BackendHealth",
    "BackendState",
    "HealthConfig",
    "HealthEvent",
]


@dataclass(frozen=True)
class Backend:
    """One upstream server, addressed by host and port; ``name`` is what metrics and logs show.

    ``weight`` is the configured share for weighted strategies (a backend may report another
    one in its health check answer, see ``ActiveCheckConfig.weight_header``).
    """

    name: str
    host: str
    port: int
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"{self.name}: weight must be a positive number, not {self.weight}")


@dataclass(frozen=True)
class ActiveCheckConfig:
    """``GET path`` every ``interval_s`` (+/- jitter); a 2xx within ``timeout_s`` passes."""

    enabled: bool = False  # the cluster and the sidecar turn them on
    interval_s: float = 1.0
    timeout_s: float = 0.5
    rise: int = 2  # consecutive passes that bring an UNHEALTHY backend back
    fall: int = 2  # consecutive failures that take an UP backend out
    jitter_fraction: float = 0.1
    path: str = "/healthz"
    # A backend may answer its check with this header (a positive number) to set its weight.
    weight_header: str = "x-backend-weight"

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0 or self.rise < 1 or self.fall < 1:
            raise ValueError(f"bad active check settings {self}")
        if not 0 <= self.jitter_fraction < 1 or not self.path.startswith("/"):
            raise ValueError(f"bad active check settings {self}")


@dataclass(frozen=True)
class HealthConfig:
    eject_after_failures: int = 1  # consecutive failed requests that eject (nginx max_fails)
    ejection_initial_s: float = 1.0
    ejection_max_s: float = 30.0
    ejection_factor: float = 2.0
    # Never eject more than this share of the pool (at least one backend may always be ejected).
    max_ejection_percent: float = 50.0
    checks: ActiveCheckConfig = field(default_factory=ActiveCheckConfig)
    slow_start: SlowStart = field(default_factory=SlowStart)

    def __post_init__(self) -> None:
        if self.eject_after_failures < 1 or self.ejection_initial_s <= 0:
            raise ValueError(f"bad health settings {self}")
        if self.ejection_factor < 1 or not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"bad health settings {self}")

    def ejection_s(self, streak: int) -> float:
        """How long the ``streak``-th ejection in a row lasts (streak >= 1)."""
        exponent = min(max(0, streak - 1), 64)  # capped first: a long outage cannot overflow
        return min(self.ejection_initial_s * self.ejection_factor**exponent, self.ejection_max_s)


class BackendState(enum.Enum):
    UP = "up"
    DOWN = "down"  # ejected by passive outlier detection ("marked down")
    PROBING = "probing"
    UNHEALTHY = "unhealthy"  # failed active checks
    DRAINING = "draining"


class HealthEvent(enum.Enum):
    SUCCESS = "success"  # a request got a response head
    FAILURE = "failure"  # a request failed in a way that blames the backend
    EJECT = "eject"  # the pool decided: too many consecutive failures, and the cap allows it
    PROBE = "probe"  # the ejection is over; a trial request or active check is out
    RISE = "rise"  # active checks passed (``rise`` in a row, or one after an ejection)
    FALL = "fall"  # ``fall`` active checks in a row failed
    DRAIN = "drain"
    RESTORE = "restore"  # a drained backend may serve again once probed


_S = BackendState
_E = HealthEvent
TRANSITIONS: dict[tuple[BackendState, HealthEvent], BackendState] = {
    (_S.UP, _E.SUCCESS): _S.UP,
    (_S.UP, _E.FAILURE): _S.UP,  # counted; EJECT decides
    (_S.UP, _E.EJECT): _S.DOWN,
    (_S.UP, _E.RISE): _S.UP,
    (_S.UP, _E.FALL): _S.UNHEALTHY,
    (_S.UP, _E.DRAIN): _S.DRAINING,
    # Late outcomes of requests sent before the ejection change nothing.
    (_S.DOWN, _E.SUCCESS): _S.DOWN,
    (_S.DOWN, _E.FAILURE): _S.DOWN,
    (_S.DOWN, _E.PROBE): _S.PROBING,
    (_S.DOWN, _E.RISE): _S.UP,  # only offered once the ejection is over (the probe)
    (_S.DOWN, _E.FALL): _S.UNHEALTHY,
    (_S.DOWN, _E.DRAIN): _S.DRAINING,
    (_S.PROBING, _E.SUCCESS): _S.UP,
    (_S.PROBING, _E.FAILURE): _S.DOWN,
    (_S.PROBING, _E.RISE): _S.UP,
    (_S.PROBING, _E.FALL): _S.UNHEALTHY,
    (_S.PROBING, _E.DRAIN): _S.DRAINING,
    (_S.UNHEALTHY, _E.SUCCESS): _S.UNHEALTHY,
    (_S.UNHEALTHY, _E.FAILURE): _S.UNHEALTHY,
    (_S.UNHEALTHY, _E.RISE): _S.UP,
    (_S.UNHEALTHY, _E.FALL): _S.UNHEALTHY,
    (_S.UNHEALTHY, _E.DRAIN): _S.DRAINING,
    (_S.DRAINING, _E.SUCCESS): _S.DRAINING,
    (_S.DRAINING, _E.FAILURE): _S.DRAINING,
    (_S.DRAINING, _E.RISE): _S.DRAINING,
    (_S.DRAINING, _E.FALL): _S.DRAINING,
    (_S.DRAINING, _E.DRAIN): _S.DRAINING,
    (_S.DRAINING, _E.RESTORE): _S.DOWN,
}


class BackendHealth:
    """Mutable health record of one backend. Times are seconds on the pool's injected clock."""

    __slots__ = (
        "backend",
        "check_fails",
        "check_passes",
        "consecutive_failures",
        "ejected_until",
        "ejection_streak",
        "ejections",
        "in_flight",
        "ramp_since",
        "reported_weight",
        "state",
        "up_since",
    )

    def __init__(self, backend: Backend, *, now: float = 0.0, ramp: bool = False) -> None:
        self.backend = backend
        self.state = BackendState.UP
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.ejection_streak = 0
        self.up_since = now
        # Slow start runs from here; None: full share (a member of the pool from the start).
        self.ramp_since: float | None = now if ramp else None
        self.in_flight = 0
        self.check_passes = 0
        self.check_fails = 0
        self.reported_weight: float | None = None

    def __repr__(self) -> str:
        return (
            f"<BackendHealth {self.backend.name} state={self.state.name} "
            f"failures={self.consecutive_failures} in_flight={self.in_flight}>"
        )

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def weight(self) -> float:
        """The reported weight if the backend sent one, else the configured one."""
        return self.reported_weight if self.reported_weight is not None else self.backend.weight

    def apply(self, event: HealthEvent, *, now: float, config: HealthConfig) -> BackendState:
        """Move to the next state; raises IllegalTransition if the table has no such edge."""
        source = self.state
        try:
            target = TRANSITIONS[(source, event)]
        except KeyError:
            raise IllegalTransition(f"{self!r} cannot take {event.name}") from None
        if event is HealthEvent.SUCCESS:
            self.consecutive_failures = 0
        elif event is HealthEvent.FAILURE and source is BackendState.UP:
            self.consecutive_failures += 1
        if target is BackendState.DOWN and source is not BackendState.DOWN:
            if event is HealthEvent.RESTORE:
                self.ejected_until = now  # over at once: only the probe stands between
            else:
                stable = now - self.up_since >= config.ejection_max_s
                self.ejection_streak = 1 if stable else self.ejection_streak + 1
                self.ejections += 1
                self.ejected_until = now + config.ejection_s(self.ejection_streak)
        if target is BackendState.UP and source is not BackendState.UP:
            self.up_since = now
            self.ramp_since = now
            self.consecutive_failures = 0
        if target is not source:
            self.check_passes = self.check_fails = 0
        self.state = target
        return target

    def ejection_over(self, now: float) -> bool:
        return self.state is BackendState.DOWN and now >= self.ejected_until

    def share(self, now: float, slow_start: SlowStart) -> float:
        """The slow-start fraction of its full share, in (0, 1]."""
        if self.ramp_since is None:
            return 1.0
        fraction = slow_start.fraction(now - self.ramp_since)
        if fraction >= 1.0:
            self.ramp_since = None  # done ramping: skip the arithmetic from now on
        return fraction
