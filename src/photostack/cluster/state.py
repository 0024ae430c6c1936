"""Node lifecycle as an explicit state machine, and the restart back-off policy.

Pure: the supervisor asks these objects what is allowed and how long to wait; it owns the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["IllegalTransition", "NodeLifecycle", "NodeState", "RestartPolicy"]


class NodeState(StrEnum):
    PENDING = "pending"  # laid out, never started
    STARTING = "starting"  # process spawned, not yet answering its readiness probe
    READY = "ready"
    UNHEALTHY = "unhealthy"  # process alive, probe failing
    BACKOFF = "backoff"  # exited unexpectedly, waiting to be restarted
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped on purpose; stays down until started
    FAILED = "failed"  # could not be prepared or started; needs a `start`


_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.PENDING: frozenset({NodeState.STARTING, NodeState.STOPPED, NodeState.FAILED}),
    NodeState.STARTING: frozenset(
        {NodeState.READY, NodeState.BACKOFF, NodeState.STOPPING, NodeState.FAILED}
    ),
    NodeState.READY: frozenset({NodeState.UNHEALTHY, NodeState.BACKOFF, NodeState.STOPPING}),
    NodeState.UNHEALTHY: frozenset({NodeState.READY, NodeState.BACKOFF, NodeState.STOPPING}),
    NodeState.BACKOFF: frozenset({NodeState.STARTING, NodeState.STOPPED, NodeState.FAILED}),
    NodeState.STOPPING: frozenset({NodeState.STOPPED}),
    NodeState.STOPPED: frozenset({NodeState.STARTING}),
    NodeState.FAILED: frozenset({NodeState.STARTING, NodeState.STOPPED}),
}

ALIVE_STATES = frozenset({NodeState.STARTING, NodeState.READY, NodeState.UNHEALTHY})


class IllegalTransition(Exception):
    """A lifecycle change the transition table forbids (a supervisor bug, or a racing command)."""


class NodeLifecycle:
    """The current state of one node and the history-free rules for changing it."""

    __slots__ = ("_state", "name")

    def __init__(self, name: str, state: NodeState = NodeState.PENDING) -> None:
        self.name = name
        self._state = state

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def is_alive(self) -> bool:
        """A process is (or should be) running for this node."""
        return self._state in ALIVE_STATES

    def can_become(self, new: NodeState) -> bool:
        return new in _TRANSITIONS[self._state]

    def become(self, new: NodeState) -> None:
        if new is self._state:
            return
        if not self.can_become(new):
            raise IllegalTransition(f"{self.name}: {self._state} -> {new} is not allowed")
        self._state = new

    def __repr__(self) -> str:
        return f"<NodeLifecycle {self.name} {self._state}>"


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off between restarts of a crashing node.

    A node that stayed up for ``stable_after_s`` is considered healed: its next crash starts the
    back-off from ``initial_delay_s`` again.
    """

    initial_delay_s: float = 0.25
    max_delay_s: float = 10.0
    factor: float = 2.0
    stable_after_s: float = 30.0

    def delay_s(self, consecutive_crashes: int) -> float:
        """Wait before restart number ``consecutive_crashes`` (1 = first crash)."""
        if consecutive_crashes < 1:
            raise ValueError("consecutive_crashes starts at 1")
        return min(
            self.max_delay_s, self.initial_delay_s * self.factor ** (consecutive_crashes - 1)
        )

    def crashes_after(self, previous_crashes: int, uptime_s: float) -> int:
        """The consecutive-crash count after a crash that ended ``uptime_s`` of running."""
        return 1 if uptime_s >= self.stable_after_s else previous_crashes + 1
