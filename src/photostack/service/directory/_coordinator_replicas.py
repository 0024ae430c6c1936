"""The leader's care of a shard's standbys: who streams from the primary, and who it waits for.

- :class:`Sample` / :func:`sample_primary` / :func:`sample_replica`: one probe of a node.
- :class:`ReplicaTender`, each leader round, per replicated shard whose primary it confirmed:

  * ``synchronous_standby_names`` of a sync group's primary names exactly the shard's replicas in
    the map (never the primary itself, never a node of another shard): after a promotion the new
    primary waits for the standbys that can attach to it, not for its own name or a dead one.
    An ``ap`` group with no standby streaming commits alone (degraded) until one streams;
  * every replica the primary does not list in ``pg_stat_replication`` is judged by
    :class:`~._replica_policy.ReplicaWatch`: repointed (``primary_conninfo`` + reload; Postgres
    restarts its WAL receiver, which follows the new timeline: ``recovery_target_timeline`` is
    ``latest``), or marked for a rebuild (``GET /v1/coordinator`` shows ``action: rebuild``; the
    supervisor replaces its PGDATA with a fresh base backup of the primary).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from photostack.blocks.storage import (
    Consistency,
    ReplicationMode,
    parse_lsn,
    synchronous_standby_names,
)

from ._coordinator_sql import PRIMARY_SAMPLE, REPLICA_SAMPLE
from ._map import Endpoint, PhysicalShard
from ._replica_policy import (
    ReplicaAction,
    ReplicaPolicy,
    ReplicaWatch,
    conninfo_address,
    dsn_address,
)

__all__ = [
    "DB_ERRORS",
    "ReplicaTender",
    "Sample",
    "primary_conninfo",
    "sample_primary",
    "sample_replica",
    "sync_names",
]

log = logging.getLogger("photostack.service.directory._coordinator")

DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # asyncpg's answer when a killed server ends the session in the middle of a statement; not
    # an InterfaceError: left out, it ended both coordinators' loops at a primary's SIGKILL
    asyncpg.InternalClientError,
)

Runner = Callable[[str, Callable[["asyncpg.Connection[Any]"], Awaitable[Any]]], Awaitable[Any]]


@dataclass
class Sample:
    ok: bool = False
    in_recovery: bool = False
    lsn: int | None = None
    receive_lsn: int | None = None
    replay_lsn: int | None = None
    receiver: str | None = None
    conninfo: str = ""  # a replica's primary_conninfo
    standbys: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def _lsn(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


def _error(exc: BaseException) -> Sample:
    return Sample(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


async def sample_primary(on: Runner, dsn: str) -> Sample:
    try:
        row = await on(dsn, lambda c: c.fetchrow(PRIMARY_SAMPLE))
    except DB_ERRORS as exc:
        return _error(exc)
    assert row is not None
    return Sample(
        ok=True,
        in_recovery=bool(row["in_recovery"]),
        lsn=_lsn(row["lsn"]),
        standbys=list(json.loads(row["standbys"])),
    )


async def sample_replica(on: Runner, dsn: str) -> Sample:
    try:
        row = await on(dsn, lambda c: c.fetchrow(REPLICA_SAMPLE))
    except DB_ERRORS as exc:
        return _error(exc)
    assert row is not None
    return Sample(
        ok=True,
        in_recovery=bool(row["in_recovery"]),
        receive_lsn=_lsn(row["receive_lsn"]),
        replay_lsn=_lsn(row["replay_lsn"]),
        receiver=row["receiver"],
        conninfo=row["conninfo"] or "",
    )


def sync_names(shard: PhysicalShard) -> str:
    """The ``synchronous_standby_names`` a sync shard's primary should have: its replicas."""
    return synchronous_standby_names(ReplicationMode.SYNC, [r.name for r in shard.replicas])


def primary_conninfo(name: str, primary_dsn: str) -> str:
    """The ``primary_conninfo`` of replica ``name`` streaming from ``primary_dsn``: its
    ``application_name`` is its node name, which ``synchronous_standby_names`` lists."""
    address = dsn_address(primary_dsn)
    if address is None:
        raise ValueError(f"no host in {primary_dsn!r}")
    host, port = address
    return f"host={host} port={port} user=postgres application_name={name}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class ReplicaTender:
    """The leader's per-replica watches and the actions they decide (see the module)."""

    def __init__(
        self,
        coordinator: str,
        on: Runner,
        policy: ReplicaPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordinator = coordinator
        self._on = on
        self.policy = policy or ReplicaPolicy()
        self._clock = clock
        self.watches: dict[str, ReplicaWatch] = {}
        self.actions: dict[str, ReplicaAction] = {}  # replica -> the last decision (state)
        self.repoints = 0

    def reset(self) -> None:
        """A new leader term: judge afresh."""
        self.watches.clear()
        self.actions.clear()

    def action(self, name: str) -> str:
        return self.actions.get(name, ReplicaAction.KEEP).value

    async def tend(
        self,
        shard: PhysicalShard,
        primary: Sample,
        replicas: Sequence[Sample],
        *,
        mode: ReplicationMode,
        consistency: Consistency,
    ) -> None:
        """One round for ``shard`` (its primary confirmed up or not: see the module)."""
        confirmed = primary.ok and not primary.in_recovery
        attached = {str(s.get("name")) for s in primary.standbys} if confirmed else set()
        now = self._clock()
        for replica, sample in zip(shard.replicas, replicas, strict=True):
            watch = self.watches.get(replica.name)
            if watch is None:
                watch = self.watches[replica.name] = ReplicaWatch(replica.name, self.policy)
            judged = confirmed and sample.ok and sample.in_recovery
            watch.observe(judged=judged, attached=replica.name in attached, now=now)
            action = watch.decide(now, points_at_primary=_points_at(sample, shard.primary))
            if action is ReplicaAction.REBUILD and sample.receiver == "streaming":
                action = ReplicaAction.KEEP  # streams from somewhere: not ours to destroy
            if action is ReplicaAction.REPOINT:
                if await self.repoint(replica, shard.primary.dsn):
                    watch.repointed(now)
            elif action is ReplicaAction.REBUILD and self.actions.get(replica.name) != action:
                log.error(
                    "%s: %s does not stream from %s although it points at it: rebuild it",
                    self.coordinator,
                    replica.name,
                    shard.primary.name,
                )
            self.actions[replica.name] = action
        if confirmed and mode.synchronous:
            streaming = any(s.get("state") == "streaming" for s in primary.standbys)
            degraded = consistency is Consistency.AP and not streaming
            await self.set_sync_names(shard.primary, "" if degraded else sync_names(shard))

    async def cascade(
        self, candidate: Endpoint, others: Sequence[Endpoint], *, deadline_s: float
    ) -> None:
        """Stream ``others`` from ``candidate`` (still a standby), then wait (up to
        ``deadline_s``) until the candidate has received at least what each of them has, so
        that none is ahead of the timeline the candidate's promotion starts. Unreachable ones
        are skipped (``tend`` repoints or flags them later)."""
        await asyncio.gather(*(self.repoint(r, candidate.dsn) for r in others))
        end = self._clock() + deadline_s
        while others:
            samples = await asyncio.gather(
                *(sample_replica(self._on, r.dsn) for r in (candidate, *others))
            )
            mine, theirs = samples[0], samples[1:]
            ahead = [
                s.receive_lsn
                for s in theirs
                if s.ok and s.receive_lsn is not None and s.receive_lsn > (mine.receive_lsn or 0)
            ]
            if not ahead or not mine.ok or self._clock() > end:
                return
            await asyncio.sleep(0.02)

    async def repoint(self, replica: Endpoint, primary_dsn: str) -> bool:
        """Stream ``replica`` from ``primary_dsn`` (Postgres reloads primary_conninfo and
        restarts its WAL receiver). True when the setting was applied."""
        conninfo = primary_conninfo(replica.name, primary_dsn)

        async def run(conn: asyncpg.Connection[Any]) -> None:
            await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_literal(conninfo)}")
            await conn.execute("SELECT pg_reload_conf()")

        try:
            await self._on(replica.dsn, run)
        except DB_ERRORS as exc:
            log.warning("%s: could not repoint %s: %r", self.coordinator, replica.name, exc)
            return False
        self.repoints += 1
        log.warning("%s: %s now streams from %s", self.coordinator, replica.name, conninfo)
        return True

    async def set_sync_names(self, primary: Endpoint, wanted: str) -> bool:
        """``synchronous_standby_names = wanted`` on ``primary`` (reload); True when it holds."""

        async def apply(conn: asyncpg.Connection[Any]) -> None:
            current = await conn.fetchval("SHOW synchronous_standby_names")
            if current != wanted:
                await conn.execute(
                    f"ALTER SYSTEM SET synchronous_standby_names = {_literal(wanted)}"
                )
                await conn.execute("SELECT pg_reload_conf()")
                log.warning("%s: synchronous_standby_names = %r", primary.name, wanted)

        try:
            await self._on(primary.dsn, apply)
        except DB_ERRORS as exc:
            log.warning("%s: sync names of %s not set: %r", self.coordinator, primary.name, exc)
            return False
        return True

    def view(self) -> Mapping[str, str]:
        return {name: action.value for name, action in self.actions.items()}


def _points_at(sample: Sample, primary: Endpoint) -> bool:
    """Does the replica's ``primary_conninfo`` name the map's primary?"""
    return conninfo_address(sample.conninfo) == dsn_address(primary.dsn)
