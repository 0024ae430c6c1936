"""The coordinator's loop outlives a failing round (no sockets: the round and the lease are
replaced). A killed primary's session ending mid-statement raises asyncpg's
InternalClientError, which once ended both directory nodes' loops for good."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from photostack.service.directory._coordinator import Coordinator
from photostack.service.directory._coordinator_policy import CoordinatorConfig


def test_rounds_go_on_after_a_round_fails() -> None:
    coordinator = Coordinator(
        "directory-1",
        "postgresql://postgres@127.0.0.1:9/never",
        rules={},
        observers=("directory-1",),
        current_map=lambda: None,
        install=lambda _: None,
        config=CoordinatorConfig(probe_interval_s=0.01, renew_interval_s=0.01),
    )
    failures = [asyncpg.InternalClientError("session ended"), RuntimeError("a bug"), None]
    rounds: list[int] = []
    leases: list[int] = []

    async def step() -> None:
        rounds.append(1)
        failure = failures[min(len(rounds), len(failures)) - 1]
        if failure is not None:
            raise failure

    async def lead() -> None:
        leases.append(1)
        if len(leases) == 1:
            raise RuntimeError("a bug in the lease round")

    async def aclose() -> None:
        return None

    coordinator.step = step  # type: ignore[method-assign]
    coordinator._lead = lead  # type: ignore[method-assign]
    coordinator.aclose = aclose  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(coordinator.run())
        deadline = time.monotonic() + 10
        while len(rounds) < 5 or len(leases) < 3:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
