"""Backend choice strategies: pure functions of the candidates, a key and injected randomness.

Every strategy sees the same ``Candidate`` view: the backends that may be chosen now, each with
its effective ``weight`` (configured or reported weight times slow-start share), its slow-start
``share`` and its requests ``in_flight``. Slow start therefore applies to every strategy: the
weighted ones through ``weight``; hash affinity through a per-key gate (a ramping backend takes
a key only if the key's hash fraction for it is below its share, so a growing, stable subset of
its keys moves to it).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from photostack.blocks.balancer._ring import unit_fraction
from photostack.blocks.ring import HashRing

__all__ = [
    "BoundedHash",
    "Candidate",
    "LeastConnections",
    "PowerOfTwo",
    "RandomChoice",
    "RoundRobin",
    "Strategy",
    "StrategyName",
    "WeightedRandom",
    "bounded_load_cap",
    "make_strategy",
]


@dataclass(slots=True, unsafe_hash=True)
class Candidate:
    """One backend as a strategy sees it; a value (do not mutate). Not ``frozen``: one is
    built per backend per request, and a frozen dataclass costs ~4x to construct."""

    name: str
    weight: float  # configured or reported weight times share
    share: float  # slow-start fraction in (0, 1]
    in_flight: int


class StrategyName(enum.StrEnum):
    RANDOM = "random"
    ROUND_ROBIN = "round-robin"
    WEIGHTED_RANDOM = "weighted-random"
    LEAST_CONNECTIONS = "least-connections"
    POWER_OF_TWO = "power-of-two"
    HASH = "hash"


class Strategy(Protocol):
    name: StrategyName

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        """One of ``candidates`` (never empty)."""
        ...

    def members_changed(self, weights: Mapping[str, float]) -> None:
        """The pool's members (all of them, healthy or not) and their weights changed."""
        ...


class _Stateless:
    def members_changed(self, weights: Mapping[str, float]) -> None:
        return None


class RandomChoice(_Stateless):
    """Uniform over the candidates, scaled only by slow start."""

    name = StrategyName.RANDOM

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        if all(c.share == 1.0 for c in candidates):
            return candidates[self._rng.randrange(len(candidates))].name
        return self._rng.choices(candidates, weights=[c.share for c in candidates])[0].name


class WeightedRandom(_Stateless):
    """Proportional to effective weight."""

    name = StrategyName.WEIGHTED_RANDOM

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        return self._rng.choices(candidates, weights=[c.weight for c in candidates])[0].name


class RoundRobin(_Stateless):
    """Smooth weighted round-robin (nginx's): with equal weights, strict rotation.

    Over any run of picks each candidate's count is within one of its weight share, and a
    ramping backend gets its slow-start share exactly, without bursts.
    """

    name = StrategyName.ROUND_ROBIN

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        current = self._current
        total = 0.0
        best: Candidate | None = None
        best_value = -math.inf
        for c in candidates:
            value = current.get(c.name, 0.0) + c.weight
            current[c.name] = value
            total += c.weight
            if value > best_value:
                best, best_value = c, value
        assert best is not None
        current[best.name] = best_value - total
        return best.name

    def members_changed(self, weights: Mapping[str, float]) -> None:
        self._current = {name: v for name, v in self._current.items() if name in weights}


class LeastConnections(_Stateless):
    """Fewest requests in flight per unit of weight; ties broken at random."""

    name = StrategyName.LEAST_CONNECTIONS

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        best: list[Candidate] = []
        best_score = math.inf
        for c in candidates:
            score = (c.in_flight + 1) / c.weight
            if score < best_score:
                best, best_score = [c], score
            elif score == best_score:
                best.append(c)
        return best[0].name if len(best) == 1 else best[self._rng.randrange(len(best))].name


class PowerOfTwo(_Stateless):
    """Two candidates drawn by weight; the one with fewer in flight per weight wins."""

    name = StrategyName.POWER_OF_TWO

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        if len(candidates) == 1:
            return candidates[0].name
        weights = [c.weight for c in candidates]
        first = self._rng.choices(range(len(candidates)), weights=weights)[0]
        weights[first] = 0.0
        if sum(weights) <= 0:
            return candidates[first].name
        second = self._rng.choices(range(len(candidates)), weights=weights)[0]
        a, b = candidates[first], candidates[second]
        return a.name if (a.in_flight + 1) / a.weight <= (b.in_flight + 1) / b.weight else b.name


def bounded_load_cap(total_in_flight: int, candidates: int, epsilon: float) -> int:
    """Most requests one backend may hold once this one is placed: ceil((1+ε)·mean)."""
    return math.ceil((1.0 + epsilon) * (total_in_flight + 1) / candidates)


class BoundedHash:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

    A key goes to the first backend clockwise from it on the ring that is a candidate, holds
    fewer than ``bounded_load_cap`` requests, and (while it ramps) admits the key by its slow-start
    gate. Requests without a key are placed as if their key were empty.
    """

    name = StrategyName.HASH

    def __init__(self, *, epsilon: float = 0.25, vnodes: int = 160) -> None:
        if epsilon <= 0:
            raise ValueError("epsilon must be positive")
        self.epsilon = epsilon
        self._vnodes = vnodes
        self._ring: HashRing | None = None

    def members_changed(self, weights: Mapping[str, float]) -> None:
        self._ring = HashRing(weights, vnodes=self._vnodes) if weights else None

    def choose(self, candidates: Sequence[Candidate], key: bytes | None) -> str:
        by_name = {c.name: c for c in candidates}
        total = sum(c.in_flight for c in candidates)
        cap = bounded_load_cap(total, len(candidates), self.epsilon)
        data = key or b""
        fallback: Candidate | None = None
        for name in self._ring.walk(data) if self._ring is not None else ():
            c = by_name.get(name)
            if c is None or c.in_flight + 1 > cap:
                continue
            if c.share < 1.0 and unit_fraction(data, name) >= c.share:
                fallback = fallback or c
                continue
            return name
        if fallback is not None:
            return fallback.name
        # Not on the ring yet, or everyone full (impossible by the cap's arithmetic): least loaded.
        return min(candidates, key=lambda c: c.in_flight).name


def make_strategy(
    name: str | StrategyName,
    *,
    rng: random.Random | None = None,
    hash_epsilon: float = 0.25,
) -> Strategy:
    """A strategy by name. Raises ValueError for an unknown one."""
    try:
        which = StrategyName(name)
    except ValueError:
        known = ", ".join(s.value for s in StrategyName)
        raise ValueError(f"unknown strategy {name!r} (known: {known})") from None
    rand = rng or random.Random()
    if which is StrategyName.RANDOM:
        return RandomChoice(rand)
    if which is StrategyName.ROUND_ROBIN:
        return RoundRobin()
    if which is StrategyName.WEIGHTED_RANDOM:
        return WeightedRandom(rand)
    if which is StrategyName.LEAST_CONNECTIONS:
        return LeastConnections(rand)
    if which is StrategyName.POWER_OF_TWO:
        return PowerOfTwo(rand)
    return BoundedHash(epsilon=hash_epsilon)
