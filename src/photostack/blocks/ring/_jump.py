"""Jump consistent hash (Lamping & Veach, 2014): no memory, perfect balance, buckets 0..n-1.

The trade-off: nodes are numbered, so only the *last* bucket can leave without moving keys
between the others; no weights; no natural replica order. Here for comparison with the ring.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import EmptyRingError, RingConfigError, UnknownNodeError
from ._hashing import xxh3_key_hash

__all__ = ["JumpHash", "jump_hash"]

_MASK64 = (1 << 64) - 1
_LCG_MULTIPLIER = 2862933555777941757


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in ``0..buckets-1`` of a 64-bit ``key``, as in the paper's reference code.

    Raises RingConfigError for ``buckets < 1``.
    """
    if buckets < 1:
        raise RingConfigError(f"buckets must be >= 1, got {buckets}")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _LCG_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


class JumpHash:
    """Named nodes over :func:`jump_hash`; a node's bucket is its position in the list."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: Iterable[str] = ()) -> None:
        self._nodes: list[str] = []
        for name in nodes:
            self.add(name)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def node_for(self, key: str | bytes) -> str:
        """Raises EmptyRingError."""
        if not self._nodes:
            raise EmptyRingError("no node")
        return self._nodes[jump_hash(xxh3_key_hash(key), len(self._nodes))]

    def add(self, name: str) -> None:
        """Append a bucket: about 1/(n+1) of the keys move to it, none between the others."""
        if name in self._nodes:
            raise RingConfigError(f"node {name!r} already present")
        self._nodes.append(name)

    def remove(self, name: str) -> None:
        """Remove the last bucket. Raises UnknownNodeError, or RingConfigError for another one
        (removing a middle bucket would renumber and move keys between survivors)."""
        if name not in self._nodes:
            raise UnknownNodeError(f"node {name!r} is not present")
        if name != self._nodes[-1]:
            raise RingConfigError(f"jump hash can only remove the last node ({self._nodes[-1]!r})")
        self._nodes.pop()

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"JumpHash(nodes={len(self._nodes)})"
