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
   map version (the shard's primary and epoch changed) under the leader lease, and records the
   failover (the other replicas were pointed at the candidate before its promotion);
5. keeps every replica attached to its primary and a sync primary's standby list right
   (:class:`~._coordinator_replicas.ReplicaTender`).

``photostack failover SHARD`` (a planned switchover) revokes the primary's lease first, waits for
the candidate to replay everything, then does 4: no write is lost even in an async group.

Modules: this one (the rounds, votes, state), :mod:`._coordinator_base` (state, connections to
data nodes), :mod:`._coordinator_failover` (4 and switchovers), :mod:`._coordinator_fence` (1),
:mod:`._coordinator_replicas` (samples, standbys kept attached), :mod:`._coordinator_directory`
(the directory database: observations, lease, map, history), :mod:`._coordinator_policy` and
:mod:`._replica_policy` (pure decisions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from ._coordinator_base import GroupRule, shard_name
from ._coordinator_directory import FailoverError
from ._coordinator_failover import FailoverMixin
from ._coordinator_policy import DecisionKind, ShardPhase, ShardWatch, Tally, Vote, tally
from ._coordinator_replicas import DB_ERRORS as _DB_ERRORS
from ._coordinator_replicas import Sample as _Sample
from ._errors import DirectoryError
from ._map import PhysicalShard
from ._replica_policy import conninfo_address, dsn_address

__all__ = ["Coordinator", "FailoverError", "GroupRule", "shard_name"]

log = logging.getLogger(__name__)


class Coordinator(FailoverMixin):
    """One directory node's share of failure detection, and the leader's failovers."""

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
                except Exception:  # a bug must not end failure detection on this node for good
                    log.exception("%s: coordinator round failed", self.name)
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
            try:
                await self._lead()
            except Exception:
                log.exception("%s: leader lease round failed", self.name)
            spent = self._clock() - started
            await asyncio.sleep(max(0.01, self.config.renew_interval_s - spent))

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
        await self.directory.record_observations(
            {
                shard.primary.name: p.ok and not p.in_recovery
                for (_, shard), p in zip(shards, probes, strict=True)
            }
        )
        if not self.is_leader:
            return
        observations = await self.directory.observations()
        await self._handle_requests(current)
        await asyncio.gather(
            *(
                self._lead_shard(group, shard, probe, observations)
                for (group, shard), probe in zip(shards, probes, strict=True)
            )
        )

    # -- the leader lease ----------------------------------------------------------------------

    async def _lead(self) -> None:
        sent = self._clock()
        try:
            term = await self.directory.acquire_lease(self.holder)
        except _DB_ERRORS as exc:
            log.warning("%s: leader lease not renewed: %r", self.name, exc)
            return  # still leader until the local lease runs out
        if term is None:
            if self.is_leader:
                log.warning("%s: lost the coordinator lease", self.name)
            self._leader_until = 0.0
            self.leader_since = None
            self.leader_name = await self.directory.lease_holder()
            return
        if term != self.term or self.leader_since is None:
            log.info("%s leads the coordinator (term %d)", self.name, term)
            self.leader_since = sent
            self.term = term
            self.fencer.renew_sent.clear()
            self.watches.clear()
            self.replicas.reset()
        self._leader_until = sent + self.config.leader_lease_s
        self.leader_name = self.holder

    # -- data shards ---------------------------------------------------------------------------

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
                await self.fencer.fence(
                    shard.primary.dsn, shard.primary.name, shard.epoch, first=False
                )
        await self.replicas.tend(
            shard, probe, replica_samples, mode=rule.mode, consistency=rule.consistency
        )
        counted = self._count(shard, observations, replica_samples)
        self._votes[key] = {"down": counted.down, "up": counted.up, "total": counted.total}
        now = self._clock()
        watch.observe(counted, now)
        lapsed_at = self.fencer.lease_lapsed_at(shard.primary.name, self.leader_since)
        decision = watch.decide(now, rule.mode, self._candidates(shard), lapsed_at)
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
        siblings = {dsn_address(r.dsn) for r in shard.replicas}
        for replica, sample in zip(shard.replicas, replica_samples, strict=True):
            # A replica cascading from a sibling (left so by a promotion that failed) says
            # nothing about the primary: its receiver streams whether the primary lives or not.
            upstream = conninfo_address(sample.conninfo)
            cascading = upstream is not None and upstream in siblings
            if sample.ok and sample.in_recovery and not cascading:
                votes.append(Vote(replica.name, sample.receiver != "streaming"))
            else:
                votes.append(Vote(replica.name, None))
        return tally(votes, len(self.observers) + len(shard.replicas))

    def _log_refusal(self, key: str, reason: str) -> None:
        if reason != self._refused.get(key):
            self._refused[key] = reason
            log.warning("%s: %s is down but not failed over: %s", self.name, key, reason)

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
                    "action": self.replicas.action(replica.name),
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
        return await self.directory.history(limit)
