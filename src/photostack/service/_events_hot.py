"""The hot copy of each user's event log (a capped Redis list) and its publication.

Failure behaviour (docs/realtime.md "When a push fails"): the log commit is the
acknowledgement; the push that follows it can fail (timeout, reset, node briefly down). Two
things keep the committed event from being hidden behind a hot list that stops just before it:

- **A pending marker, written before the commit.** :meth:`HotEvents.begin` adds a token to the
  user's ``pending`` sorted set (score: wall time) in the same Redis round trip budget as any
  other call; the push script removes it. While a user has a token, *every* reader on *every*
  app node skips the list and reads the log. A token older than ``repair_after_s`` belongs to a
  producer that died (or whose pushes keep failing): the reader that sees it repairs the list
  from the log tail in the background (pushing, hence publishing, what is missing) and removes
  the stale tokens.
- **Local retry.** A failed push is queued and retried with back-off (the script ignores a seq
  it already has, so retries are idempotent); until it lands, this node's reads of the user go
  to the log without asking Redis.

A hot read stays one Redis round trip (LRANGE + the oldest pending token, pipelined), never a
Postgres query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from photostack.blocks.realtime import Event, LogRead, channel_for
from photostack.blocks.storage import HashModPartitioner

__all__ = ["EventRetention", "HotEvents", "TailReader"]

log = logging.getLogger(__name__)

TailReader = Callable[[str, int], Awaitable[Sequence[Event]]]

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
_MAX_QUEUED_PER_USER = 1000  # failed pushes kept per user (older ones only lose their publish)
_MAX_QUEUED_USERS = 10_000  # beyond it a failed push is not queued: its marker goes stale


@dataclass(frozen=True)
class EventRetention:
    keep_count: int = 1000  # newest events kept per user
    keep_age_s: float = 7 * 24 * 3600.0
    hot_count: int = 100  # newest events kept in the user's Redis list
    hot_ttl_s: int = 24 * 3600
    trim_batch: int = 1000  # rows per age-trim statement
    trim_batches_max: int = 10  # statements per shard per cleanup run (bounded work)


# KEYS: list, last-seq, pending. ARGV: seq, body, hot_count, ttl_s, channel, token.
# Clears the producer's pending token, then appends only when the list continues (else restarts
# it at this event) so the list is always gap-free, then publishes. A seq the list already
# passed is a no-op (a retry, or a repair racing the producer).
_PUSH_AND_PUBLISH = """
if ARGV[6] ~= '' then redis.call('ZREM', KEYS[3], ARGV[6]) end
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
        self,
        nodes: Sequence[tuple[str, int]],
        retention: EventRetention,
        *,
        prefix: str = "ev:",
        repair_after_s: float = 5.0,
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
        # A pending token older than this is a dead producer's: readers repair the list.
        self.repair_after_s = repair_after_s
        self.tail_reader: TailReader | None = None  # the log tail, for repairs (EventStore)
        self._unpushed: dict[str, deque[tuple[Event, str]]] = {}  # failed pushes, seq order
        self._retry_task: asyncio.Task[None] | None = None
        self._repairing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.retried = 0  # pushes that failed and later landed
        self.repaired = 0  # lists repaired from the log after a stale pending token

    def __repr__(self) -> str:
        return f"<HotEvents nodes={len(self._clients)} unpushed={len(self._unpushed)}>"

    def node_for(self, user_id: str) -> int:
        return self._partitioner.shard_for(user_id)

    def _keys(self, user_id: str) -> list[str]:
        p = f"{self._prefix}{user_id}"
        return [p, f"{p}:last", f"{p}:pending"]

    def _client(self, user_id: str) -> aioredis.Redis:
        return self._clients[self.node_for(user_id)]

    @property
    def unpushed_users(self) -> int:
        return len(self._unpushed)

    async def begin(self, user_id: str) -> str:
        """Mark ``user_id``'s list as possibly behind, before the log commit. Returns the token
        to hand to :meth:`push_and_publish`. A failure is logged: then only this node knows
        (through its retry queue) until the push lands."""
        token = uuid.uuid4().hex
        pending = self._keys(user_id)[2]
        try:
            async with self._client(user_id).pipeline(transaction=False) as pipe:
                pipe.zadd(pending, {token: time.time()})
                pipe.expire(pending, self._retention.hot_ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("pending marker for %s not written: %r", user_id, exc)
        return token

    def abandon(self, user_id: str, token: str) -> None:
        """The append certainly did not commit (rolled back): drop its token, in the background.
        (If this fails, the token goes stale and a reader repairs; nothing is hidden.)"""
        self._spawn(self._zrem(user_id, token))

    async def _zrem(self, user_id: str, token: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client(user_id).zrem(self._keys(user_id)[2], token)

    async def _push(self, user_id: str, event: Event, token: str) -> bool:
        r = self._retention
        try:
            await self._script(
                keys=self._keys(user_id),
                args=[event.seq, event.body, r.hot_count, r.hot_ttl_s, channel_for(user_id), token],
                client=self._client(user_id),
            )
        except (RedisError, OSError) as exc:
            log.warning("event %s/%d not published: %r", user_id, event.seq, exc)
            return False
        return True

    async def push_and_publish(self, user_id: str, event: Event, token: str = "") -> bool:
        """Append to the hot list and publish (clearing ``token``). On failure (logged) the push
        is queued for retry and False is returned; the event is committed either way."""
        if await self._push(user_id, event, token):
            return True
        queue = self._unpushed.get(user_id)
        if queue is None:
            if len(self._unpushed) >= _MAX_QUEUED_USERS:
                log.warning("retry queue full: %s/%d left to the repair", user_id, event.seq)
                return False
            queue = self._unpushed[user_id] = deque(maxlen=_MAX_QUEUED_PER_USER)
        queue.append((event, token))
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_forever(), name="event-push-retry")
        return False

    async def _retry_forever(self) -> None:
        """Retry every queued push, in seq order per user, with back-off until all landed."""
        delay = _RETRY_FIRST_S
        while self._unpushed:
            await asyncio.sleep(delay)
            down: set[int] = set()  # nodes that failed this round: skip their other users
            for user_id in list(self._unpushed):
                queue = self._unpushed[user_id]
                while queue and self.node_for(user_id) not in down:
                    event, token = queue[0]
                    if not await self._push(user_id, event, token):
                        down.add(self.node_for(user_id))
                        break
                    queue.popleft()
                    self.retried += 1
                if not queue:
                    del self._unpushed[user_id]
            delay = min(delay * 2, _RETRY_MAX_S)

    async def read(self, user_id: str, after: int, limit: int) -> LogRead | None:
        """Events after ``after`` when the list provably covers them; else None (ask the log)."""
        if user_id in self._unpushed:
            return None  # this node knows the list is behind
        list_key, _, pending = self._keys(user_id)
        try:
            async with self._client(user_id).pipeline(transaction=False) as pipe:
                pipe.lrange(list_key, 0, -1)
                pipe.zrange(pending, 0, 0, withscores=True)
                raw, oldest = await pipe.execute()
        except (RedisError, OSError):
            return None
        if oldest:
            stale_before = time.time() - self.repair_after_s
            if float(oldest[0][1]) < stale_before:
                self._repair_soon(user_id, stale_before)
            return None  # an append is (or was) in flight: the list may lack it
        if not raw:
            return None
        events = [Event.from_json(item) for item in raw]
        if events[0].seq > after + 1:
            return None  # the list starts later than asked: only the log has the rest
        newer = [e for e in events if e.seq > after]
        return LogRead(tuple(newer[:limit]), more=len(newer) > limit)

    def _repair_soon(self, user_id: str, stale_before: float) -> None:
        if user_id in self._repairing or self.tail_reader is None:
            return
        self._repairing.add(user_id)
        self._spawn(self._repair(user_id, stale_before))

    async def _repair(self, user_id: str, stale_before: float) -> None:
        """Push the log's tail (no-ops for what the list has), then drop the stale tokens.

        Tokens are dropped only after the tail read: any append they stood for that committed
        before it is in the tail; one still in flight is pushed by its own (live) producer."""
        assert self.tail_reader is not None
        try:
            tail = await self.tail_reader(user_id, self._retention.hot_count)
            for event in tail:
                if not await self._push(user_id, event, ""):
                    return
            pending = self._keys(user_id)[2]
            await self._client(user_id).zremrangebyscore(pending, "-inf", stale_before)
            self.repaired += 1
            log.info("hot events of %s repaired from the log (%d events)", user_id, len(tail))
        except (RedisError, OSError) as exc:
            log.warning("hot events of %s not repaired: %r", user_id, exc)
        except Exception:
            log.exception("hot events of %s not repaired", user_id)
        finally:
            self._repairing.discard(user_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        tasks = [t for t in (self._retry_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._unpushed:
            log.warning("closing with %d users' pushes not retried", len(self._unpushed))
        await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
