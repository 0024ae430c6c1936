"""The failover coordinator's decisions: pure values and a manual clock, no I/O.

- :func:`tally`: is a primary down? Each observer votes (a directory node's probe, a replica's
  WAL receiver); a stale or missing observation abstains. Down needs a majority of *all*
  observers, so one node's broken link never promotes anything.
- :class:`ShardWatch`: per shard, the phase (a transition table) and when the primary was first
  seen down. A failover needs the primary down for ``down_after_s`` without a single "up" in
  between (flapping resets it) and no failover of that shard in the last
  ``min_failover_interval_s``.
- :func:`choose_candidate`: the most advanced replica (received LSN), never one that could miss an
  acknowledged write of a synchronous group, never an asynchronous one lagging beyond the bound.
- the old primary's write lease must have lapsed before anything is promoted
  (:meth:`ShardWatch.decide` answers WAIT until then): the old primary refuses writes by itself
  from then on, so two primaries never accept writes at once.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from photostack.blocks.storage import ReplicationMode

__all__ = [
    "Candidate",
    "CoordinatorConfig",
    "Decision",
    "DecisionKind",
    "ShardPhase",
    "ShardWatch",
    "Tally",
    "Vote",
    "choose_candidate",
    "tally",
]


@dataclass(frozen=True)
class CoordinatorConfig:
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 0.8  # generous: a loaded 2-core machine answers slowly
    down_after_s: float = 0.6  # seen down by a majority this long, continuously
    observation_max_age_s: float = 1.5  # an older observation abstains
    leader_lease_s: float = 1.2  # the coordinator's own lease in the directory database
    write_lease_s: float = 2.0  # a primary accepts writes this long after a renewal
    renew_interval_s: float = 0.2
    fence_margin_s: float = 0.2  # waited past the old primary's lease before a promotion
    min_failover_interval_s: float = 10.0  # anti-flap: one failover per shard per interval
    max_async_lag_bytes: int = 16 * 1024 * 1024  # an async replica further behind is not promoted
    promote_timeout_s: float = 5.0


@dataclass(frozen=True)
class Vote:
    observer: str
    down: bool | None  # None: abstains (no fresh observation)


@dataclass(frozen=True)
class Tally:
    down: int
    up: int
    total: int

    @property
    def majority_down(self) -> bool:
        return self.down >= self.total // 2 + 1

    @property
    def any_up(self) -> bool:
        return self.up > 0


def tally(votes: Sequence[Vote], total: int | None = None) -> Tally:
    """Count votes; ``total`` is the number of observers there should be (absent ones abstain)."""
    down = sum(1 for v in votes if v.down is True)
    up = sum(1 for v in votes if v.down is False)
    return Tally(down, up, max(total if total is not None else len(votes), len(votes)))


class ShardPhase(enum.StrEnum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # a majority sees the primary down; waiting for down_after_s
    FAILING_OVER = "failing_over"
    NO_CANDIDATE = "no_candidate"  # down, but no replica may be promoted (reason recorded)


_TRANSITIONS: dict[ShardPhase, frozenset[ShardPhase]] = {
    ShardPhase.HEALTHY: frozenset({ShardPhase.SUSPECT, ShardPhase.FAILING_OVER}),
    ShardPhase.SUSPECT: frozenset(
        {ShardPhase.HEALTHY, ShardPhase.FAILING_OVER, ShardPhase.NO_CANDIDATE}
    ),
    ShardPhase.FAILING_OVER: frozenset({ShardPhase.HEALTHY, ShardPhase.NO_CANDIDATE}),
    ShardPhase.NO_CANDIDATE: frozenset(
        {ShardPhase.HEALTHY, ShardPhase.SUSPECT, ShardPhase.FAILING_OVER}
    ),
}


@dataclass(frozen=True)
class Candidate:
    """A replica as the coordinator last saw it."""

    name: str
    reachable: bool
    in_recovery: bool
    receive_lsn: int | None
    replay_lsn: int | None
    was_sync: bool = False  # sync_state 'sync' at the primary's last sample
    lag_bytes: int | None = None  # behind the primary at its last sample


class DecisionKind(enum.StrEnum):
    NONE = "none"  # primary fine, or not down long enough
    WAIT = "wait"  # down, but the old primary's write lease may still be valid
    PROMOTE = "promote"
    REFUSE = "refuse"  # down, nothing may be promoted (reason)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    candidate: str | None = None
    reason: str = ""


def choose_candidate(
    mode: ReplicationMode, replicas: Sequence[Candidate], max_async_lag_bytes: int
) -> Decision:
    """PROMOTE the most advanced replica, or REFUSE with the reason."""
    usable = [r for r in replicas if r.reachable and r.in_recovery and r.receive_lsn is not None]
    if not usable:
        return Decision(DecisionKind.REFUSE, reason="no replica reachable")
    best = max(usable, key=lambda r: (r.receive_lsn or 0, r.replay_lsn or 0, r.was_sync))
    if mode.synchronous:
        sync = [r for r in replicas if r.was_sync]
        if sync:
            if not any(s.reachable and s.receive_lsn is not None for s in sync):
                return Decision(
                    DecisionKind.REFUSE,
                    reason="the synchronous standby is unreachable; the others may miss "
                    "acknowledged writes",
                )
            floor = max(s.receive_lsn or 0 for s in sync if s.receive_lsn is not None)
            if (best.receive_lsn or 0) < floor:  # pragma: no cover - best is the maximum
                return Decision(DecisionKind.REFUSE, reason="no replica has every commit")
            return Decision(DecisionKind.PROMOTE, best.name, "has every acknowledged write")
    if best.lag_bytes is not None and best.lag_bytes > max_async_lag_bytes:
        return Decision(
            DecisionKind.REFUSE,
            reason=f"{best.name} lagged {best.lag_bytes} bytes (bound {max_async_lag_bytes})",
        )
    return Decision(DecisionKind.PROMOTE, best.name, "most advanced replica")


class ShardWatch:
    """One shard's failure detector and failover gate. Times are the caller's monotonic clock."""

    def __init__(
        self,
        shard: str,
        config: CoordinatorConfig,
        *,
        epoch: int = 1,
        failed_over_at: float | None = None,
    ) -> None:
        self.shard = shard
        self.epoch = epoch  # the map epoch this watch judges (a new epoch gets a new watch)
        self.phase = ShardPhase.HEALTHY
        self.down_since: float | None = None
        self.config = config
        self.last_failover_at = failed_over_at
        self.reason = ""

    def to(self, phase: ShardPhase, reason: str = "") -> None:
        """Raises ValueError for a transition the table does not allow."""
        if phase is not self.phase and phase not in _TRANSITIONS[self.phase]:
            raise ValueError(f"{self.shard}: {self.phase} -> {phase} is not allowed")
        self.phase = phase
        self.reason = reason

    def observe(self, votes: Tally, now: float) -> None:
        """Record one round of votes."""
        if self.phase is ShardPhase.FAILING_OVER:
            return
        if votes.majority_down and not votes.any_up:
            if self.down_since is None:
                self.down_since = now
            if self.phase is ShardPhase.HEALTHY:
                self.to(ShardPhase.SUSPECT, f"{votes.down}/{votes.total} observers see it down")
        elif votes.majority_down:  # flapping: someone still sees it up; start over
            self.down_since = now
        else:
            self.down_since = None
            if self.phase is not ShardPhase.HEALTHY:
                self.to(ShardPhase.HEALTHY)

    def decide(
        self,
        now: float,
        mode: ReplicationMode,
        replicas: Sequence[Candidate],
        lease_lapsed_at: float,
    ) -> Decision:
        """What to do now. ``lease_lapsed_at``: when the old primary's write lease has surely
        expired (last renewal sent + write lease + margin)."""
        if self.phase not in (ShardPhase.SUSPECT, ShardPhase.NO_CANDIDATE):
            return Decision(DecisionKind.NONE)
        assert self.down_since is not None
        if now - self.down_since < self.config.down_after_s:
            return Decision(DecisionKind.NONE, reason="not down long enough")
        last = self.last_failover_at
        if last is not None and now - last < self.config.min_failover_interval_s:
            decision = Decision(DecisionKind.REFUSE, reason="failed over recently (anti-flap)")
            self.to(ShardPhase.NO_CANDIDATE, decision.reason)
            return decision
        decision = choose_candidate(mode, replicas, self.config.max_async_lag_bytes)
        if decision.kind is DecisionKind.REFUSE:
            self.to(ShardPhase.NO_CANDIDATE, decision.reason)
            return decision
        if now < lease_lapsed_at:
            return Decision(DecisionKind.WAIT, decision.candidate, "old primary's lease")
        self.to(ShardPhase.FAILING_OVER, f"promoting {decision.candidate}")
        return decision

    def failed_over(self, now: float) -> None:
        self.last_failover_at = now
        self.down_since = None
        self.to(ShardPhase.HEALTHY)

    def failover_failed(self, reason: str) -> None:
        self.to(ShardPhase.NO_CANDIDATE, reason)
