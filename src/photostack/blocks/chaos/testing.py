"""Fakes for code that uses the chaos block: a scripted randomness source and a command recorder
standing in for ``ip`` (so namespace logic is testable without root)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from photostack.blocks.chaos._errors import NetnsError

__all__ = ["RecordingRunner", "ScriptedRandom"]


class ScriptedRandom:
    """Returns the given values in turn (then repeats the last); for latency jitter."""

    def __init__(self, values: Iterable[float]) -> None:
        self._values = list(values)
        if not self._values or not all(0 <= v < 1 for v in self._values):
            raise ValueError("values must be a non-empty list of floats in [0, 1)")
        self._at = 0

    def __call__(self) -> float:
        value = self._values[min(self._at, len(self._values) - 1)]
        self._at += 1
        return value


class RecordingRunner:
    """Records every command instead of running it; fails commands that contain ``fail_on``."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: Sequence[str]) -> None:
        self.commands.append(list(argv))
        if self.fail_on is not None and self.fail_on in argv:
            raise NetnsError(f"{' '.join(argv)}: scripted failure")
