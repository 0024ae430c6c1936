"""The seam between the supervisor and every engine it runs.

An engine knows how to prepare its on-disk state, which process to spawn and how to tell, through
its own protocol, that the process is ready. The supervisor knows nothing else about it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["Engine", "EngineError", "ProcessSpec"]


class EngineError(Exception):
    """An engine cannot be prepared or started. ``str(exc)`` is a one-line reason for the user."""


@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to spawn one long-running process in the foreground."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's environment
    user: str | None = None  # run as this system user (when the supervisor is root)
    stop_signal: int = signal.SIGTERM  # graceful stop
    stop_timeout_s: float = 10.0  # then SIGKILL


class Engine(Protocol):
    """One node's engine: Postgres, Redis, or one of photostack's own Python nodes."""

    @property
    def name(self) -> str: ...

    def prepare(self) -> None:
        """Create on-disk state if missing (idempotent, blocking). Raises EngineError."""

    def process_spec(self) -> ProcessSpec:
        """The process to spawn once ``prepare`` succeeded."""

    async def probe(self, timeout_s: float) -> bool:
        """One readiness probe in the engine's own protocol. True when ready; never raises."""
