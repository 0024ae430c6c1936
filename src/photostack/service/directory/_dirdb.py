"""Failover of the directory's own database, run by every directory node (docs/replication.md).

:class:`DirectoryDatabase` probes every member of the directory database every
``probe_interval_s``, knows which one is the primary (the generation rows, see
:mod:`._dirdb_policy`), tells its node when that changes (``on_primary``: the node's pool and the
coordinator's connections move there) and, when :func:`~._dirdb_policy.decide` says so,
promotes a standby: ``pg_promote()``, then generation + 1 naming it, written on it, then the
other standbys repointed. The old primary is rejoined as a standby by the supervisor's
``RoleKeeper`` (pg_rewind or a fresh base backup), which asks the directory nodes which member
is primary (``GET /v1/directory-db``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from photostack.blocks.storage import ReplicationMode, parse_lsn, synchronous_standby_names

from ._coordinator_replicas import DB_ERRORS, primary_conninfo
from ._dirdb_policy import (
    Decision,
    MemberSample,
    PeerView,
    PrimaryState,
    StandbyState,
    current_primary,
    decide,
    standby_names_change,
    synchronous_standbys,
)
from ._errors import DirectoryError

__all__ = [
    "GENERATION_SCHEMA",
    "DirdbConfig",
    "DirectoryDatabase",
    "FencedError",
    "check_fence",
    "claim_generation",
]

log = logging.getLogger(__name__)

GENERATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS directory_generation (
    id           int PRIMARY KEY CHECK (id = 1),
    generation   bigint NOT NULL,                -- + 1 at every promotion
    primary_name text NOT NULL                   -- the member this generation made primary
);
"""

_PROBE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, asyncpg.InternalClientError)

Fetch = Callable[[str], Awaitable[PeerView | None]]
OnPrimary = Callable[[str, str, int], Awaitable[None]]


class FencedError(DirectoryError):
    """The connection's server is not the directory primary the current generation names."""


async def check_fence(conn: Any, name: str, generation: int) -> None:
    """Raise FencedError unless ``conn``'s server is member ``name`` of ``generation``, a
    primary. Read-only (no row lock: a lock would make the check wait for a synchronous
    standby at commit); generations change only by a promotion, on another server."""
    row = await conn.fetchrow(
        "SELECT generation, primary_name, pg_is_in_recovery() AS rec FROM directory_generation "
        "WHERE id = 1"
    )
    if row is None or row["rec"] or (row["primary_name"], row["generation"]) != (name, generation):
        found = None if row is None else (row["primary_name"], row["generation"])
        raise FencedError(f"not the directory primary {name} of generation {generation}: {found}")


async def claim_generation(conn: Any, name: str) -> None:
    """First start: record that member ``name`` (the topology's primary) is generation 1."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute("SELECT pg_advisory_xact_lock(7071)")  # two nodes start at once
        await conn.execute(GENERATION_SCHEMA)
        await conn.execute(
            "INSERT INTO directory_generation (id, generation, primary_name) VALUES (1, 1, $1) "
            "ON CONFLICT (id) DO NOTHING",
            name,
        )


@dataclass(frozen=True)
class DirdbConfig:
    probe_interval_s: float = 0.25
    probe_timeout_s: float = 0.5
    down_after_s: float = 1.0
    min_promote_interval_s: float = 10.0  # anti-flap: no second promotion by this node before
    promote_timeout_s: int = 5
    standby_after_s: float = 1.0  # no standby streaming this long: asynchronous; and back


class DirectoryDatabase:
    """One directory node's view of the directory database, and its promotions."""

    def __init__(
        self,
        node: str,
        members: Mapping[str, str],
        observers: tuple[str, ...],
        *,
        fetch_view: Fetch,
        on_primary: OnPrimary | None = None,
        config: DirdbConfig | None = None,
    ) -> None:
        self.node = node
        self.members = dict(members)  # member name -> DSN; the topology's primary first
        self.observers = observers or (node,)
        self.fetch_view = fetch_view
        self.on_primary = on_primary
        self.config = config or DirdbConfig()
        self.primary: str | None = None
        self.generation = 0  # the highest generation seen: never go below it (the fence)
        self.samples: list[MemberSample] = []
        self.down_since: float | None = None
        self.sync_standbys: tuple[str, ...] = ()
        self.last: Decision = Decision("none", "not probed yet")
        self.promotions = 0
        self._promoted_at = -1e9
        self._conns: dict[str, asyncpg.Connection[Any]] = {}
        self._previous: PrimaryState | None = None  # the primary's previous sample
        self._previous_of = ""
        self._streaming_since: float | None = None
        self._alone_since: float | None = None

    @property
    def dsn(self) -> str:
        """The DSN of the primary (the topology's primary until one is known)."""
        return self.members[self.primary or next(iter(self.members))]

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.terminate()

    # -- probes --------------------------------------------------------------------------------

    async def _conn(self, name: str) -> asyncpg.Connection[Any]:
        conn = self._conns.get(name)
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                self.members[name],
                timeout=self.config.probe_timeout_s,
                server_settings={"application_name": f"photostack-dirdb-{self.node}"},
            )
            self._conns[name] = conn
        return conn

    async def _sample(self, name: str) -> tuple[MemberSample, PrimaryState | None]:
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                conn = await self._conn(name)
                state = await conn.fetchrow(
                    "SELECT pg_is_in_recovery() AS rec, "
                    "to_regclass('public.directory_generation') IS NOT NULL AS has_table, "
                    "coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), "
                    "'0/0')::text AS lsn, "
                    "(SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiver"
                )
                assert state is not None
                if state["rec"]:
                    return (
                        MemberSample(
                            name,
                            True,
                            in_recovery=True,
                            receive_lsn=parse_lsn(state["lsn"]),
                            streaming=state["receiver"] == "streaming",
                        ),
                        None,
                    )
                has_table = bool(state["has_table"])
                row = None
                if has_table:
                    row = await conn.fetchrow(
                        "SELECT generation, primary_name FROM directory_generation WHERE id = 1"
                    )
                flush, names = await _fetch_two(
                    conn,
                    "SELECT pg_current_wal_flush_lsn()::text, "
                    "current_setting('synchronous_standby_names')",
                )
                rows = await conn.fetch(
                    "SELECT application_name, state, sync_state, "
                    "coalesce(flush_lsn, '0/0')::text AS flush FROM pg_stat_replication"
                )
        except _PROBE_ERRORS as exc:
            log.debug("%s: probe of %s failed: %r", self.node, name, exc)
            dropped = self._conns.pop(name, None)
            if dropped is not None:
                dropped.terminate()
            return MemberSample(name, False), None
        standbys = {
            str(r["application_name"]): StandbyState(
                str(r["state"]), str(r["sync_state"]), parse_lsn(r["flush"])
            )
            for r in rows
        }
        return (
            MemberSample(
                name,
                True,
                generation=None if row is None else int(row["generation"]),
                names=None if row is None else str(row["primary_name"]),
            ),
            PrimaryState(parse_lsn(flush), str(names), standbys),
        )

    async def probe_once(self) -> None:
        """Sample every member; follow a new primary; track how long the primary is down."""
        results = await asyncio.gather(*(self._sample(n) for n in self.members))
        self.samples = [s for s, _ in results]
        found = current_primary(self.samples, self.generation)
        if found is not None:
            name, generation = found
            if (name, generation) != (self.primary, self.generation):
                self.primary, self.generation = name, generation
                log.warning("%s: directory primary %s (generation %d)", self.node, *found)
                if self.on_primary is not None:
                    await self.on_primary(name, self.members[name], generation)
            self.down_since = None
            state = dict(zip(self.members, (p for _, p in results), strict=True))[name]
            if state is not None:
                previous = self._previous if self._previous_of == name else None
                self.sync_standbys = synchronous_standbys(previous, state)
                self._previous, self._previous_of = state, name
                await self._keep_standby_names(name, state)
            return
        reachable = any(s.reachable for s in self.samples if s.name == self.primary)
        if self.primary is not None and not reachable and self.down_since is None:
            self.down_since = time.monotonic()

    async def _keep_standby_names(self, primary: str, state: PrimaryState) -> None:
        """Degrade the primary to asynchronous commits when no standby streams, back to
        synchronous once one does (:func:`~._dirdb_policy.standby_names_change`)."""
        now = time.monotonic()
        streaming = any(
            n in self.members and s.state == "streaming" for n, s in state.standbys.items()
        )
        if streaming:
            self._alone_since = None
            self._streaming_since = self._streaming_since or now
        else:
            self._streaming_since = None
            self._alone_since = self._alone_since or now
        wanted = synchronous_standby_names(
            ReplicationMode.SYNC, [n for n in self.members if n != primary]
        )
        change = standby_names_change(
            state,
            wanted,
            0.0 if self._streaming_since is None else now - self._streaming_since,
            0.0 if self._alone_since is None else now - self._alone_since,
            self.config.standby_after_s,
        )
        if change is not None:
            await self._set_standby_names(primary, change)

    async def _set_standby_names(self, member: str, value: str) -> None:
        log.warning("%s: %s synchronous_standby_names = %r", self.node, member, value)
        with contextlib.suppress(*_PROBE_ERRORS):
            conn = await asyncpg.connect(self.members[member], timeout=2.0)
            try:
                await conn.execute(
                    f"ALTER SYSTEM SET synchronous_standby_names = {_literal(value)}"
                )
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                conn.terminate()

    def view(self) -> PeerView | None:
        if self.primary is None:
            return None
        down = None if self.down_since is None else time.monotonic() - self.down_since
        return PeerView(self.node, self.primary, self.generation, down, self.sync_standbys)

    def status(self) -> dict[str, Any]:
        """``GET /v1/directory-db``: the view, the members, the last decision."""
        view = self.view()
        return {
            "node": self.node,
            "primary": self.primary,
            "generation": self.generation,
            "view": None if view is None else asdict(view),
            "members": [asdict(s) for s in self.samples],
            "decision": asdict(self.last),
            "promotions": self.promotions,
        }

    # -- decisions and promotion ---------------------------------------------------------------

    async def round(self) -> Decision:
        await self.probe_once()
        mine = self.view()
        if mine is None or mine.down_for_s is None:
            self.last = Decision("none", "the primary is up" if mine else "no primary known")
            return self.last
        views: dict[str, PeerView | None] = {self.node: mine}
        others = [o for o in self.observers if o != self.node]
        answers = await asyncio.gather(*(self._fetch(o) for o in others))
        views.update(zip(others, answers, strict=True))
        decision = decide(self.node, self.observers, views, self.samples, self.config.down_after_s)
        since = time.monotonic() - self._promoted_at
        if decision.action == "promote" and since < self.config.min_promote_interval_s:
            decision = Decision("wait", f"promoted {since:.1f}s ago", decision.candidate)
        if decision.action == "promote" and decision.candidate is not None:
            await self.promote(decision.candidate)
        self.last = decision
        return decision

    async def _fetch(self, observer: str) -> PeerView | None:
        with contextlib.suppress(Exception):
            return await asyncio.wait_for(self.fetch_view(observer), self.config.probe_timeout_s)
        return None

    async def promote(self, candidate: str) -> None:
        """Promote ``candidate``, write the next generation on it, repoint the other standbys."""
        old, generation = self.primary, self.generation
        self._promoted_at = time.monotonic()
        log.warning("%s: promoting %s (directory primary %s is down)", self.node, candidate, old)
        conn = await asyncpg.connect(self.members[candidate], timeout=2.0)
        try:
            if await conn.fetchval("SELECT pg_is_in_recovery()"):
                done = await conn.fetchval(
                    "SELECT pg_promote(true, $1)", self.config.promote_timeout_s
                )
                if not done:
                    raise FencedError(f"{candidate} did not leave recovery in time")
            async with conn.transaction():
                # no standby streams from it yet: do not wait for one
                await conn.execute("SET LOCAL synchronous_commit = local")
                await conn.execute(GENERATION_SCHEMA)
                await conn.execute(
                    "INSERT INTO directory_generation (id, generation, primary_name) "
                    "VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE SET generation = "
                    "excluded.generation, primary_name = excluded.primary_name "
                    "WHERE directory_generation.generation < excluded.generation",
                    generation + 1,
                    candidate,
                )
            # nothing streams from it yet: commits must not wait (and it cannot be failed over
            # until a standby streams synchronously again, see decide)
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            conn.terminate()
        self.promotions += 1
        for name in self.members:
            if name not in (candidate, old):
                await self._repoint(name, candidate)
        await self.probe_once()

    async def _repoint(self, standby: str, primary: str) -> None:
        info = primary_conninfo(standby, self.members[primary])
        with contextlib.suppress(*_PROBE_ERRORS):
            conn = await asyncpg.connect(self.members[standby], timeout=2.0)
            try:
                await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_literal(info)}")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                conn.terminate()

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception:
                log.exception("%s: directory database round failed", self.node)
            await asyncio.sleep(self.config.probe_interval_s)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def _fetch_two(conn: asyncpg.Connection[Any], query: str) -> tuple[Any, Any]:
    row = await conn.fetchrow(query)
    assert row is not None
    return row[0], row[1]
