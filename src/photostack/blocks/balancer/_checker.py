"""Active health checks: one asyncio task per backend feeding the pool's state machine.

Each check is a fresh connection (a pooled one would test the pool, not the backend's accept
queue): ``GET path``, 2xx within the timeout passes. The answer may carry the backend's weight
in a header (``ActiveCheckConfig.weight_header``). Checks are spread by jitter so a fleet of
checkers does not beat in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable

from photostack.blocks.balancer._health import ActiveCheckConfig, Backend

__all__ = ["CheckResult", "HealthChecker", "check_once"]

log = logging.getLogger("photostack.balancer.checks")

CheckResult = tuple[bool, float | None]  # passed, reported weight
Report = Callable[[str, bool, float | None], None]


async def check_once(backend: Backend, config: ActiveCheckConfig) -> CheckResult:
    """One check of ``backend``: (passed, the weight it reported or None). Never raises."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(config.timeout_s):
            reader, writer = await asyncio.open_connection(backend.host, backend.port)
            writer.write(
                f"GET {config.path} HTTP/1.1\r\nHost: {backend.host}:{backend.port}\r\n"
                "User-Agent: photostack-health\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            status_line = await reader.readline()
            weight: float | None = None
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == config.weight_header:
                    weight = _weight(value.strip())
    except (OSError, TimeoutError, ValueError):
        return False, None
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split()
    passed = len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 300
    return passed, weight if passed else None


def _weight(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


class HealthChecker:
    """Runs ``check_once`` for each watched backend every interval and reports the result."""

    def __init__(
        self, config: ActiveCheckConfig, report: Report, *, rng: random.Random | None = None
    ) -> None:
        self._config = config
        self._report = report
        self._rng = rng or random.Random()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<HealthChecker {sorted(self._tasks)}>"

    def watch(self, backend: Backend) -> None:
        """Start checking ``backend`` (a no-op if it is watched already)."""
        if backend.name not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._run(backend))
            self._tasks[backend.name] = task

    def unwatch(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def _delay_s(self) -> float:
        jitter = self._config.jitter_fraction
        return self._config.interval_s * (1.0 + self._rng.uniform(-jitter, jitter))

    async def _run(self, backend: Backend) -> None:
        # Start at a random point of the first interval, so checks of many backends spread out.
        await asyncio.sleep(self._rng.uniform(0, self._config.interval_s * 0.5))
        while True:
            passed, weight = await check_once(backend, self._config)
            try:
                self._report(backend.name, passed, weight)
            except Exception:  # a bug in the report must not stop the checks
                log.exception("health check report failed for %s", backend.name)
            await asyncio.sleep(self._delay_s())  # the check interval is the point of this wait

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
