"""The ring block's errors: one root, families by cause."""

from __future__ import annotations

__all__ = [
    "DuplicateNodeError",
    "EmptyRingError",
    "NotEnoughNodesError",
    "RingConfigError",
    "RingError",
    "UnknownNodeError",
]


class RingError(Exception):
    """Root of every error raised by the ring block."""


class RingConfigError(RingError, ValueError):
    """A bad parameter: vnode count, weight, hash name, bucket count."""


class EmptyRingError(RingError, LookupError):
    """A lookup on a ring (or table) that has no node."""


class NotEnoughNodesError(RingError, ValueError):
    """``nodes_for(key, n)`` asked for more distinct nodes than the ring has."""


class UnknownNodeError(RingError, KeyError):
    """Removing (or weighting) a node the ring does not hold."""


class DuplicateNodeError(RingError, ValueError):
    """Adding a node the ring already holds."""
