"""Local fan-out: the connections one process holds, grouped by key, woken by a notifier.

The hub owns no socket. A transport opens a :class:`Subscription` for a key and a starting seq,
then loops on :meth:`Subscription.next_events`; the hub offers live events (from the notifier) to
every subscription of the key, and each subscription reads the log itself whenever its cursor
says so (new connection, gap, resync, resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._cursor import CloseReason, DeliveryCursor
from ._errors import HubDrainingError, HubFullError, LogUnavailableError
from ._model import Event, EventLog

__all__ = ["Hub", "HubConfig", "Notifier", "Pusher", "Subscription"]

log = logging.getLogger(__name__)

_RESYNC_CONCURRENCY = 16  # log reads in flight per resync round


class Notifier(Protocol):
    """Pub/sub seen from one process: which keys it wants to hear about."""

    async def subscribe(self, key: str) -> None:
        """Ask for ``key``'s live events; returns once they flow. Raises NotifierUnavailableError.

        The request is queued before the first await, so calls take effect in call order.
        """
        ...

    def unsubscribe(self, key: str) -> None:
        """Stop hearing about ``key`` (queued in call order; no need to wait)."""
        ...


class Pusher(Protocol):
    """A connection's synchronous write path, for live events that need no buffering.

    While a caught-up subscription waits for events, the hub writes a broadcast straight to
    its pusher instead of buffering it and waking the connection's task. ``encode`` must be the
    same function for every pusher of a kind: the hub encodes each broadcast once per kind and
    shares the bytes. ``writable`` says whether a write now would go out without waiting
    (otherwise the event takes the buffered path, with its send deadline).
    """

    @property
    def encode(self) -> Callable[[Sequence[Event]], bytes]: ...

    def writable(self) -> bool: ...

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class HubConfig:
    max_connections: int = 12_000  # per process; above it opening raises HubFullError (503)
    max_buffered_events: int = 256  # per connection; a caught-up consumer past it is cut off
    max_batch_events: int = 100  # events handed to a transport per write
    resync_interval_s: float = 30.0  # one fresh log read per key this often (lost pub/sub)
    read_retry_s: float = 1.0  # after a failed log read
    retry_after_s: int = 1  # what 503 answers say


class Subscription:
    """One connection's view of one key. Use it from one task only."""

    def __init__(self, hub: Hub, key: str, after: int) -> None:
        self._hub = hub
        self.key = key
        self.cursor = DeliveryCursor(after, max_buffered=hub.config.max_buffered_events)
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._pusher: Pusher | None = None
        self.pusher: Pusher | None = None  # set only while the driver waits (see next_events)

    def __repr__(self) -> str:
        return f"<Subscription {self.key} {self.cursor!r}>"

    @property
    def is_open(self) -> bool:
        return self.cursor.is_open

    def wake(self) -> None:
        self._wake.set()

    def attach(self, pusher: Pusher | None) -> None:
        """Let the hub write live events straight to ``pusher`` while the driver waits."""
        self._pusher = pusher

    def close(self, reason: CloseReason = CloseReason.CLIENT_GONE) -> None:
        """Leave the hub (idempotent)."""
        self.cursor.close(reason)
        self.pusher = self._pusher = None
        self._wake.set()
        if not self._closed:
            self._closed = True
            self._hub._forget(self)

    async def prime(self) -> list[Event]:
        """The first log read, at once. Raises LogUnavailableError (answer 503 before streaming)."""
        if self.cursor.needs_read:
            await self._read(raise_errors=True)
        return self.cursor.take(self._hub.config.max_batch_events)

    async def next_events(self, timeout_s: float) -> list[Event]:
        """The next events to send, in seq order; [] after ``timeout_s`` with none, or once closed.

        Reads the log when the cursor needs it; a failed read is retried after ``read_retry_s``.
        """
        loop = self._loop
        deadline = loop.time() + timeout_s
        config = self._hub.config
        while self.cursor.is_open:
            if self.cursor.needs_read and not await self._read(raise_errors=False):
                await self._pause(min(config.read_retry_s, deadline - loop.time()))
                if loop.time() >= deadline:
                    return []
                continue
            events = self.cursor.take(config.max_batch_events)
            if events:
                return events
            if self.cursor.needs_read:
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self._wake.clear()
            self.pusher = self._pusher  # nothing pending and caught up: the hub may write
            try:
                await self._pause(remaining)
            finally:
                self.pusher = None
        return []

    def sent(self, events: list[Event]) -> None:
        self.cursor.sent(events)

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _read(self, *, raise_errors: bool) -> bool:
        fresh = self.cursor.read_is_fresh
        after, limit = self.cursor.begin_read()
        try:
            read = await self._hub.log.read(self.key, after, limit=limit, fresh=fresh)
        except LogUnavailableError:
            self.cursor.end_read(None)
            if raise_errors:
                raise
            log.warning("event log unavailable for %s", self.key)
            return False
        except BaseException:
            self.cursor.end_read(None)
            raise
        self.cursor.end_read(read)
        return True


def _encoded(
    encode: Callable[[Sequence[Event]], bytes],
    fresh: Sequence[Event],
    events: Sequence[Event],
    frames: dict[Callable[[Sequence[Event]], bytes], bytes],
) -> bytes:
    """``encode(fresh)``, shared by every connection that takes the whole broadcast."""
    if len(fresh) != len(events):
        return encode(fresh)
    data = frames.get(encode)
    if data is None:
        data = frames[encode] = encode(fresh)
    return data


class _Topic:
    __slots__ = ("ready", "subs")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.subs: set[Subscription] = set()
        self.ready = ready


class Hub:
    """The connections of one process, by key, with a connection limit and a drain."""

    def __init__(
        self, log: EventLog, config: HubConfig | None = None, *, notifier: Notifier | None = None
    ) -> None:
        self.log = log
        self.config = config or HubConfig()
        self.notifier = notifier
        self._topics: dict[str, _Topic] = {}
        self._count = 0
        self._draining = False
        self._on_change: list[Callable[[int], None]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._resync_task: asyncio.Task[None] | None = None
        self.pushed = 0  # deliveries written straight to a pusher (no buffer, no wake-up)
        self.woken = 0  # deliveries that buffered and woke a connection's task

    def __repr__(self) -> str:
        state = "draining" if self._draining else "open"
        return f"<Hub {state} connections={self._count} keys={len(self._topics)}>"

    @property
    def connections(self) -> int:
        return self._count

    @property
    def keys(self) -> int:
        return len(self._topics)

    @property
    def is_draining(self) -> bool:
        return self._draining

    def watch(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(connections)`` whenever the count changes (for a gauge)."""
        self._on_change.append(callback)

    async def open(self, key: str, after: int) -> Subscription:
        """A new subscription, live once this returns.

        Raises HubFullError at the connection limit, HubDrainingError while draining,
        NotifierUnavailableError when pub/sub cannot confirm the key.
        """
        if self._draining:
            raise HubDrainingError("the node is draining", self.config.retry_after_s)
        if self._count >= self.config.max_connections:
            raise HubFullError(self.config.max_connections, self.config.retry_after_s)
        sub = Subscription(self, key, after)
        topic = self._topics.get(key)
        if topic is None:
            topic = _Topic(asyncio.get_running_loop().create_future())
            self._topics[key] = topic
            if self.notifier is None:
                topic.ready.set_result(None)
            else:
                task = asyncio.ensure_future(self._subscribe(key, topic))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        topic.subs.add(sub)
        self._changed(+1)
        try:
            await asyncio.shield(topic.ready)
        except BaseException:
            sub.close()
            raise
        return sub

    async def _subscribe(self, key: str, topic: _Topic) -> None:
        assert self.notifier is not None
        try:
            await self.notifier.subscribe(key)
        except BaseException as exc:
            if not topic.ready.done():
                topic.ready.set_exception(exc)
                topic.ready.exception()  # retrieved: waiters re-raise it
            if self._topics.get(key) is topic:
                del self._topics[key]
            if not isinstance(exc, Exception):
                raise
        else:
            if not topic.ready.done():
                topic.ready.set_result(None)

    def _forget(self, sub: Subscription) -> None:
        topic = self._topics.get(sub.key)
        if topic is None or sub not in topic.subs:
            self._changed(-1)
            return
        topic.subs.discard(sub)
        self._changed(-1)
        if not topic.subs:
            del self._topics[sub.key]
            ready = topic.ready
            subscribed = ready.done() and not ready.cancelled() and ready.exception() is None
            if self.notifier is not None and subscribed:
                self.notifier.unsubscribe(sub.key)

    def _changed(self, delta: int) -> None:
        self._count += delta
        for callback in self._on_change:
            callback(self._count)

    def deliver(self, key: str, events: Sequence[Event]) -> None:
        """Live events of ``key`` (seq order) for every local subscription of it."""
        topic = self._topics.get(key)
        if topic is None:
            return
        frames: dict[Callable[[Sequence[Event]], bytes], bytes] = {}  # one encoding per kind
        broken: list[Subscription] = []
        for sub in topic.subs:
            pusher = sub.pusher
            if pusher is not None and pusher.writable():
                fresh = sub.cursor.push(events)
                if fresh is not None:
                    if fresh:
                        try:
                            pusher.write(_encoded(pusher.encode, fresh, events, frames))
                        except (OSError, RuntimeError):
                            broken.append(sub)  # the connection broke under us: it is gone
                        else:
                            self.pushed += 1
                    continue
            if sub.cursor.offer(events):
                sub.wake()
                self.woken += 1
        for sub in broken:
            sub.close(CloseReason.CLIENT_GONE)

    def resync(self, keys: Iterable[str] | None = None) -> None:
        """Re-read the log of ``keys`` (all when None) soon: pub/sub was interrupted."""
        chosen = list(self._topics) if keys is None else [k for k in keys if k in self._topics]
        task = asyncio.ensure_future(self._resync_keys(chosen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync_keys(self, keys: list[str]) -> None:
        """One fresh read per key after its most advanced subscription; news is delivered like
        a live event (subscriptions further behind see a gap and read for themselves)."""
        for start in range(0, len(keys), _RESYNC_CONCURRENCY):
            await asyncio.gather(
                *(self._resync_key(k) for k in keys[start : start + _RESYNC_CONCURRENCY])
            )

    async def _resync_key(self, key: str) -> None:
        topic = self._topics.get(key)
        if topic is None or not topic.subs:
            return
        after = max(sub.cursor.position for sub in topic.subs)
        try:
            read = await self.log.read(key, after, limit=self.config.max_batch_events, fresh=True)
        except LogUnavailableError:
            return  # the next round tries again
        if read.events:
            self.deliver(key, read.events)
        if read.more:
            for sub in topic.subs:
                sub.cursor.resync()
                sub.wake()

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval_s)
            await self._resync_keys(list(self._topics))

    def start(self) -> None:
        """Start the periodic resync (catches publications pub/sub lost)."""
        if self._resync_task is None:
            self._resync_task = asyncio.create_task(self._resync_forever(), name="hub-resync")

    async def aclose(self) -> None:
        """Drain, and stop background work."""
        self.drain()
        tasks = [t for t in (self._resync_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resync_task = None

    def subscribed_keys(self) -> list[str]:
        return [key for key, topic in self._topics.items() if topic.ready.done()]

    def drain(self) -> int:
        """Refuse new subscriptions and close every open one with DRAINING; returns how many."""
        self._draining = True
        closed = 0
        for topic in list(self._topics.values()):
            for sub in list(topic.subs):
                if sub.cursor.is_open:
                    sub.cursor.close(CloseReason.DRAINING)
                    closed += 1
                sub.wake()
        return closed
