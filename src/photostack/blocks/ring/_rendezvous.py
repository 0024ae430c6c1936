"""Rendezvous (highest random weight) hashing, weighted.

Every node scores every key; the highest score owns it. Weighted with the logarithmic method
(Schindelhauer & Schomaker): ``score = -weight / ln(u)`` with ``u`` the key's hash under the
node's seed mapped into (0, 1), so a node's expected share is proportional to its weight.
The trade-off: perfect balance in expectation, any node can leave or join with minimal movement,
natural replica order (the top n scores) — but a lookup costs O(nodes) hashes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import xxhash

from ._errors import (
    DuplicateNodeError,
    EmptyRingError,
    NotEnoughNodesError,
    RingConfigError,
    UnknownNodeError,
)
from ._hashing import as_bytes

__all__ = ["RendezvousHash"]

_xxh3 = xxhash.xxh3_64_intdigest
_TWO_64 = float(1 << 64)


class RendezvousHash:
    """Weighted highest-random-weight hashing over named nodes."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: Mapping[str, float]) -> None:
        self._nodes: dict[str, tuple[int, float]] = {}  # name -> (seed, weight)
        for name, weight in nodes.items():
            self.add(name, weight)

    @property
    def nodes(self) -> dict[str, float]:
        return {name: weight for name, (_, weight) in self._nodes.items()}

    def _scores(self, key: str | bytes) -> list[tuple[float, str]]:
        data = as_bytes(key)
        out = []
        for name, (seed, weight) in self._nodes.items():
            u = (_xxh3(data, seed=seed) + 0.5) / _TWO_64  # in (0, 1), never 0 or 1
            out.append((-weight / math.log(u), name))
        return out

    def node_for(self, key: str | bytes) -> str:
        """Raises EmptyRingError."""
        if not self._nodes:
            raise EmptyRingError("no node")
        return max(self._scores(key))[1]

    def nodes_for(self, key: str | bytes, n: int) -> list[str]:
        """The ``n`` highest-scoring nodes, best first. Raises NotEnoughNodesError, ValueError."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > len(self._nodes):
            raise NotEnoughNodesError(f"asked for {n} nodes, there are {len(self._nodes)}")
        return [name for _, name in heapq.nlargest(n, self._scores(key))]

    def add(self, name: str, weight: float = 1.0) -> None:
        """Raises DuplicateNodeError, RingConfigError."""
        if name in self._nodes:
            raise DuplicateNodeError(f"node {name!r} already present")
        if not (math.isfinite(weight) and weight > 0):
            raise RingConfigError(f"weight of {name!r} must be a finite number > 0")
        self._nodes[name] = (_xxh3(name.encode("utf-8")), float(weight))

    def remove(self, name: str) -> None:
        """Raises UnknownNodeError."""
        if name not in self._nodes:
            raise UnknownNodeError(f"node {name!r} is not present")
        del self._nodes[name]

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"RendezvousHash(nodes={len(self._nodes)})"
