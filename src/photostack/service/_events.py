"""Product events: each user's durable event log, its hot copy and its publication.

Where events live: the ``events`` table on the user's own ``users`` shard, with a per-user
``seq`` allocated in the same transaction as the row (``event_seqs`` counter, UPDATE ...
RETURNING), so seqs increase without gaps, survive restarts, and commit in seq order. The log is
trimmed to ``events_keep_count`` per user on every write and to ``events_keep_age_s`` by a
bounded periodic cleanup.

Hot copy and wake-up: after commit, one Lua script on the user's cache node (hash of the user id)
appends the event to a capped list and PUBLISHes it on the user's channel. Readers prefer the
list when it provably covers what they ask; anything else (and every ``fresh`` read) goes to
Postgres. A lost publication costs latency, never an event: web nodes re-read the log.

Producers: :meth:`EventStore.produce` (``follower.new`` on follow, here; ``photo.ready`` /
``photo.posted`` from the upload workers, later).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, Query, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from photostack.blocks.realtime import Event, LogRead, channel_for
from photostack.blocks.storage import HashModPartitioner, ShardRouter

from ._codec import format_time
from ._fenced import fenced
from ._http import JSON_MEDIA_TYPE, ApiError, JsonResponse
from .directory import NO_GUARD, OwnershipGuard
from .settings import AppSettings

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "EVENT_TYPES",
    "EventRetention",
    "EventStore",
    "HotEvents",
    "add_internal_event_routes",
    "encode_event",
    "event_store_for",
    "trim_forever",
]

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset({"follower.new", "photo.ready", "photo.posted"})
MAX_READ = 100


def encode_event(seq: int, type_: str, data: Any, at: datetime | str) -> bytes:
    """The EVENT JSON of API.md, compact. ``data`` is a JSON value or its JSON text."""
    data_json = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    at_text = at if isinstance(at, str) else format_time(at)
    return b'{"seq":%d,"type":%s,"data":%s,"at":%s}' % (
        seq,
        json.dumps(type_).encode("utf-8"),
        data_json.encode("utf-8"),
        json.dumps(at_text).encode("utf-8"),
    )


@dataclass(frozen=True)
class EventRetention:
    keep_count: int = 1000  # newest events kept per user
    keep_age_s: float = 7 * 24 * 3600.0
    hot_count: int = 100  # newest events kept in the user's Redis list
    hot_ttl_s: int = 24 * 3600
    trim_batch: int = 1000  # rows per age-trim statement
    trim_batches_max: int = 10  # statements per shard per cleanup run (bounded work)


# KEYS: list, last-seq. ARGV: seq, body, hot_count, ttl_s, channel. Appends only when the list
# continues (else restarts it at this event) so the list is always gap-free, then publishes.
_PUSH_AND_PUBLISH = """
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if seq <= last then return 0 end
if last ~= seq - 1 then redis.call('DEL', KEYS[1]) end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('SET', KEYS[2], seq, 'EX', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"""


class HotEvents:
    """The capped per-user lists and the channels, on the cache nodes (hash-mod by user id)."""

    def __init__(
        self, nodes: Sequence[tuple[str, int]], retention: EventRetention, *, prefix: str = "ev:"
    ) -> None:
        if not nodes:
            raise ValueError("HotEvents needs at least one cache node")
        self._clients = [
            aioredis.Redis(host=h, port=p, socket_timeout=1.0, socket_connect_timeout=1.0)
            for h, p in nodes
        ]
        self._partitioner = HashModPartitioner(len(nodes))
        self._retention = retention
        self._prefix = prefix
        self._script = self._clients[0].register_script(_PUSH_AND_PUBLISH)

    def __repr__(self) -> str:
        return f"<HotEvents nodes={len(self._clients)}>"

    def node_for(self, user_id: str) -> int:
        return self._partitioner.shard_for(user_id)

    def _keys(self, user_id: str) -> list[str]:
        return [f"{self._prefix}{user_id}", f"{self._prefix}{user_id}:last"]

    async def push_and_publish(self, user_id: str, event: Event) -> bool:
        """Append to the hot list and publish. Returns False when the node failed (logged)."""
        client = self._clients[self.node_for(user_id)]
        r = self._retention
        try:
            await self._script(
                keys=self._keys(user_id),
                args=[event.seq, event.body, r.hot_count, r.hot_ttl_s, channel_for(user_id)],
                client=client,
            )
        except (RedisError, OSError) as exc:
            log.warning("event %s/%d not published: %r", user_id, event.seq, exc)
            return False
        return True

    async def read(self, user_id: str, after: int, limit: int) -> LogRead | None:
        """Events after ``after`` when the list provably covers them; else None (ask the log)."""
        client = self._clients[self.node_for(user_id)]
        try:
            raw: list[bytes | str] = await client.lrange(self._keys(user_id)[0], 0, -1)
        except (RedisError, OSError):
            return None
        if not raw:
            return None
        events = [Event.from_json(item) for item in raw]
        if events[0].seq > after + 1:
            return None  # the list starts later than asked: only the log has the rest
        newer = [e for e in events if e.seq > after]
        return LogRead(tuple(newer[:limit]), more=len(newer) > limit)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)


class _Duplicate(Exception):
    """Rolls back a seq allocation whose event already exists (same dedupe key)."""


class EventStore:
    """The per-user event logs over the ``users`` shards, plus the optional hot copy."""

    def __init__(
        self,
        router: ShardRouter[Pool],
        retention: EventRetention | None = None,
        hot: HotEvents | None = None,
        guard: OwnershipGuard = NO_GUARD,
    ) -> None:
        self._router = router
        self.retention = retention or EventRetention()
        self.hot = hot
        # Appends (seq, row, count trim) are one transaction behind the ownership fence: a
        # ``users`` shard a reshard emptied answers "wrong shard" and the append goes to the
        # new owner (service/_fenced.py). The age trim is not fenced: see :meth:`trim_by_age`.
        self._guard = guard

    def __repr__(self) -> str:
        return f"<EventStore hot={self.hot!r}>"

    async def produce(
        self, user_id: str, type_: str, data: dict[str, Any], *, dedupe_key: str | None = None
    ) -> Event | None:
        """Append an event to ``user_id``'s log, then publish it. Returns None for a duplicate.

        The producer API of later workers (``photo.ready`` to the owner, ``photo.posted`` to
        each follower). ``dedupe_key`` makes a retried production a no-op. Raises ValueError for
        an unknown type; asyncpg / OSError when the shard fails (nothing was written then).
        """
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        data_json = json.dumps(data, separators=(",", ":"))

        async def append(conn: Any) -> tuple[int, datetime]:
            seq = await conn.fetchval(
                "INSERT INTO event_seqs (user_id, last_seq) VALUES ($1, 1) "
                "ON CONFLICT (user_id) DO UPDATE SET last_seq = event_seqs.last_seq + 1 "
                "RETURNING last_seq",
                user_id,
            )
            at = await conn.fetchval(
                "INSERT INTO events (user_id, seq, type, data, dedupe_key) "
                "VALUES ($1, $2, $3, $4::jsonb, $5) "
                "ON CONFLICT (user_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING "
                "RETURNING at",
                user_id,
                seq,
                type_,
                data_json,
                dedupe_key,
            )
            if at is None:
                raise _Duplicate
            await conn.execute(
                "DELETE FROM events WHERE user_id = $1 AND seq <= $2",
                user_id,
                seq - self.retention.keep_count,
            )
            return seq, at

        try:
            seq, at = await fenced(self._router, self._guard, "users", [user_id], append)
        except _Duplicate:
            return None
        event = Event(seq, type_, encode_event(seq, type_, data_json, at))
        if self.hot is not None:
            await self.hot.push_and_publish(user_id, event)
        return event

    async def read(self, user_id: str, after: int, *, limit: int, fresh: bool) -> LogRead:
        """Up to ``limit`` events after ``after``, oldest first (hot list unless ``fresh``)."""
        limit = max(1, min(limit, MAX_READ))
        if self.hot is not None and not fresh:
            hot = await self.hot.read(user_id, after, limit)
            if hot is not None:
                return hot
        pool = self._router.shard_for("users", user_id)
        rows = await pool.fetch(
            "SELECT seq, type, data::text AS data, at FROM events "
            "WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            user_id,
            after,
            limit + 1,
        )
        events = tuple(
            Event(r["seq"], r["type"], encode_event(r["seq"], r["type"], r["data"], r["at"]))
            for r in rows[:limit]
        )
        return LogRead(events, more=len(rows) > limit)

    async def trim_by_age(self) -> int:
        """Delete events older than ``keep_age_s``, in bounded batches per shard. Returns rows.

        Not behind the ownership fence, on purpose: it keys on age, not on a user, and deletes
        only rows past retention, a predicate every copy of a row shares. During a reshard a
        trim on the old owner deletes either a stale copy (after the fence) or a row the new
        owner's own trim deletes too (before it, the capture replays the delete); it can never
        lose a row that should be kept nor resurrect one."""
        r = self.retention
        total = 0
        for pool in self._router.shards("users"):
            for _ in range(r.trim_batches_max):
                status = await pool.execute(
                    "DELETE FROM events WHERE ctid IN (SELECT ctid FROM events "
                    "WHERE at < now() - make_interval(secs => $1) LIMIT $2)",
                    r.keep_age_s,
                    r.trim_batch,
                )
                deleted = int(status.split()[-1])
                total += deleted
                if deleted < r.trim_batch:
                    break
        return total

    async def aclose(self) -> None:
        if self.hot is not None:
            await self.hot.aclose()


def event_store_for(
    settings: AppSettings, router: ShardRouter[Pool], guard: OwnershipGuard = NO_GUARD
) -> EventStore:
    """The app node's event store: retention from settings, hot copy when there are caches,
    appends behind ``guard`` (the app's MapGuard when it routes by the directory's map)."""
    retention = EventRetention(
        keep_count=settings.events_keep_count,
        keep_age_s=settings.events_keep_age_s,
        hot_count=settings.events_hot_count,
    )
    nodes = [(p.host, p.port) for p in settings.cache_nodes]
    return EventStore(router, retention, HotEvents(nodes, retention) if nodes else None, guard)


def events_json(read: LogRead) -> bytes:
    """The internal read answer: ``{"events": [...], "more": bool}``."""
    return (
        b'{"events":['
        + b",".join(e.body for e in read.events)
        + b'],"more":%s}' % (b"true" if read.more else b"false")
    )


def follower_event_data(follower: dict[str, Any]) -> dict[str, Any]:
    """``follower.new`` data: who followed (the public user fields, no counts)."""
    return {
        "follower": {k: follower[k] for k in ("id", "username", "display_name")},
    }


def add_internal_event_routes(app: FastAPI, get_events: Callable[[], EventStore]) -> None:
    """The app node's event endpoints: read a user's log after a seq; produce an event.

    - ``GET  /internal/v1/users/{id}/events?after=&limit=&fresh=`` -> ``{"events", "more"}``
    - ``POST /internal/v1/users/{id}/events`` ``{"type", "data", "dedupe_key"?}`` -> 201 EVENT,
      200 ``{"duplicate": true}`` when the dedupe key was used (for producers in other processes)
    """

    @app.get("/internal/v1/users/{user_id}/events")
    async def read_events(
        user_id: str,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_READ)] = MAX_READ,
        fresh: bool = False,
    ) -> Response:
        read = await get_events().read(user_id, after, limit=limit, fresh=fresh)
        return Response(events_json(read), media_type=JSON_MEDIA_TYPE)

    @app.post("/internal/v1/users/{user_id}/events", status_code=201)
    async def produce_event(user_id: str, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from exc
        if not isinstance(body, dict) or body.get("type") not in EVENT_TYPES:
            raise ApiError(422, "invalid_type", f"type must be one of {sorted(EVENT_TYPES)}")
        data, key = body.get("data", {}), body.get("dedupe_key")
        if not isinstance(data, dict) or not (key is None or isinstance(key, str)):
            raise ApiError(422, "invalid_field", "data must be an object, dedupe_key a string")
        event = await get_events().produce(user_id, body["type"], data, dedupe_key=key)
        if event is None:
            return JsonResponse({"duplicate": True})
        return Response(event.body, status_code=201, media_type=JSON_MEDIA_TYPE)


async def trim_forever(
    events: EventStore, interval_s: float, errors: tuple[type[Exception], ...]
) -> None:
    """Age-trim every ``interval_s`` until cancelled; storage errors are logged and retried."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            deleted = await events.trim_by_age()
        except errors as exc:
            log.warning("event trim failed: %r", exc)
            continue
        if deleted:
            log.info("trimmed %d old events", deleted)
