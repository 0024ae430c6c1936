"""Product events: each user's durable event log, its hot copy and its publication.

Where events live: the ``events`` table on the user's own ``users`` shard, with a per-user
``seq`` allocated in the same transaction as the row (``event_seqs`` counter, UPDATE ...
RETURNING), so seqs increase without gaps, survive restarts, and commit in seq order. The log is
trimmed to ``events_keep_count`` per user on every write and to ``events_keep_age_s`` by a
bounded periodic cleanup.

Hot copy and wake-up (``_events_hot.py``): before the commit a pending marker goes to the
user's cache node (hash of the user id); after it, one Lua script appends the event to a capped
list, PUBLISHes it on the user's channel and clears the marker. Readers prefer the list when it
provably covers what they ask and no marker is pending; anything else (and every ``fresh`` read)
goes to Postgres. A failed push is retried in the background; a marker left by a producer that
died is repaired by the next reader. A lost publication costs latency, never an event: web nodes
re-read the log.

Producers: :meth:`EventStore.produce` (``follower.new`` on follow, here; ``photo.ready`` /
``photo.posted`` from the upload workers, later).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from photostack.blocks.realtime import Event, LogRead
from photostack.blocks.storage import ShardRouter

from ._codec import format_time
from ._events_hot import EventRetention, HotEvents
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


def _event_of(row: Any) -> Event:
    return Event(
        row["seq"], row["type"], encode_event(row["seq"], row["type"], row["data"], row["at"])
    )


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
        if hot is not None:
            hot.tail_reader = self.tail
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

        # The pending marker goes first, so that no reader trusts a hot list that may lack this
        # event once it is committed. On any error but a certain rollback the marker stays: if
        # the commit did happen, the marker turns stale and a reader repairs the list.
        token = await self.hot.begin(user_id) if self.hot is not None else ""
        try:
            seq, at = await fenced(self._router, self._guard, "users", [user_id], append)
        except _Duplicate:
            if self.hot is not None:
                self.hot.abandon(user_id, token)
            return None
        event = Event(seq, type_, encode_event(seq, type_, data_json, at))
        if self.hot is not None:
            await self.hot.push_and_publish(user_id, event, token)  # retried when it fails
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
        return LogRead(tuple(_event_of(r) for r in rows[:limit]), more=len(rows) > limit)

    async def tail(self, user_id: str, count: int) -> list[Event]:
        """The newest ``count`` events of the log, oldest first (hot-list repairs)."""
        pool = self._router.shard_for("users", user_id)
        rows = await pool.fetch(
            "SELECT seq, type, data::text AS data, at FROM events "
            "WHERE user_id = $1 ORDER BY seq DESC LIMIT $2",
            user_id,
            count,
        )
        return [_event_of(r) for r in reversed(rows)]

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
