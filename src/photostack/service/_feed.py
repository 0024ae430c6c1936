"""The home feed: key-value timelines in Redis, fanned out on write, celebrities merged on read.

Data (docs/uploads.md "Feed"), all on the cache nodes, each key placed by a consistent-hash ring:

- ``ft:<user>``  the user's timeline: a sorted set, score = photo ``created_at`` in Unix
  microseconds, member = photo id, trimmed to ``max_items``.
- ``fp:<owner>`` the owner's own recent ready photos (same shape): what readers merge for users
  whose posts are not fanned out, and the source of a cheap rebuild.
- ``fc``        the set of "celebrities" (users with more than ``fanout_limit`` followers), on
  every cache node so a read asks only the reader's node.

Each sorted set carries a sentinel member ``""`` scored ``+inf`` that means "complete": it is
written only by a rebuild from the photos shards (the source of truth), so a set that lost its
node (or expired) is rebuilt on the next read, and fan-out writes may create a set without making
it look complete. Rank-based trimming drops the lowest scores, never the sentinel.

Policy (pure, unit-tested): :func:`fanout_mode` and :func:`merge_entries`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from photostack.blocks.ring import HashRing
from photostack.blocks.storage import ShardRouter

from ._codec import Cursor

if TYPE_CHECKING:
    import asyncpg

    from ._events import EventStore
    from ._photos import PhotoStore

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "Entry",
    "FanoutMode",
    "FeedConfig",
    "FeedService",
    "FeedStore",
    "cursor_of",
    "entry_after",
    "fanout_mode",
    "merge_entries",
    "micros_of",
]

Entry = tuple[int, str]  # (created_at in Unix microseconds, photo id); newest = largest
SENTINEL = ""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A keyset page over (user_id, follower_id): the owner's followers after ``$2``; rows of the next
# user end the owner's list (the jobs' statement, so one index path serves both).
_FOLLOWERS_PAGE = (
    "SELECT user_id, follower_id AS other, created_at FROM followers "
    "WHERE (user_id, follower_id) > ($1, $2) ORDER BY user_id, follower_id LIMIT $3"
)
_FOLLOWERS_COUNT = (
    "SELECT user_id AS key, count(*) AS n FROM followers "
    "WHERE user_id = ANY($1::text[]) GROUP BY user_id"
)
_FOLLOWED_AMONG = (
    "SELECT user_id, target_id AS other FROM following "
    "WHERE user_id = ANY($1::text[]) AND target_id = ANY($2::text[])"
)
_FOLLOWEES = (
    "SELECT target_id AS other FROM following WHERE user_id = $1 ORDER BY target_id LIMIT $2"
)

# KEYS: zset. ARGV: score, member, max_items, ttl_s. Adds, trims by rank (lowest scores go
# first; the +inf sentinel never does), gives a new key its TTL.
_ADD = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
local keep = tonumber(ARGV[3]) + 1
if n > keep then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - keep - 1) end
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""


def micros_of(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def cursor_of(entry: Entry) -> Cursor:
    return Cursor(_EPOCH + timedelta(microseconds=entry[0]), entry[1])


def entry_after(cursor: Cursor) -> Entry:
    return (micros_of(cursor.created_at), cursor.id)


class FanoutMode(enum.Enum):
    PUSH = "push"  # write the photo into every follower's timeline
    PULL = "pull"  # celebrity: followers merge the owner's posts when they read


def fanout_mode(followers: int, fanout_limit: int) -> FanoutMode:
    """Above ``fanout_limit`` followers a post is merged at read time instead of pushed."""
    return FanoutMode.PULL if followers > fanout_limit else FanoutMode.PUSH


def merge_entries(
    sources: Iterable[Sequence[Entry]], after: Entry | None, limit: int
) -> tuple[list[Entry], bool]:
    """Newest-first page of the union of ``sources`` strictly older than ``after``.

    Duplicates (the same photo in a timeline and in a celebrity's posts) appear once. Returns
    the page and whether more entries exist past it.
    """
    best: dict[str, int] = {}
    for source in sources:
        for score, photo_id in source:
            if photo_id != SENTINEL and best.get(photo_id, -1) < score:
                best[photo_id] = score
    ordered = sorted(
        ((s, p) for p, s in best.items() if after is None or (s, p) < after), reverse=True
    )
    return ordered[:limit], len(ordered) > limit


@dataclass(frozen=True)
class FeedConfig:
    max_items: int = 500  # entries kept per timeline / per owner's posts
    fanout_limit: int = 1000  # followers above which posts are merged at read time
    fanout_batch: int = 500  # followers per page of a fan-out (one query, one pipeline)
    events_concurrency: int = 32  # photo.posted productions in flight per batch
    ttl_s: int = 14 * 24 * 3600  # an unread timeline expires (and is rebuilt if read again)
    rebuild_followees_max: int = 1000  # followees a rebuild reads
    rebuild_per_followee: int = 50  # newest photos per followee a rebuild reads

    def __post_init__(self) -> None:
        if min(self.max_items, self.fanout_batch, self.events_concurrency) < 1:
            raise ValueError("feed sizes must be >= 1")
        if self.fanout_limit < 0:
            raise ValueError("fanout_limit must be >= 0")


class FeedStore:
    """The Redis side: timelines, owners' posts and the celebrity set over the cache nodes."""

    def __init__(
        self, nodes: Sequence[tuple[str, str, int]], config: FeedConfig | None = None
    ) -> None:
        if not nodes:
            raise ValueError("FeedStore needs at least one cache node")
        self.config = config or FeedConfig()
        self._clients = {
            name: aioredis.Redis(host=h, port=p, socket_timeout=2.0, socket_connect_timeout=1.0)
            for name, h, p in nodes
        }
        self._ring = HashRing(dict.fromkeys(self._clients, 1.0))
        self._add = next(iter(self._clients.values())).register_script(_ADD)

    def __repr__(self) -> str:
        return f"<FeedStore nodes={len(self._clients)}>"

    def node_for(self, key: str) -> str:
        return self._ring.node_for(key)

    def _client(self, key: str) -> aioredis.Redis:
        return self._clients[self._ring.node_for(key)]

    async def add(self, keys: Sequence[str], entry: Entry) -> None:
        """ZADD ``entry`` to every key (bounded, TTL'd): one pipeline per node."""
        by_node: dict[str, list[str]] = {}
        for key in keys:
            by_node.setdefault(self._ring.node_for(key), []).append(key)
        c = self.config

        async def one(node: str, node_keys: list[str]) -> None:
            client = self._clients[node]
            async with client.pipeline(transaction=False) as pipe:
                for key in node_keys:
                    await self._add(
                        keys=[key], args=[entry[0], entry[1], c.max_items, c.ttl_s], client=pipe
                    )
                await pipe.execute()

        await asyncio.gather(*(one(n, k) for n, k in by_node.items()))

    async def remove(self, keys: Sequence[str], photo_id: str) -> None:
        by_node: dict[str, list[str]] = {}
        for key in keys:
            by_node.setdefault(self._ring.node_for(key), []).append(key)

        async def one(node: str, node_keys: list[str]) -> None:
            async with self._clients[node].pipeline(transaction=False) as pipe:
                for key in node_keys:
                    pipe.zrem(key, photo_id)
                await pipe.execute()

        await asyncio.gather(*(one(n, k) for n, k in by_node.items()))

    async def read(self, key: str, after: Entry | None, count: int) -> list[Entry] | None:
        """Up to ``count`` newest entries at or below ``after``'s score; None when the set is
        not complete (no sentinel: lost, expired or never built)."""
        high: float | str = "+inf" if after is None else after[0]
        async with self._client(key).pipeline(transaction=False) as pipe:
            pipe.zscore(key, SENTINEL)
            pipe.zrevrangebyscore(key, high, "-inf", start=0, num=count + 1, withscores=True)
            pipe.expire(key, self.config.ttl_s)
            complete, rows, _ = await pipe.execute()
        if complete is None:
            return None
        return [(int(score), _text(member)) for member, score in rows if _text(member)]

    async def replace(self, key: str, entries: Sequence[Entry]) -> None:
        """Merge a rebuild's entries and mark the set complete (one transaction)."""
        c = self.config
        mapping: dict[str, float] = {p: float(s) for s, p in entries}
        mapping[SENTINEL] = float("inf")
        async with self._client(key).pipeline(transaction=True) as pipe:
            pipe.zadd(key, mapping)
            pipe.zremrangebyrank(key, 0, -(c.max_items + 2))
            pipe.expire(key, c.ttl_s)
            await pipe.execute()

    async def mark_celebrity(self, owner_id: str) -> None:
        await asyncio.gather(*(c.sadd("fc", owner_id) for c in self._clients.values()))

    async def celebrities_near(self, key: str) -> set[str]:
        """The celebrity set as the node holding ``key`` knows it."""
        members = await self._client(key).smembers("fc")
        return {_text(m) for m in members}

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients.values()), return_exceptions=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def timeline_key(user_id: str) -> str:
    return f"ft:{user_id}"


def posts_key(owner_id: str) -> str:
    return f"fp:{owner_id}"


Produce = Callable[[str, str, dict[str, Any], str], Awaitable[object]]


class FeedService:
    """The feed's domain side on the app node: fan-out, reads, rebuilds, removal."""

    def __init__(
        self,
        router: ShardRouter[Pool],
        photos: PhotoStore,
        events: EventStore,
        store: FeedStore,
    ) -> None:
        self._router = router
        self._photos = photos
        self._events = events
        self.store = store
        self.config = store.config

    async def followers_count(self, owner_id: str) -> int:
        pool = self._router.shard_for("social", owner_id)
        rows = await pool.fetch(_FOLLOWERS_COUNT, [owner_id])
        return int(rows[0]["n"]) if rows else 0

    async def followers_page(self, owner_id: str, after: str, limit: int) -> list[str]:
        pool = self._router.shard_for("social", owner_id)
        rows = await pool.fetch(_FOLLOWERS_PAGE, owner_id, after, limit)
        return [r["other"] for r in rows if r["user_id"] == owner_id]

    async def begin_fanout(self, photo: dict[str, Any]) -> FanoutMode:
        """Record the post in its owner's posts and decide push or pull (idempotent)."""
        owner = photo["owner_id"]
        entry = _entry_of(photo)
        await self.store.add([posts_key(owner)], entry)
        mode = fanout_mode(await self.followers_count(owner), self.config.fanout_limit)
        if mode is FanoutMode.PULL:
            await self.store.mark_celebrity(owner)
        return mode

    async def fanout_page(self, photo: dict[str, Any], after: str) -> str | None:
        """Push ``photo`` into one page of followers' timelines and produce their
        ``photo.posted`` events. Returns the cursor of the next page, or None when done.
        Idempotent: ZADD of the same member, events deduplicated by photo id."""
        c = self.config
        followers = await self.followers_page(photo["owner_id"], after, c.fanout_batch)
        if not followers:
            return None
        await self.store.add([timeline_key(f) for f in followers], _entry_of(photo))
        data = {"photo": photo}
        key = f"photo.posted:{photo['id']}"
        for start in range(0, len(followers), c.events_concurrency):
            await asyncio.gather(
                *(
                    self._events.produce(f, "photo.posted", data, dedupe_key=key)
                    for f in followers[start : start + c.events_concurrency]
                )
            )
        return followers[-1] if len(followers) == c.fanout_batch else None

    async def remove_photo(self, owner_id: str, photo_id: str) -> int:
        """Drop a deleted photo from its owner's posts and every follower's timeline."""
        await self.store.remove([posts_key(owner_id)], photo_id)
        after, removed = "", 0
        while True:
            followers = await self.followers_page(owner_id, after, self.config.fanout_batch)
            if not followers:
                return removed
            await self.store.remove([timeline_key(f) for f in followers], photo_id)
            removed += len(followers)
            after = followers[-1]

    async def read(
        self, user_id: str, limit: int, after: Cursor | None
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """One page of ``user_id``'s feed: ready photos of followed users, newest first."""
        start = entry_after(after) if after is not None else None
        count = limit + 1
        timeline = await self.store.read(timeline_key(user_id), start, count)
        if timeline is None:
            timeline = await self.rebuild_timeline(user_id, start, count)
        sources: list[Sequence[Entry]] = [timeline]
        for celeb in await self._celebrities_followed(user_id):
            sources.append(await self._posts(celeb, start, count))
        page, more = merge_entries(sources, start, limit)
        photos = await asyncio.gather(*(self._ready_photo(p) for _, p in page))
        items = [p for p in photos if p is not None]
        return items, cursor_of(page[-1]) if more and page else None

    async def _celebrities_followed(self, user_id: str) -> list[str]:
        celebs = await self.store.celebrities_near(timeline_key(user_id))
        celebs.discard(user_id)
        if not celebs:
            return []
        pool = self._router.shard_for("social", user_id)
        rows = await pool.fetch(_FOLLOWED_AMONG, [user_id], sorted(celebs))
        return [r["other"] for r in rows]

    async def _posts(self, owner_id: str, after: Entry | None, count: int) -> list[Entry]:
        found = await self.store.read(posts_key(owner_id), after, count)
        if found is not None:
            return found
        entries = await self._recent_ready(owner_id, self.config.max_items)
        await self.store.replace(posts_key(owner_id), entries)
        return [e for e in entries if after is None or e < after][:count]

    async def _recent_ready(self, owner_id: str, limit: int) -> list[Entry]:
        page = await self._photos.list_photos(owner_id, limit, None)
        return [_entry_of(p) for p in page.items if p["status"] == "ready"]

    async def rebuild_timeline(
        self, user_id: str, after: Entry | None = None, count: int | None = None
    ) -> list[Entry]:
        """Rebuild ``user_id``'s timeline from the photos shards (the source of truth): the
        newest ready photos of up to ``rebuild_followees_max`` followees. Returns the entries
        older than ``after`` (``count`` of them) for the read that asked."""
        c = self.config
        pool = self._router.shard_for("social", user_id)
        rows = await pool.fetch(_FOLLOWEES, user_id, c.rebuild_followees_max)
        followees = [r["other"] for r in rows]
        gate = asyncio.Semaphore(8)

        async def recent(owner: str) -> list[Entry]:
            async with gate:
                return await self._recent_ready(owner, c.rebuild_per_followee)

        found = await asyncio.gather(*(recent(f) for f in followees))
        entries, _ = merge_entries(found, None, c.max_items)
        await self.store.replace(timeline_key(user_id), entries)
        older = [e for e in entries if after is None or e < after]
        return older if count is None else older[:count]

    async def _ready_photo(self, photo_id: str) -> dict[str, Any] | None:
        from ._photos import PhotoNotFoundError

        try:
            photo = await self._photos.get_photo(photo_id)
        except PhotoNotFoundError:
            return None  # deleted since it was fanned out
        return photo if photo["status"] == "ready" else None


def _entry_of(photo: dict[str, Any]) -> Entry:
    return (micros_of(datetime.fromisoformat(photo["created_at"])), photo["id"])
