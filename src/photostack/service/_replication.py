"""The app's side of replication: read/write split, replica lag, read-your-writes, CAP answers.

- Writes use the primary pools of the directory's map (``MapRouting``). Each primary pool is
  opened with ``photostack.epoch=<the shard's epoch>``: the shard's fence trigger refuses a
  write from an app routing by another epoch, and any write without the coordinator's lease
  (docs/replication.md). That refusal (SQLSTATE 25006, like a write to a standby) is answered
  503 ``primary_unavailable`` with Retry-After, and the map is refreshed at once.
- Client reads (the user store's, and the photo reads of the API: ``PhotoStore`` with
  ``replica=True``) go through :class:`ReadPool`s (``reads`` router): each read asks
  :func:`~photostack.blocks.storage.choose_read` where to go, from the views a sampler refreshes
  every ``sample_interval_s`` (primary LSN and lease, each replica's replay LSN, receiver status
  and lag), and the request's read-your-writes token.
- Read-your-writes: a successful write answers ``X-Read-After: users-1=0/16B3A28;...`` (the
  primary's ``pg_current_wal_lsn()`` after the write, for every shard the request used); a read
  sending it back goes to a replica only once that replica replayed past it.
- CAP: a ``cp`` group refuses a read its primary cannot confirm (503 ``consistency_unavailable``,
  Retry-After); an ``ap`` group serves it from the freshest copy with ``X-Data-Stale: true``.
- Metrics: ``photostack_replica_lag_bytes`` and ``photostack_replica_lag_seconds`` per replica,
  ``photostack_reads`` by target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from photostack.blocks.storage import (
    PRIMARY,
    Consistency,
    PrimaryView,
    ReadDecision,
    ReadPolicy,
    ReadRefused,
    ReplicaView,
    ShardRouter,
    choose_read,
    format_read_after,
    merge_read_after,
    parse_lsn,
    parse_read_after,
)

from ._http import error_response
from .directory import ClusterMap
from .directory._routing import epoch_dsn

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "READ_AFTER_HEADER",
    "STALE_HEADER",
    "ReadPool",
    "Replication",
    "ReplicationMiddleware",
    "add_replication_handlers",
]

log = logging.getLogger(__name__)

READ_AFTER_HEADER = "x-read-after"
STALE_HEADER = "x-data-stale"
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection lost in the middle of a query
)

_SAMPLE_ERRORS: tuple[type[Exception], ...] = (*_ERRORS, TypeError)

_read_after: ContextVar[dict[str, int] | None] = ContextVar("read_after", default=None)
_stale: ContextVar[list[str] | None] = ContextVar("stale", default=None)
_touched: ContextVar[set[str] | None] = ContextVar("touched", default=None)

_PRIMARY_SAMPLE = "SELECT pg_current_wal_lsn()::text AS lsn, NOT pg_is_in_recovery() AS writable"
_FENCE_SAMPLE = "SELECT valid_until > clock_timestamp() FROM shard_fence WHERE id = 1"
_REPLICA_SAMPLE = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver,
       coalesce(extract(epoch from clock_timestamp() - pg_last_xact_replay_timestamp()), 0)::float8
           AS replay_age_s
"""


def shard_key(group: str, index: int) -> str:
    return f"{group}-{index + 1}"


@dataclass
class _Shard:
    key: str
    policy: ReadPolicy
    primary: Any
    replicas: dict[str, Any]
    primary_view: PrimaryView = field(default_factory=lambda: PrimaryView(True, True))
    views: dict[str, ReplicaView] = field(default_factory=dict)
    turn: int = 0


class ReadPool:
    """The read methods of a pool (fetch, fetchrow, fetchval), routed per read."""

    def __init__(self, shard: _Shard, owner: Replication) -> None:
        self._shard = shard
        self._owner = owner

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await self._owner.read(self._shard, "fetch", query, args)
        return result

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        result: asyncpg.Record | None = await self._owner.read(self._shard, "fetchrow", query, args)
        return result

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._owner.read(self._shard, "fetchval", query, args)


class Replication:
    """One app node's replication layer. ``policies``: AppSettings.replication."""

    def __init__(
        self,
        policies: Mapping[str, Mapping[str, Any]],
        open_replica: Callable[[str, str], Any],
        registry: CollectorRegistry,
        *,
        sample_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = {
            group: ReadPolicy(
                Consistency(raw.get("consistency", "cp")), float(raw.get("max_replica_lag_s", 0))
            )
            for group, raw in policies.items()
        }
        self._open_replica = open_replica
        self._clock = clock
        self.sample_interval_s = sample_interval_s
        self._shards: dict[str, _Shard] = {}
        self._by_dsn: dict[str, str] = {}  # primary pool dsn -> shard key
        self._replica_pools: dict[str, Any] = {}
        self.router: ShardRouter[ReadPool] | None = None
        self.lag_bytes = Gauge(
            "photostack_replica_lag_bytes",
            "Bytes of WAL a replica has not replayed (primary LSN - replay LSN).",
            ["shard", "replica"],
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "photostack_replica_lag_seconds",
            "Seconds since the last replayed commit of a replica that is behind (0 caught up).",
            ["shard", "replica"],
            registry=registry,
        )
        self.reads = Counter(
            "photostack_reads",
            "Client reads (user store, photos) by target: primary, replica, stale, refused.",
            ["target"],
            registry=registry,
        )

    # -- the map -------------------------------------------------------------------------------

    async def install(self, new: ClusterMap, primaries: Mapping[str, Any]) -> None:
        """Rebuild the read router for ``new``; ``primaries``: epoch dsn -> pool (MapRouting's)."""
        groups: dict[str, list[ReadPool]] = {}
        shards: dict[str, _Shard] = {}
        by_dsn: dict[str, str] = {}
        for name, group in new.groups.items():
            policy = self._policies.get(name, ReadPolicy())
            groups[name] = []
            for shard in group.shards:
                key = shard_key(name, shard.index)
                dsn = epoch_dsn(shard.primary.dsn, shard.epoch)
                replicas = {}
                for replica in shard.replicas:
                    pool = self._replica_pools.get(replica.dsn)
                    if pool is None:
                        pool = await self._open_replica(name, replica.dsn)
                        self._replica_pools[replica.dsn] = pool
                    replicas[replica.name] = pool
                old = self._shards.get(key)
                entry = _Shard(key, policy, primaries[dsn], replicas)
                if old is not None and old.primary is entry.primary:
                    entry.views = {k: v for k, v in old.views.items() if k in replicas}
                    entry.primary_view = old.primary_view
                shards[key] = entry
                by_dsn[dsn] = key
                groups[name].append(ReadPool(entry, self))
        partitioners = {name: group.partitioner() for name, group in new.groups.items()}
        self._shards, self._by_dsn = shards, by_dsn
        if self.router is None:
            self.router = ShardRouter(groups, partitioners=partitioners)
        else:
            for name in new.groups:
                self.router.replace(name, groups[name], partitioners[name])

    # -- reads ---------------------------------------------------------------------------------

    def decide(self, shard: _Shard) -> ReadDecision:
        """Raises ReadRefused."""
        token = _read_after.get()
        shard.turn += 1
        return choose_read(
            shard.policy,
            shard.primary_view,
            list(shard.views.values()),
            now=self._clock(),
            read_after=(token or {}).get(shard.key),
            turn=shard.turn,
        )

    async def read(self, shard: _Shard, method: str, query: str, args: tuple[Any, ...]) -> Any:
        try:
            decision = self.decide(shard)
        except ReadRefused:
            self.reads.labels("refused").inc()
            raise
        if decision.stale:
            stale = _stale.get()
            if stale is not None:
                stale.append(shard.key)
            self.reads.labels("stale").inc()
        if decision.target == PRIMARY:
            if not decision.stale:
                self.reads.labels("primary").inc()
            return await getattr(shard.primary, method)(query, *args)
        if not decision.stale:
            self.reads.labels("replica").inc()
        try:
            return await getattr(shard.replicas[decision.target], method)(query, *args)
        except _ERRORS:
            view = shard.views.get(decision.target)
            if view is not None:  # skip it until the next good sample
                shard.views[decision.target] = ReplicaView(
                    view.name, False, False, view.replay_lsn, None, None, self._clock()
                )
            if not shard.primary_view.usable:
                raise
            self.reads.labels("primary").inc()
            return await getattr(shard.primary, method)(query, *args)

    # -- sampling ------------------------------------------------------------------------------

    async def sample_forever(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception:  # the sampler must outlive anything: views would freeze
                log.exception("replica sampling failed")
            await asyncio.sleep(self.sample_interval_s)

    async def sample_once(self) -> None:
        await asyncio.gather(*(self._sample(s) for s in self._shards.values() if s.replicas))

    async def _sample(self, shard: _Shard) -> None:
        primary_lsn: int | None = None
        try:
            async with asyncio.timeout(1.0):
                row = await shard.primary.fetchrow(_PRIMARY_SAMPLE)
                try:
                    confirmed = await shard.primary.fetchval(_FENCE_SAMPLE)
                except asyncpg.UndefinedTableError:
                    confirmed = True  # no coordinator fences this shard
            primary_lsn = parse_lsn(row["lsn"]) if row["lsn"] else None
            shard.primary_view = PrimaryView(
                True, bool(confirmed) and bool(row["writable"]), primary_lsn
            )
        except _SAMPLE_ERRORS:
            shard.primary_view = PrimaryView(False, False, None)
        views = await asyncio.gather(
            *(self._sample_replica(n, p, primary_lsn) for n, p in shard.replicas.items())
        )
        shard.views = {v.name: v for v in views}
        for view in views:
            self.lag_bytes.labels(shard.key, view.name).set(view.lag_bytes or 0)
            self.lag_seconds.labels(shard.key, view.name).set(view.lag_s or 0)

    async def _sample_replica(self, name: str, pool: Any, primary_lsn: int | None) -> ReplicaView:
        now = self._clock()
        try:
            async with asyncio.timeout(1.0):
                row = await pool.fetchrow(_REPLICA_SAMPLE)
        except _ERRORS:
            return ReplicaView(name, False, False, None, None, None, now)
        replay = parse_lsn(row["replay_lsn"]) if row["replay_lsn"] else None
        streaming = bool(row["in_recovery"]) and row["receiver"] == "streaming"
        if primary_lsn is None or replay is None:
            lag_bytes, lag_s = None, float(row["replay_age_s"])
        else:
            lag_bytes = max(0, primary_lsn - replay)
            lag_s = 0.0 if lag_bytes == 0 else float(row["replay_age_s"])
        return ReplicaView(name, True, streaming, replay, lag_bytes, lag_s, now)

    # -- read-your-writes ----------------------------------------------------------------------

    def note_acquire(self, dsn: str) -> Callable[[Any], Any]:
        """A pool ``setup`` hook: records that the request used the primary at ``dsn``."""

        async def setup(_: Any) -> None:
            touched = _touched.get()
            if touched is not None:
                touched.add(dsn)

        return setup

    async def token_for(self, dsns: set[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for dsn in dsns:
            key = self._by_dsn.get(dsn)
            shard = self._shards.get(key) if key else None
            if shard is None or not shard.replicas:
                continue
            with contextlib.suppress(*_ERRORS):
                text = await shard.primary.fetchval("SELECT pg_current_wal_lsn()::text")
                out[shard.key] = parse_lsn(text)
        return out

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware: the token in, the token and the stale mark out."""

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            header = next(
                (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-read-after"),
                None,
            )
            incoming = parse_read_after(header)
            stale: list[str] = []
            touched: set[str] = set()
            tokens = (_read_after.set(incoming), _stale.set(stale), _touched.set(touched))
            writes = scope.get("method") in _WRITE_METHODS

            async def stamped(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", ()))
                    if stale:
                        headers.append((b"x-data-stale", b"true"))
                    if writes and message.get("status", 500) < 400 and touched:
                        token = merge_read_after(incoming, await self.token_for(touched))
                        if token:
                            headers.append((b"x-read-after", format_read_after(token).encode()))
                    message = {**message, "headers": headers}
                await send(message)

            try:
                await app(scope, receive, stamped)
            finally:
                _read_after.reset(tokens[0])
                _stale.reset(tokens[1])
                _touched.reset(tokens[2])

        return asgi

    def describe(self) -> dict[str, Any]:
        return {
            key: {
                "primary": {
                    "reachable": s.primary_view.reachable,
                    "confirmed": s.primary_view.confirmed,
                },
                "replicas": {
                    n: {"streaming": v.streaming, "lag_bytes": v.lag_bytes, "lag_s": v.lag_s}
                    for n, v in s.views.items()
                },
            }
            for key, s in self._shards.items()
            if s.replicas
        }


class ReplicationMiddleware:
    """Starlette-style middleware class around :meth:`Replication.middleware`."""

    def __init__(self, app: ASGIApp, *, replication: Replication) -> None:
        self._asgi = replication.middleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def add_replication_handlers(
    app: FastAPI, errors: Counter, refresh_map: Callable[[], None]
) -> None:
    """503 answers for a refused read (cp) and a fenced primary (any group)."""

    async def refused(_: Request, exc: Exception) -> Response:
        errors.labels("ReadRefused").inc()
        return error_response(
            503,
            "consistency_unavailable",
            f"this group is cp and cannot answer without risking a stale read ({exc})",
            {"Retry-After": "1"},
        )

    async def fenced(_: Request, exc: Exception) -> Response:
        errors.labels("PrimaryFenced").inc()
        log.warning("write refused by a fenced or read-only primary: %s", exc)
        refresh_map()
        return error_response(
            503,
            "primary_unavailable",
            "the shard's primary is changing (failover); retry",
            {"Retry-After": "1"},
        )

    async def broken(_: Request, exc: Exception) -> Response:
        # asyncpg's answer when a primary dies in the middle of a transaction
        errors.labels(type(exc).__name__).inc()
        refresh_map()
        return error_response(
            503, "storage_unavailable", "a storage shard is unavailable", {"Retry-After": "1"}
        )

    app.add_exception_handler(ReadRefused, refused)
    app.add_exception_handler(asyncpg.ReadOnlySQLTransactionError, fenced)
    app.add_exception_handler(asyncpg.exceptions.InternalClientError, broken)
