"""The leader's failovers: automatic (a dead primary) and planned (``photostack failover SHARD``).

A failover: the other replicas cascade from the candidate (:meth:`ReplicaTender.cascade`),
``pg_promote()``, the next epoch's fence, the new primary's ``synchronous_standby_names``, the
next map version published under the leader lease, a row in ``failovers``. A switchover first
revokes the primary's write lease and waits until the candidate replayed everything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from photostack.blocks.storage import Consistency, ReplicationMode

from ._coordinator_base import CoordinatorBase, shard_name
from ._coordinator_directory import FailoverError
from ._coordinator_policy import DecisionKind, ShardWatch, choose_candidate
from ._coordinator_replicas import DB_ERRORS, sync_names
from ._map import ClusterMap, PhysicalShard

__all__ = ["FAILOVER_ERRORS", "FailoverMixin"]

log = logging.getLogger("photostack.service.directory._coordinator")

FAILOVER_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, FailoverError)


class FailoverMixin(CoordinatorBase):
    """Failovers and switchovers (run by the leader's rounds)."""

    async def _automatic(
        self, group: str, shard: PhysicalShard, watch: ShardWatch, candidate: str
    ) -> None:
        key = shard_name(group, shard)
        assert watch.down_since is not None
        down_since = watch.down_since
        self._busy.add(key)
        try:
            await self._fail_over(group, shard, candidate, planned=False)
        except FAILOVER_ERRORS as exc:
            log.error("%s: failover of %s failed: %r", self.name, key, exc)
            watch.failover_failed(f"failover failed: {exc}")
            await self.directory.record(
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
            await self.directory.amend_last(key, self._clock() - down_since)
        finally:
            self._busy.discard(key)

    async def _promote(self, dsn: str, candidate: str) -> None:
        """``pg_promote()`` on ``candidate``, waiting for it. Raises FailoverError."""

        async def promote(conn: asyncpg.Connection[Any]) -> Any:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return True  # promoted already (a previous attempt)
            return await conn.fetchval(
                "SELECT pg_promote(true, $1)", int(self.config.promote_timeout_s)
            )

        try:
            async with asyncio.timeout(self.config.promote_timeout_s + 1):
                conn = await self._conn(dsn)
                await conn.execute(
                    f"SET statement_timeout = {int(self.config.promote_timeout_s * 1000) + 500}"
                )
                promoted = await promote(conn)
                await conn.execute(
                    f"SET statement_timeout = {int(self.config.probe_timeout_s * 1000)}"
                )
        except DB_ERRORS as exc:
            self._conns.pop(dsn, None)
            raise FailoverError(f"pg_promote on {candidate}: {exc!r}") from exc
        if not promoted:
            raise FailoverError(f"pg_promote on {candidate} did not finish in time")

    async def _fail_over(
        self, group: str, shard: PhysicalShard, candidate: str, *, planned: bool
    ) -> ClusterMap:
        target = next(r for r in shard.replicas if r.name == candidate)
        key = shard_name(group, shard)
        others = [r for r in shard.replicas if r.name != candidate]
        # The other replicas stream from the candidate *before* it is promoted (cascading): they
        # can then never hold WAL it lacks — WAL a still-running old primary wrote after the
        # candidate caught up (a switchover) — which would fork them off the new timeline for
        # good; at the promotion they follow its new timeline like any cascaded standby.
        await self.replicas.cascade(target, others, deadline_s=self.config.promote_timeout_s)
        log.warning("%s: promoting %s for %s (planned=%s)", self.name, candidate, key, planned)
        await self._promote(target.dsn, candidate)
        epoch = shard.epoch + 1
        for _ in range(10):  # a server just promoted may take a moment to accept writes
            if await self.fencer.fence(target.dsn, candidate, epoch, first=True):
                break
            await asyncio.sleep(0.05)
        else:
            raise FailoverError(f"{candidate} promoted but its fence could not be set")
        moved = shard.failed_over_to(candidate)
        rule = self.rules[group]
        if rule.mode.synchronous:
            # The new primary waits for the standbys that can attach to it (the others now, the
            # old primary once rejoined), not for the list it had as a replica. An ap group
            # with nobody left to acknowledge is degraded until the old primary returns.
            degraded = rule.consistency is Consistency.AP and not others
            await self.replicas.set_sync_names(target, "" if degraded else sync_names(moved))
        current = self._current_map()
        assert current is not None
        group_shards = [moved if s.index == shard.index else s for s in current.group(group).shards]
        new_map = current.successor(shards={group: group_shards})
        await self.directory.publish(self.holder, new_map)
        self._install(new_map)
        self._revoked.discard(shard.primary.name)
        self.failovers_done += 1
        await self.directory.record(
            key,
            planned=planned,
            from_node=shard.primary.name,
            to_node=candidate,
            result="done",
            reason="",
            epoch=epoch,
            new_map=new_map,
        )
        return new_map

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
        last = await self.directory.request_switchover(shard)
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            row = await self.directory.switchover_result(last, shard)
            if row is not None:
                return row
            await asyncio.sleep(0.1)
        raise FailoverError(f"no coordinator ran the switchover of {shard} within {timeout_s}s")

    async def _handle_requests(self, current: ClusterMap) -> None:
        for key in await self.directory.pending_requests():
            await self.directory.delete_request(key)
            found = [(g, s) for g, s in self._replicated(current) if shard_name(g, s) == key]
            if not found:
                continue
            group, shard = found[0]
            self._busy.add(key)
            try:
                await self._switchover(group, shard)
            except FAILOVER_ERRORS as exc:
                log.error("%s: switchover of %s failed: %r", self.name, key, exc)
                self._revoked.discard(shard.primary.name)
                await self.directory.record(
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
        try:
            lsn = await self.fencer.revoke(shard.primary.dsn)
        except DB_ERRORS as exc:
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
