"""Slow start: the share of a new or recovered backend ramps up over a window. Pure."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SlowStart"]


@dataclass(frozen=True)
class SlowStart:
    """``fraction(elapsed)`` = max(floor, (elapsed / window) ** curve), 1.0 after the window.

    ``curve`` 1.0 is linear; above 1 it starts gentler (Envoy calls it aggression, inverted).
    ``window_s`` 0 turns slow start off. The floor keeps a ramping backend reachable at all.
    """

    window_s: float = 10.0
    curve: float = 1.0
    floor: float = 0.05

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.curve <= 0 or not 0 < self.floor <= 1:
            raise ValueError(f"bad slow start {self}")

    def fraction(self, elapsed_s: float) -> float:
        if self.window_s == 0 or elapsed_s >= self.window_s:
            return 1.0
        x = max(0.0, elapsed_s) / self.window_s
        return max(self.floor, float(x**self.curve))
