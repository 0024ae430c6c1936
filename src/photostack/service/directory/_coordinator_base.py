"""The coordinator's state and its connections to data nodes (the base of
:class:`~._coordinator.Coordinator`; the failovers are in :mod:`._coordinator_failover`)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from photostack.blocks.storage import Consistency, ReplicationMode

from ._coordinator_directory import DirectoryLink
from ._coordinator_fence import Fencer
from ._coordinator_policy import Candidate, CoordinatorConfig, ShardWatch
from ._coordinator_replicas import ReplicaTender, Sample, sample_primary, sample_replica
from ._map import ClusterMap, PhysicalShard
from ._replica_policy import ReplicaPolicy

__all__ = ["CoordinatorBase", "GroupRule", "shard_name"]


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


class CoordinatorBase:
    """What one directory node's coordinator knows, and how it reaches data nodes."""

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
        replica_policy: ReplicaPolicy | None = None,
    ) -> None:
        self.name = name
        # The lease holder: this process, not just this node (a restarted node is a new holder
        # and waits for the old lease to lapse like anyone else).
        self.holder = f"{name}/{os.getpid()}-{secrets.token_hex(3)}"
        self.config = config or CoordinatorConfig()
        self.rules = dict(rules)
        self.observers = tuple(observers) or (name,)
        self._current_map = current_map
        self._install = install
        self._clock = clock
        self._conns: dict[str, asyncpg.Connection[Any]] = {}
        self.directory = DirectoryLink(name, directory_dsn, self.config)
        self.term = 0
        self.leader_since: float | None = None
        self._leader_until = 0.0
        self.leader_name = ""
        self.watches: dict[str, ShardWatch] = {}
        self._revoked: set[str] = set()  # primaries whose lease was revoked for a switchover
        self._standby_info: dict[str, dict[str, Any]] = {}  # replica -> last primary-side view
        self._replica_samples: dict[str, Sample] = {}
        self._primary_samples: dict[str, Sample] = {}
        self._votes: dict[str, dict[str, Any]] = {}
        self._busy: set[str] = set()
        self._refused: dict[str, str] = {}  # shard -> the refusal last logged
        self.rounds = 0
        self.failovers_done = 0
        self.fencer = Fencer(name, self._on, self.config, clock)
        self.replicas = ReplicaTender(name, self._on, replica_policy, clock)

    @property
    def is_leader(self) -> bool:
        return self._clock() < self._leader_until

    async def aclose(self) -> None:
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            conn.terminate()
        await self.directory.aclose()

    def _replicated(self, current: ClusterMap) -> list[tuple[str, PhysicalShard]]:
        return [
            (name, shard)
            for name, group in current.groups.items()
            if name in self.rules
            for shard in group.shards
            if shard.replicas
        ]

    # -- data nodes ----------------------------------------------------------------------------

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

    async def _sample_primary(self, dsn: str) -> Sample:
        return await sample_primary(self._on, dsn)

    async def _sample_replica(self, dsn: str) -> Sample:
        return await sample_replica(self._on, dsn)

    def _candidates(self, shard: PhysicalShard) -> list[Candidate]:
        out = []
        for replica in shard.replicas:
            sample = self._replica_samples.get(replica.name, Sample())
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
