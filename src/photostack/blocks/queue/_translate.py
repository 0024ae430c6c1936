"""Driver exceptions become QueueUnavailable at the engine boundary (one place, one rule)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiormq
import asyncpg

from photostack.blocks.queue._errors import QueueUnavailable

__all__ = ["DRIVER_ERRORS", "translated"]

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
    asyncio.TimeoutError,
)


@contextlib.asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Re-raise a driver or network failure inside the block as QueueUnavailable."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise QueueUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
