"""The failover coordinator, run by every directory node; one of them leads at a time.

Every round (``probe_interval_s``) each node probes every primary of a replicated shard and writes
what it saw to ``coordinator_observations``; then it takes or renews the leader lease. The leader:

1. renews each primary's **write lease** (``shard_fence``; the trigger refuses writes without
   one): the coordinator confirms primaries, and a primary it cannot reach stops taking writes by
   itself within ``write_lease_s``;
2. samples every replica (in recovery? received / replayed LSN? WAL receiver streaming?) and, from
   the primary, which standby is synchronous and how far behind each one is;
3. counts votes: each directory node's latest probe, and each replica's WAL receiver. A primary
   is down when a majority of all those observers says so (:mod:`._coordinator_policy`);
4. fails over (:class:`ShardWatch` decides): waits until the old primary's write lease lapsed,
   ``pg_promote()`` on the chosen replica, gives it the next epoch's fence, publishes the next
   map version (the shard's primary and epoch changed) under the leader lease, points the other
   replicas at the new primary, and records the failover.

``photostack failover SHARD`` (a planned switchover) revokes the primary's lease first, waits for
the candidate to replay everything, then does 4: no write is lost even in an async group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from photostack.blocks.storage import Consistency, ReplicationMode, parse_lsn

from ._coordinator_policy import (
    Candidate,
    CoordinatorConfig,
    DecisionKind,
    ShardPhase,
    ShardWatch,
    Tally,
    Vote,
    choose_candidate,
    tally,
)
from ._coordinator_sql import (
    ACQUIRE_LEASE,
    DIRECTORY_COORDINATOR_SCHEMA,
    FENCE_FUNCTION,
    FENCE_SCHEMA,
    FENCE_TRIGGER,
    LEASE_HELD,
    MISSING_TRIGGERS,
    PRIMARY_SAMPLE,
    RENEW_FENCE,
    REPLICA_SAMPLE,
    REVOKE_FENCE,
    SET_FENCE,
    WRITING_BACKENDS,
)
from ._errors import DirectoryError
from ._map import ClusterMap, PhysicalShard
from ._mapstore import MapStore

__all__ = ["Coordinator", "FailoverError", "GroupRule", "shard_name"]

log = logging.getLogger(__name__)

_DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
_TRIGGER_CHECK_EVERY_S = 5.0


class FailoverError(DirectoryError):
    """A failover could not be run (unknown shard, not the leader, no candidate...)."""


_FAILOVER_ERRORS: tuple[type[Exception], ...] = (*_DB_ERRORS, FailoverError)


def shard_name(group: str, shard: PhysicalShard) -> str:
    """``users-1``: the group and the 1-based shard number (as node names have them)."""
    return f"{group}-{shard.index + 1}"


@dataclass(frozen=True)
class GroupRule:
    mode: ReplicationMode = ReplicationMode.ASYNC
    consistency: Consistency = Consistency.CP
    max_replica_lag_s: float = 0.0

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GroupRule:
        return cls(
            ReplicationMode(raw.get("replication", "async")),
            Consistency(raw.get("consistency", "cp")),
            float(raw.get("max_replica_lag_s", 0.0)),
        )


@dataclass
class _Sample:
    ok: bool = False
    in_recovery: bool = False
    lsn: int | None = None
    receive_lsn: int | None = None
    replay_lsn: int | None = None
    receiver: str | None = None
    standbys: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def _lsn(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


class Coordinator:
    """One directory node's share of failure detection, and the leader's failovers."""

    def __init__(
        self,
        name: str,
        directory_dsn: str,
        *,
        rules: Mapping[str, GroupRule],
        observers: Sequence[str],
        current_map: Callable[[], ClusterMap | None],
        install: Callable[[ClusterMap], None],
        config: CoordinatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        # The lease holder: this process, not just this node (a restarted node is a new holder
        # and waits for the old lease to lapse like anyone else).
        self.holder = f"{name}/{os.getpid()}-{secrets.token_hex(3)}"
        self.config = config or CoordinatorConfig()
        self._directory_dsn = directory_dsn
        self.rules = dict(rules)
        self.observers = tuple(observers) or (name,)
        self._current_map = current_map
        self._install = install
        self._clock = clock
        self._conns: dict[str, asyncpg.Connection[Any]] = {}
        self._db: asyncpg.Connection[Any] | None = None
        self._lease_db: asyncpg.Connection[Any] | None = None
        self.term = 0
        self.leader_since: float | None = None
        self._leader_until = 0.0
        self.leader_name = ""
        self.watches: dict[str, ShardWatch] = {}
        self._renew_sent: dict[str, float] = {}  # node -> monotonic time of the last attempt
        self._revoked: set[str] = set()  # primaries whose lease was revoked for a switchover
        self._fenced: dict[str, float] = {}  # node -> when its triggers were last checked
        self._standby_info: dict[str, dict[str, Any]] = {}  # replica -> last primary-side view
        self._replica_samples: dict[str, _Sample] = {}
        self._primary_samples: dict[str, _Sample] = {}
        self._votes: dict[str, dict[str, Any]] = {}
        self._busy: set[str] = set()
        self._refused: dict[str, str] = {}  # shard -> the refusal last logged
        self._schema_ready = False
        self.rounds = 0
        self.failovers_done = 0

    @property
    def is_leader(self) -> bool:
        return self._clock() < self._leader_until

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Rounds forever (cancel to stop); a failed round is logged and the next one runs.

        The leader lease is renewed by its own task on its own connection, so a slow round
        (a primary timing out) never costs the leadership."""
        leasing = asyncio.create_task(self._lease_forever(), name=f"{self.name}-lease")
        try:
            while True:
                started = self._clock()
                try:
                    await self.step()
                except _DB_ERRORS as exc:
                    log.warning("%s: coordinator round failed: %r", self.name, exc)
                except DirectoryError as exc:
                    log.warning("%s: coordinator round: %s", self.name, exc)
                spent = self._clock() - started
                await asyncio.sleep(max(0.01, self.config.probe_interval_s - spent))
        finally:
            leasing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leasing
            await self.aclose()

    async def _lease_forever(self) -> None:
        while True:
            started = self._clock()
            await self._lead()
            spent = self._clock() - started
            await asyncio.sleep(max(0.01, self.config.renew_interval_s - spent))

    async def aclose(self) -> None:
        conns = [*self._conns.values(), *(c for c in (self._db, self._lease_db) if c is not None)]
        self._conns.clear()
        self._db = self._lease_db = None
        for conn in conns:
            conn.terminate()

    async def step(self) -> None:
        """One round: probe, observe, lead (when the lease is ours)."""
        self.rounds += 1
        current = self._current_map()
        if current is None:
            return
        shards = self._replicated(current)
        probes = await asyncio.gather(
            *(self._sample_primary(shard.primary.dsn) for _, shard in shards)
        )
        for (_, shard), probe in zip(shards, probes, strict=True):
            self._primary_samples[shard.primary.name] = probe
        await self._record_observations(
            {
                shard.primary.name: p.ok and not p.in_recovery
                for (_, shard), p in zip(shards, probes, strict=True)
            }
        )
        if not self.is_leader:
            return
        observations = await self._observations()
        await self._handle_requests(current)
        await asyncio.gather(
            *(
                self._lead_shard(group, shard, probe, observations)
                for (group, shard), probe in zip(shards, probes, strict=True)
            )
        )

    def _replicated(self, current: ClusterMap) -> list[tuple[str, PhysicalShard]]:
        return [
            (name, shard)
            for name, group in current.groups.items()
            if name in self.rules
            for shard in group.shards
            if shard.replicas
        ]

    # -- the directory database ----------------------------------------------------------------

    async def _directory(self) -> asyncpg.Connection[Any]:
        if self._db is None or self._db.is_closed():
            self._db = await asyncpg.connect(
                self._directory_dsn,
                timeout=self.config.probe_timeout_s * 2,
                server_settings={
                    "application_name": f"photostack-coordinator-{self.name}",
                    "statement_timeout": "1000",
                    "synchronous_commit": "off",
                },
            )
        if not self._schema_ready:
            async with self._db.transaction():
                await self._db.execute("SELECT pg_advisory_xact_lock(7070)")
                await self._db.execute(DIRECTORY_COORDINATOR_SCHEMA)
            self._schema_ready = True
        return self._db

    async def _on_directory(self, fn: Callable[[asyncpg.Connection[Any]], Awaitable[Any]]) -> Any:
        try:
            return await fn(await self._directory())
        except _DB_ERRORS:
            if self._db is not None:
                self._db.terminate()
                self._db = None
            raise

    async def _record_observations(self, seen: Mapping[str, bool]) -> None:
        if not seen:
            return
        names, oks = list(seen), list(seen.values())
        with contextlib.suppress(*_DB_ERRORS):
            await self._on_directory(
                lambda db: db.execute(
                    "INSERT INTO coordinator_observations (observer, target, ok, at) "
                    "SELECT $1, t, o, clock_timestamp() FROM unnest($2::text[], $3::bool[]) AS "
                    "x(t, o) ON CONFLICT (observer, target) DO UPDATE "
                    "SET ok = excluded.ok, at = excluded.at",
                    self.name,
                    names,
                    oks,
                )
            )

    async def _observations(self) -> dict[str, dict[str, bool]]:
        """target -> observer -> ok, only observations younger than the max age."""
        rows = await self._on_directory(
            lambda db: db.fetch(
                "SELECT observer, target, ok FROM coordinator_observations "
                "WHERE at > clock_timestamp() - make_interval(secs => $1)",
                self.config.observation_max_age_s,
            )
        )
        out: dict[str, dict[str, bool]] = {}
        for row in rows:
            out.setdefault(row["target"], {})[row["observer"]] = bool(row["ok"])
        return out

    async def _lead(self) -> None:
        sent = self._clock()
        try:
            if self._lease_db is None or self._lease_db.is_closed():
                self._lease_db = await asyncpg.connect(
                    self._directory_dsn,
                    timeout=self.config.probe_timeout_s * 2,
                    server_settings={
                        "application_name": f"photostack-coordinator-{self.name}-lease",
                        "statement_timeout": str(int(self.config.leader_lease_s * 500)),
                    },
                )
                async with self._lease_db.transaction():
                    await self._lease_db.execute("SELECT pg_advisory_xact_lock(7070)")
                    await self._lease_db.execute(DIRECTORY_COORDINATOR_SCHEMA)
            term = await self._lease_db.fetchval(
                ACQUIRE_LEASE, self.holder, self.config.leader_lease_s
            )
        except _DB_ERRORS as exc:
            if self._lease_db is not None:
                self._lease_db.terminate()
                self._lease_db = None
            log.warning("%s: leader lease not renewed: %r", self.name, exc)
            return  # still leader until the local lease runs out
        if term is None:
            if self.is_leader:
                log.warning("%s: lost the coordinator lease", self.name)
            self._leader_until = 0.0
            self.leader_since = None
            with contextlib.suppress(*_DB_ERRORS):
                assert self._lease_db is not None
                self.leader_name = await self._lease_db.fetchval(
                    "SELECT holder FROM coordinator_lease WHERE id = 1"
                )
            return
        if term != self.term or self.leader_since is None:
            log.info("%s leads the coordinator (term %d)", self.name, term)
            self.leader_since = sent
            self.term = int(term)
            self._renew_sent.clear()
            self.watches.clear()
        self._leader_until = sent + self.config.leader_lease_s
        self.leader_name = self.holder

    # -- data shards ---------------------------------------------------------------------------

    async def _conn(self, dsn: str) -> asyncpg.Connection[Any]:
        conn = self._conns.get(dsn)
        if conn is None or conn.is_closed():
            timeout_ms = int(self.config.probe_timeout_s * 1000)
            conn = await asyncpg.connect(
                dsn,
                timeout=self.config.probe_timeout_s,
                server_settings={
                    "application_name": f"photostack-coordinator-{self.name}",
                    "statement_timeout": str(timeout_ms),
                },
            )
            self._conns[dsn] = conn
        return conn

    async def _on(self, dsn: str, fn: Callable[[asyncpg.Connection[Any]], Awaitable[Any]]) -> Any:
        """Run ``fn`` on a connection to ``dsn`` within the probe timeout (dropped on failure)."""
        try:
            async with asyncio.timeout(self.config.probe_timeout_s * 2):
                return await fn(await self._conn(dsn))
        except BaseException:
            conn = self._conns.pop(dsn, None)
            if conn is not None:
                conn.terminate()
            raise

    async def _sample_primary(self, dsn: str) -> _Sample:
        try:
            row = await self._on(dsn, lambda c: c.fetchrow(PRIMARY_SAMPLE))
        except _DB_ERRORS as exc:
            return _Sample(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        assert row is not None
        return _Sample(
            ok=True,
            in_recovery=bool(row["in_recovery"]),
            lsn=_lsn(row["lsn"]),
            standbys=list(json.loads(row["standbys"])),
        )

    async def _sample_replica(self, dsn: str) -> _Sample:
        try:
            row = await self._on(dsn, lambda c: c.fetchrow(REPLICA_SAMPLE))
        except _DB_ERRORS as exc:
            return _Sample(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        assert row is not None
        return _Sample(
            ok=True,
            in_recovery=bool(row["in_recovery"]),
            receive_lsn=_lsn(row["receive_lsn"]),
            replay_lsn=_lsn(row["replay_lsn"]),
            receiver=row["receiver"],
        )

    async def _fence(self, dsn: str, name: str, epoch: int, *, first: bool) -> bool:
        """Give (``first``) or renew the write lease of primary ``name``. True when it holds."""
        lease = self.config.write_lease_s
        self._renew_sent[name] = self._clock()
        deadline = time.time() + lease  # a renewal delivered late never extends past this

        async def run(conn: asyncpg.Connection[Any]) -> Any:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = local")
                if first:
                    await conn.execute(FENCE_SCHEMA)
                    return await conn.fetchval(SET_FENCE, epoch, lease, deadline)
                return await conn.fetchval(RENEW_FENCE, epoch, lease, deadline)

        try:
            try:
                held = await self._on(dsn, run)
            except asyncpg.UndefinedTableError:
                held = None  # the first round after `up`: no fence yet
            if held is None and not first:
                held = await self._on(dsn, lambda c: _first_fence(c, epoch, lease, deadline))
        except _DB_ERRORS as exc:
            (log.warning if first else log.debug)(
                "%s: fence of %s not %s: %r", self.name, name, "set" if first else "renewed", exc
            )
            return False
        if held is None:
            return False
        now = self._clock()
        if now - self._fenced.get(name, -1e9) >= _TRIGGER_CHECK_EVERY_S:
            with contextlib.suppress(*_DB_ERRORS):
                await self._on(dsn, _install_triggers)
                self._fenced[name] = now
        return True

    def _lease_lapsed_at(self, name: str) -> float:
        """When primary ``name``'s write lease has surely expired (monotonic)."""
        since = self.leader_since if self.leader_since is not None else self._clock()
        last = max(self._renew_sent.get(name, since), since)
        return last + self.config.write_lease_s + self.config.fence_margin_s

    async def _lead_shard(
        self,
        group: str,
        shard: PhysicalShard,
        probe: _Sample,
        observations: Mapping[str, Mapping[str, bool]],
    ) -> None:
        key = shard_name(group, shard)
        if key in self._busy:
            return
        watch = self.watches.get(key)
        if watch is None or watch.epoch != shard.epoch:
            # a new epoch (a failover, maybe by another leader): judge it afresh, anti-flap on
            changed = watch is not None
            watch = ShardWatch(
                key,
                self.config,
                epoch=shard.epoch,
                failed_over_at=self._clock() if changed else None,
            )
            self.watches[key] = watch
        rule = self.rules[group]
        replica_samples = await asyncio.gather(
            *(self._sample_replica(r.dsn) for r in shard.replicas)
        )
        for replica, sample in zip(shard.replicas, replica_samples, strict=True):
            self._replica_samples[replica.name] = sample
        if probe.ok and not probe.in_recovery:
            for standby in probe.standbys:
                self._standby_info[str(standby["name"])] = standby
            if shard.primary.name not in self._revoked:
                await self._fence(shard.primary.dsn, shard.primary.name, shard.epoch, first=False)
            if rule.mode.synchronous:
                await self._keep_sync_names(shard, rule, probe)
        counted = self._count(shard, observations, replica_samples)
        self._votes[key] = {"down": counted.down, "up": counted.up, "total": counted.total}
        now = self._clock()
        watch.observe(counted, now)
        decision = watch.decide(
            now, rule.mode, self._candidates(shard), self._lease_lapsed_at(shard.primary.name)
        )
        if decision.kind is DecisionKind.REFUSE:
            self._log_refusal(key, watch.reason)
        if decision.kind is DecisionKind.PROMOTE and decision.candidate is not None:
            current = self._current_map()
            fresh = current.group(group).shards[shard.index] if current is not None else None
            if fresh != shard:  # the map moved during this round (a switchover): next round
                watch.failover_failed("the map changed during the round")
                return
            await self._automatic(group, shard, watch, decision.candidate)

    def _count(
        self,
        shard: PhysicalShard,
        observations: Mapping[str, Mapping[str, bool]],
        replica_samples: Sequence[_Sample],
    ) -> Tally:
        """Votes on the primary: each directory node's fresh probe, each replica's receiver."""
        seen = observations.get(shard.primary.name, {})
        votes = [
            Vote(observer, None if observer not in seen else not seen[observer])
            for observer in self.observers
        ]
        for replica, sample in zip(shard.replicas, replica_samples, strict=True):
            if sample.ok and sample.in_recovery:
                votes.append(Vote(replica.name, sample.receiver != "streaming"))
            else:
                votes.append(Vote(replica.name, None))
        return tally(votes, len(self.observers) + len(shard.replicas))

    def _log_refusal(self, key: str, reason: str) -> None:
        if reason != self._refused.get(key):
            self._refused[key] = reason
            log.warning("%s: %s is down but not failed over: %s", self.name, key, reason)

    async def _automatic(
        self, group: str, shard: PhysicalShard, watch: ShardWatch, candidate: str
    ) -> None:
        key = shard_name(group, shard)
        assert watch.down_since is not None
        down_since = watch.down_since
        self._busy.add(key)
        try:
            await self._fail_over(group, shard, candidate, planned=False)
        except _FAILOVER_ERRORS as exc:
            log.error("%s: failover of %s failed: %r", self.name, key, exc)
            watch.failover_failed(f"failover failed: {exc}")
            await self._record(
                key,
                planned=False,
                from_node=shard.primary.name,
                to_node=None,
                result="failed",
                reason=str(exc),
            )
        else:
            watch.failed_over(self._clock())
            log.warning(
                "%s: %s failed over to %s in %.2fs",
                self.name,
                key,
                candidate,
                self._clock() - down_since,
            )
            await self._amend_last(key, self._clock() - down_since)
        finally:
            self._busy.discard(key)

    def _candidates(self, shard: PhysicalShard) -> list[Candidate]:
        out = []
        for replica in shard.replicas:
            sample = self._replica_samples.get(replica.name, _Sample())
            info = self._standby_info.get(replica.name, {})
            lag = info.get("behind_bytes")
            out.append(
                Candidate(
                    replica.name,
                    reachable=sample.ok,
                    in_recovery=sample.in_recovery,
                    receive_lsn=sample.receive_lsn,
                    replay_lsn=sample.replay_lsn,
                    was_sync=info.get("sync_state") == "sync",
                    lag_bytes=None if lag is None else int(lag),
                )
            )
        return out

    async def _keep_sync_names(self, shard: PhysicalShard, rule: GroupRule, probe: _Sample) -> None:
        """An ``ap`` sync group with no standby streaming commits alone (degraded) rather than
        block every write; it returns to synchronous as soon as a standby streams. ``cp`` groups
        wait for a standby instead."""
        if rule.consistency is not Consistency.AP:
            return
        streaming = any(s.get("state") == "streaming" for s in probe.standbys)
        wanted = "" if not streaming else _sync_names(shard)

        async def apply(conn: asyncpg.Connection[Any]) -> None:
            current = await conn.fetchval("SHOW synchronous_standby_names")
            if current != wanted:
                await conn.execute(
                    f"ALTER SYSTEM SET synchronous_standby_names = {_literal(wanted)}"
                )
                await conn.execute("SELECT pg_reload_conf()")
                log.warning("%s: synchronous_standby_names = %r", shard.primary.name, wanted)

        with contextlib.suppress(*_DB_ERRORS):
            await self._on(shard.primary.dsn, apply)

    # -- failover ------------------------------------------------------------------------------

    async def _fail_over(
        self, group: str, shard: PhysicalShard, candidate: str, *, planned: bool
    ) -> ClusterMap:
        target = next(r for r in shard.replicas if r.name == candidate)
        key = shard_name(group, shard)
        log.warning("%s: promoting %s for %s (planned=%s)", self.name, candidate, key, planned)

        async def promote(conn: asyncpg.Connection[Any]) -> Any:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return True  # promoted already (a previous attempt)
            return await conn.fetchval(
                "SELECT pg_promote(true, $1)", int(self.config.promote_timeout_s)
            )

        try:
            async with asyncio.timeout(self.config.promote_timeout_s + 1):
                conn = await self._conn(target.dsn)
                await conn.execute(
                    f"SET statement_timeout = {int(self.config.promote_timeout_s * 1000) + 500}"
                )
                promoted = await promote(conn)
                await conn.execute(
                    f"SET statement_timeout = {int(self.config.probe_timeout_s * 1000)}"
                )
        except _DB_ERRORS as exc:
            self._conns.pop(target.dsn, None)
            raise FailoverError(f"pg_promote on {candidate}: {exc!r}") from exc
        if not promoted:
            raise FailoverError(f"pg_promote on {candidate} did not finish in time")
        epoch = shard.epoch + 1
        for _ in range(10):  # a server just promoted may take a moment to accept writes
            if await self._fence(target.dsn, candidate, epoch, first=True):
                break
            await asyncio.sleep(0.05)
        else:
            raise FailoverError(f"{candidate} promoted but its fence could not be set")
        rule = self.rules[group]
        if rule.mode.synchronous and rule.consistency is Consistency.AP:
            others = [r for r in shard.replicas if r.name != candidate]
            if not others:  # nobody left to acknowledge: degraded until the old primary returns
                with contextlib.suppress(*_DB_ERRORS):
                    await self._on(target.dsn, _async_commit)
        current = self._current_map()
        assert current is not None
        moved = shard.failed_over_to(candidate)
        group_shards = [moved if s.index == shard.index else s for s in current.group(group).shards]
        new_map = current.successor(shards={group: group_shards})
        await self._publish(new_map)
        self._install(new_map)
        self._revoked.discard(shard.primary.name)
        self.failovers_done += 1
        await self._record(
            key,
            planned=planned,
            from_node=shard.primary.name,
            to_node=candidate,
            result="done",
            reason="",
            epoch=epoch,
            new_map=new_map,
        )
        await asyncio.gather(
            *(
                self._repoint(r.dsn, r.name, target.dsn)
                for r in moved.replicas
                if r.name != shard.primary.name
            )
        )
        return new_map

    async def _publish(self, proposed: ClusterMap) -> None:
        async def run(db: asyncpg.Connection[Any]) -> None:
            async with db.transaction():
                await db.execute("SET LOCAL synchronous_commit = on")
                if await db.fetchval(LEASE_HELD, self.holder) is None:
                    raise FailoverError(f"{self.name} no longer holds the coordinator lease")
                await MapStore.publish(db, proposed)

        await self._on_directory(run)

    async def _repoint(self, dsn: str, name: str, primary_dsn: str) -> None:
        """Stream replica ``name`` from the new primary (Postgres reloads primary_conninfo)."""
        parts = urlsplit(primary_dsn)
        conninfo = f"host={parts.hostname} port={parts.port} user=postgres application_name={name}"

        async def run(conn: asyncpg.Connection[Any]) -> None:
            await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_literal(conninfo)}")
            await conn.execute("SELECT pg_reload_conf()")

        try:
            await self._on(dsn, run)
        except _DB_ERRORS as exc:
            log.warning("%s: could not repoint %s: %r", self.name, name, exc)

    async def _record(
        self,
        shard: str,
        *,
        planned: bool,
        from_node: str,
        to_node: str | None,
        result: str,
        reason: str,
        epoch: int | None = None,
        new_map: ClusterMap | None = None,
    ) -> None:
        with contextlib.suppress(*_DB_ERRORS):
            await self._on_directory(
                lambda db: db.execute(
                    "INSERT INTO failovers (shard, planned, from_node, to_node, epoch, "
                    "map_version, result, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    shard,
                    planned,
                    from_node,
                    to_node,
                    epoch,
                    new_map.version if new_map is not None else None,
                    result,
                    reason,
                )
            )

    async def _amend_last(self, shard: str, down_for_s: float) -> None:
        with contextlib.suppress(*_DB_ERRORS):
            await self._on_directory(
                lambda db: db.execute(
                    "UPDATE failovers SET down_for_s = $2 WHERE id = "
                    "(SELECT max(id) FROM failovers WHERE shard = $1)",
                    shard,
                    down_for_s,
                )
            )

    # -- planned switchover --------------------------------------------------------------------

    async def request_failover(self, shard: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Ask the leader (whichever node it is) for a switchover of ``shard``; wait for it.

        Raises FailoverError (unknown shard, refused, or no result in time).
        """
        current = self._current_map()
        if current is None or not any(
            shard_name(g, s) == shard and s.replicas for g, s in self._replicated(current)
        ):
            raise FailoverError(f"no replicated shard named {shard!r}")
        last = await self._on_directory(
            lambda db: db.fetchval("SELECT coalesce(max(id), 0) FROM failovers")
        )
        await self._on_directory(
            lambda db: db.execute(
                "INSERT INTO failover_requests (shard) VALUES ($1) ON CONFLICT DO NOTHING", shard
            )
        )
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            row = await self._on_directory(
                lambda db: db.fetchrow(
                    "SELECT shard, planned, from_node, to_node, epoch, map_version, result, "
                    "reason FROM failovers WHERE id > $1 AND shard = $2 AND planned "
                    "ORDER BY id LIMIT 1",
                    last,
                    shard,
                )
            )
            if row is not None:
                return dict(row)
            await asyncio.sleep(0.1)
        raise FailoverError(f"no coordinator ran the switchover of {shard} within {timeout_s}s")

    async def _handle_requests(self, current: ClusterMap) -> None:
        requests = await self._on_directory(
            lambda db: db.fetch("SELECT shard FROM failover_requests")
        )
        for row in requests:
            key = str(row["shard"])
            await self._on_directory(_delete_request(key))
            found = [(g, s) for g, s in self._replicated(current) if shard_name(g, s) == key]
            if not found:
                continue
            group, shard = found[0]
            self._busy.add(key)
            try:
                await self._switchover(group, shard)
            except _FAILOVER_ERRORS as exc:
                log.error("%s: switchover of %s failed: %r", self.name, key, exc)
                self._revoked.discard(shard.primary.name)
                await self._record(
                    key,
                    planned=True,
                    from_node=shard.primary.name,
                    to_node=None,
                    result="failed",
                    reason=str(exc),
                )
            finally:
                self._busy.discard(key)

    async def _switchover(self, group: str, shard: PhysicalShard) -> None:
        samples = await asyncio.gather(*(self._sample_replica(r.dsn) for r in shard.replicas))
        for replica, sample in zip(shard.replicas, samples, strict=True):
            self._replica_samples[replica.name] = sample
        choice = choose_candidate(ReplicationMode.SYNC, self._candidates(shard), 1 << 62)
        if choice.kind is not DecisionKind.PROMOTE or choice.candidate is None:
            raise FailoverError(f"no candidate: {choice.reason}")
        target = next(r for r in shard.replicas if r.name == choice.candidate)
        self._revoked.add(shard.primary.name)

        async def revoke(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = local")
                await conn.execute(REVOKE_FENCE)
            end = self._clock() + 2.0
            while await conn.fetchval(WRITING_BACKENDS) and self._clock() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # in-flight writes that passed the fence finish
            return parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))

        try:
            lsn = await self._on(shard.primary.dsn, revoke)
        except _DB_ERRORS as exc:
            raise FailoverError(f"cannot revoke {shard.primary.name}'s lease: {exc!r}") from exc
        end = self._clock() + 5.0
        while True:
            sample = await self._sample_replica(target.dsn)
            if sample.ok and (sample.replay_lsn or 0) >= lsn:
                break
            if self._clock() > end:
                raise FailoverError(f"{target.name} did not catch up with the primary in 5s")
            await asyncio.sleep(0.02)
        await self._fail_over(group, shard, target.name, planned=True)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What ``GET /v1/coordinator`` answers (status, drills)."""
        current = self._current_map()
        shards: dict[str, Any] = {}
        for group, shard in self._replicated(current) if current is not None else []:
            key = shard_name(group, shard)
            watch = self.watches.get(key)
            rule = self.rules[group]
            primary = self._primary_samples.get(shard.primary.name, _Sample())
            replicas = {}
            for replica in shard.replicas:
                info = self._standby_info.get(replica.name, {})
                sample = self._replica_samples.get(replica.name)
                replicas[replica.name] = {
                    "state": info.get("state") if primary.ok else None,
                    "sync_state": info.get("sync_state") if primary.ok else None,
                    "lag_bytes": info.get("lag_bytes") if primary.ok else None,
                    "lag_s": info.get("lag_s") if primary.ok else None,
                    "reachable": sample.ok if sample is not None else None,
                }
            shards[key] = {
                "group": group,
                "primary": shard.primary.name,
                "epoch": shard.epoch,
                "replication": rule.mode.value,
                "consistency": rule.consistency.value,
                "max_replica_lag_s": rule.max_replica_lag_s,
                "primary_reachable": primary.ok,
                "phase": watch.phase.value if watch else ShardPhase.HEALTHY.value,
                "reason": watch.reason if watch else "",
                "votes": self._votes.get(key),
                "replicas": replicas,
            }
        return {
            "node": self.name,
            "leader": self.is_leader,
            "leader_name": self.leader_name.split("/")[0],
            "leader_id": self.leader_name,
            "term": self.term,
            "rounds": self.rounds,
            "config": asdict(self.config),
            "shards": shards,
        }

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self._on_directory(
            lambda db: db.fetch(
                "SELECT shard, planned, from_node, to_node, epoch, map_version, result, reason, "
                "down_for_s, at::text AS at FROM failovers ORDER BY id DESC LIMIT $1",
                limit,
            )
        )
        return [dict(r) for r in rows]


async def _first_fence(
    conn: asyncpg.Connection[Any], epoch: int, lease_s: float, deadline: float
) -> Any:
    """A primary without a fence row yet (first round after ``up``): create it."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute(FENCE_SCHEMA)
        return await conn.fetchval(SET_FENCE, epoch, lease_s, deadline)


def _delete_request(key: str) -> Callable[[asyncpg.Connection[Any]], Awaitable[Any]]:
    async def run(db: asyncpg.Connection[Any]) -> Any:
        return await db.execute("DELETE FROM failover_requests WHERE shard = $1", key)

    return run


async def _install_triggers(conn: asyncpg.Connection[Any]) -> None:
    """The fence function, and its trigger on every table that lacks it (new tables too)."""
    missing = [r["name"] for r in await conn.fetch(MISSING_TRIGGERS)]
    if not missing and await conn.fetchval(
        "SELECT 1 FROM pg_proc WHERE proname = 'photostack_fence'"
    ):
        return
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = local")
        await conn.execute("SET LOCAL lock_timeout = '200ms'")
        await conn.execute(FENCE_FUNCTION)
        for table in missing:
            await conn.execute(FENCE_TRIGGER.format(table=table.replace('"', '""')))


async def _async_commit(conn: asyncpg.Connection[Any]) -> None:
    await conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
    await conn.execute("SELECT pg_reload_conf()")


def _sync_names(shard: PhysicalShard) -> str:
    from photostack.blocks.storage import synchronous_standby_names

    names = [r.name for r in shard.replicas] + [shard.primary.name]
    return synchronous_standby_names(ReplicationMode.SYNC, names)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
