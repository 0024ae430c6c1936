"""Coherence of the app nodes' local caches: invalidations over pub/sub on the cache nodes.

Every app node subscribes to one channel on *every* cache node; a write publishes the keys it
changed to every cache node it can reach, so one dead cache node loses no invalidation. Each
subscriber drops the keys from its local cache (its own messages are skipped: the writer already
dropped them). Delivery is at most once per connection: when a subscription breaks (the node
died or the path did), messages may have been missed, so the subscriber calls ``on_gap`` (the
app flushes its local cache) once it is subscribed again. What is left unbounded by this —
a message lost while every subscription looked healthy — is bounded by the local TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["BusStats", "InvalidationBus", "decode_message", "encode_message"]

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "ps:cache:invalidate"
_RETRY_S = 0.25
_POLL_S = 1.0


def encode_message(origin: str, keys: Sequence[str]) -> bytes:
    return json.dumps({"o": origin, "k": list(keys)}, separators=(",", ":")).encode()


def decode_message(data: bytes | str) -> tuple[str, list[str]] | None:
    """(origin, keys), or None for a message that is not ours."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("o"), str):
        return None
    keys = raw.get("k")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    return raw["o"], keys


@dataclass
class BusStats:
    published: int = 0  # messages handed to at least one node
    publish_failures: int = 0  # (message, node) pairs that failed
    received: int = 0  # messages from other origins applied
    gaps: int = 0  # subscriptions that broke and came back (local cache flushed)


class InvalidationBus:
    """``nodes``: (name, host, port) of every cache node. ``on_keys(keys)`` runs for every
    invalidation from another origin; ``on_gap()`` after a broken subscription is restored."""

    def __init__(
        self,
        nodes: Sequence[tuple[str, str, int]],
        *,
        origin: str,
        on_keys: Callable[[list[str]], None],
        on_gap: Callable[[], None],
        channel: str = DEFAULT_CHANNEL,
        publish_timeout_s: float = 0.5,
    ) -> None:
        self._origin = origin
        self._on_keys = on_keys
        self._on_gap = on_gap
        self._channel = channel
        self._timeout = publish_timeout_s
        self._clients: dict[str, Any] = {
            name: aioredis.Redis(
                host=host,
                port=port,
                socket_connect_timeout=0.25,
                protocol=2,
                retry=Retry(NoBackoff(), 0),
            )
            for name, host, port in nodes
        }
        self._subscribed: dict[str, bool] = dict.fromkeys(self._clients, False)
        self._ready: dict[str, asyncio.Event] = {n: asyncio.Event() for n in self._clients}
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = BusStats()

    def __repr__(self) -> str:
        up = sum(self._subscribed.values())
        return f"<InvalidationBus {self._origin} subscribed={up}/{len(self._clients)}>"

    async def start(self, ready_timeout_s: float = 2.0) -> None:
        """Subscribe everywhere; waits (bounded) for the subscriptions that can be made now."""
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(name), name=f"inval-{name}")
            for name in self._clients
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ready_timeout_s):
                await asyncio.gather(*(e.wait() for e in self._ready.values()))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def subscribed(self) -> dict[str, bool]:
        return dict(self._subscribed)

    async def publish(self, keys: Iterable[str]) -> int:
        """Publish ``keys`` on every node whose subscription is alive (on every node when none
        is); returns how many nodes took the message."""
        keys = list(keys)
        if not keys:
            return 0
        message = encode_message(self._origin, keys)
        names = [n for n, ok in self._subscribed.items() if ok] or list(self._clients)
        results = await asyncio.gather(*(self._publish_on(n, message) for n in names))
        took = sum(results)
        if took:
            self.stats.published += 1
        return took

    async def _publish_on(self, name: str, message: bytes) -> int:
        try:
            async with asyncio.timeout(self._timeout):
                await self._clients[name].publish(self._channel, message)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.publish_failures += 1
            log.warning("invalidation not published on %s: %r", name, exc)
            return 0
        return 1

    async def _subscribe_forever(self, name: str) -> None:
        lost = False
        while True:
            pubsub = self._clients[name].pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed[name] = True
                self._ready[name].set()
                if lost:  # messages may have gone by while we were not listening
                    self.stats.gaps += 1
                    self._on_gap()
                    lost = False
                while True:
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except (RedisError, OSError) as exc:
                if self._subscribed[name]:
                    log.warning("invalidation subscription to %s lost: %r", name, exc)
                self._subscribed[name] = False
                lost = True
                self._ready[name].set()  # start() must not wait for a node that is down
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(_RETRY_S)

    def _deliver(self, data: bytes | str) -> None:
        decoded = decode_message(data)
        if decoded is None:
            return
        origin, keys = decoded
        if origin == self._origin:
            return
        self.stats.received += 1
        self._on_keys(keys)
