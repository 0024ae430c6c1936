"""The cross-shard jobs' leases and saved state, behind the ownership fence.

Job ``name``'s state is one ``job_state`` row keyed by ``name``, on the users shard that owns
``name`` (the users partitioner, like any key), so a users reshard moves it with everything else
(``_reshard_plan.GROUP_TABLES``). Its lease is a session-level advisory lock on that same shard:

- taken only on the name's current owner (the ownership row verified after the lock, retried on
  the refreshed map while a cut-over is in progress);
- every checkpoint (:meth:`Lease.save`, :meth:`Lease.check`) runs on the lease's connection in a
  transaction that verifies ownership first. A reshard's fence deletes the ownership row there,
  so after the cut-over the old holder's next checkpoint raises :class:`LeaseMovedError` and
  writes nothing; the run stops and the next one takes the lease on the new owner, where the
  state moved.

Two holders can therefore overlap only between the fence and the old holder's next checkpoint
(one batch); every write of a batch is itself fenced and idempotent (service/_jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from photostack.blocks.storage import ShardRouter, stable_hash64

from ._fenced import execute
from ._jobs_sql import LOAD_STATE, RELEASE_LEASE, SAVE_STATE, TRY_LEASE
from ._store import DomainError
from .directory import OwnershipGuard, WrongShardError

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "JobBusyError",
    "Lease",
    "LeaseMovedError",
    "current_lease",
    "hold_lease",
    "lease_key",
    "running_under",
]

T = TypeVar("T")


class JobBusyError(DomainError):
    """Another app node holds the job's lease."""


class LeaseMovedError(JobBusyError):
    """A reshard moved the job's name (its lease and state) off the shard the lease is on."""


def lease_key(name: str) -> int:
    """The advisory-lock key of job ``name`` (63 bits, stable across processes)."""
    return stable_hash64(f"photostack-job:{name}") & ((1 << 63) - 1)


class Lease:
    """Job ``name``'s held lease: an advisory lock on ``conn``, a connection to the users shard
    that owned ``name`` when it was taken. The job's state is read and saved on that connection,
    each behind the fence: once a reshard moved ``name`` away, :meth:`load`, :meth:`save` and
    :meth:`check` raise LeaseMovedError (nothing is written there)."""

    def __init__(self, name: str, conn: Any, guard: OwnershipGuard) -> None:
        self.name = name
        self._conn = conn
        self._guard = guard
        self._lock = asyncio.Lock()  # one connection, used by a job's concurrent shard scans

    async def _verified(self, action: Callable[[Any], Awaitable[T]]) -> T:
        async with self._lock, self._conn.transaction():
            try:
                await self._guard.verify(self._conn, "users", self.name)
            except WrongShardError as exc:
                raise LeaseMovedError(self.name) from exc
            return await action(self._conn)

    async def check(self) -> None:
        """Raises LeaseMovedError unless this shard still owns the job's name."""
        await self._verified(_nothing)

    async def load(self) -> dict[str, Any]:
        text = await self._verified(lambda c: c.fetchval(LOAD_STATE, self.name))
        loaded: dict[str, Any] = json.loads(text) if text else {}
        return loaded

    async def save(self, state: dict[str, Any]) -> None:
        await self._verified(execute(SAVE_STATE, self.name, json.dumps(state)))


async def _nothing(conn: Any) -> None:
    return None


@contextlib.asynccontextmanager
async def hold_lease(
    router: ShardRouter[Pool], guard: OwnershipGuard, name: str
) -> AsyncIterator[Lease]:
    """Hold job ``name``'s lease for the block, on the users shard owning ``name``.

    Raises JobBusyError (another node holds it), WrongShardError (a cut-over longer than the
    guard's wait), and storage errors."""
    key = lease_key(name)

    async def take() -> tuple[contextlib.AsyncExitStack, Any]:
        held = contextlib.AsyncExitStack()  # unwinds: unlock, then the connection back
        try:
            conn = await held.enter_async_context(router.shard_for("users", name).acquire())
            if not await conn.fetchval(TRY_LEASE, key):
                raise JobBusyError(name)
            held.push_async_callback(conn.fetchval, RELEASE_LEASE, key)
            async with conn.transaction():
                await guard.verify(conn, "users", name)
        except BaseException:
            await held.aclose()
            raise
        return held, conn

    held, conn = await guard.retrying(take)
    async with held:
        yield Lease(name, conn, guard)


# The lease of the job run in progress in this task (and the tasks it starts). Per run, not
# per process: in the window where a reshard moves a job's name, one node can hold that job's
# lease twice (an old one on the old owner until its next checkpoint, and a new one), e.g. a
# runner's run and a `jobs run`; each run checkpoints on its own lease.
_RUN_LEASE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("job_lease", default=None)


@contextlib.contextmanager
def running_under(lease: Lease) -> Iterator[None]:
    """Make ``lease`` this task's :func:`current_lease` for the block."""
    token = _RUN_LEASE.set(lease)
    try:
        yield
    finally:
        _RUN_LEASE.reset(token)


def current_lease(name: str) -> Lease | None:
    """The lease this task's run of job ``name`` holds, if it is running under one."""
    lease = _RUN_LEASE.get()
    return lease if lease is not None and lease.name == name else None
