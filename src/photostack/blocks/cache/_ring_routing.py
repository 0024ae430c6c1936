"""Pure decisions of the distributed cache client: node health states and where a key goes.

No I/O: the client (``_ring_client``) feeds it what it observed (an operation failed, a probe
answered) and asks it which node serves a key. Placement is :class:`HashRing` over every
configured node, whatever its health, so a node that fails moves only its own keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from photostack.blocks.cache._errors import CacheError
from photostack.blocks.ring import HashRing

__all__ = [
    "TRANSITIONS",
    "FailureMode",
    "IllegalTransitionError",
    "NodeHealth",
    "NodeState",
    "Route",
    "invalidation_targets",
    "parse_failure_mode",
    "route",
]


class FailureMode(StrEnum):
    """What happens to a down node's keys."""

    REMAP = "remap"  # served by the next up node clockwise on the ring
    FAIL_CLOSED = "fail-closed"  # not cached while the node is down: reads go to the database


def parse_failure_mode(text: str) -> FailureMode:
    """Raises ValueError naming the allowed values."""
    try:
        return FailureMode(text)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in FailureMode)
        raise ValueError(f"failure mode must be one of {allowed}, not {text!r}") from None


class NodeState(StrEnum):
    UP = "up"  # gets its keys
    DOWN = "down"  # an operation failed: no keys until a probe answers
    PROBING = "probing"  # a probe is in flight (PING, then the epoch bump)


class IllegalTransitionError(CacheError):
    """A node health transition the table does not allow (a bug in the caller)."""


# (from, to) pairs that are allowed; anything else is a bug.
TRANSITIONS: frozenset[tuple[NodeState, NodeState]] = frozenset(
    {
        (NodeState.UP, NodeState.DOWN),  # an operation failed
        (NodeState.DOWN, NodeState.PROBING),  # the prober picked it
        (NodeState.PROBING, NodeState.UP),  # PING answered and the epoch was bumped
        (NodeState.PROBING, NodeState.DOWN),  # the probe failed
    }
)


@dataclass
class NodeHealth:
    """One node's health as this client sees it, with the epoch it tags writes with."""

    name: str
    mode: FailureMode
    state: NodeState = NodeState.UP
    epoch: int = 0  # the node's epoch as last read (values tagged otherwise are ignored)
    failures: int = 0  # UP -> DOWN transitions so far
    rejoins: int = 0  # PROBING -> UP transitions so far

    def to(self, state: NodeState) -> None:
        """Raises IllegalTransitionError. UP -> DOWN when already DOWN is a no-op caller-side."""
        if (self.state, state) not in TRANSITIONS:
            raise IllegalTransitionError(f"{self.name}: {self.state} -> {state}")
        if state is NodeState.DOWN and self.state is NodeState.UP:
            self.failures += 1
        if state is NodeState.UP:
            self.rejoins += 1
        self.state = state

    def fail(self) -> bool:
        """An operation on this node failed. True when that took it down (it was up)."""
        if self.state is NodeState.UP:
            self.to(NodeState.DOWN)
            return True
        return False

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP


@dataclass(frozen=True, slots=True)
class Route:
    """Where a key's operation goes. ``node`` None: nowhere (fail closed, or every node down).
    ``remapped``: not its owner (the owner is down and remaps)."""

    owner: str
    node: str | None
    remapped: bool


def route(ring: HashRing, health: Mapping[str, NodeHealth], key: str) -> Route:
    """The node that serves ``key`` now: its owner when up; when the owner is down, the next
    up node clockwise if the owner remaps, else none."""
    owner = ring.node_for(key)
    state = health[owner]
    if state.up:
        return Route(owner, owner, False)
    if state.mode is FailureMode.FAIL_CLOSED:
        return Route(owner, None, False)
    for name in ring.walk(key):
        if health[name].up:
            return Route(owner, name, True)
    return Route(owner, None, False)


def invalidation_targets(ring: HashRing, health: Mapping[str, NodeHealth], key: str) -> list[str]:
    """Up nodes that may hold ``key``: its owner and the owner's first successor (where the key
    lived while the owner was down and remapped)."""
    names = ring.nodes_for(key, min(2, len(ring)))
    return [n for n in names if health[n].up]
