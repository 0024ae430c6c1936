"""Pub/sub over Redis: one connection per cache node per process, SUBSCRIBE as keys come and go.

Each key lives on one node (``node_for(key)``, the same choice the publisher makes). A channel's
messages are events (``Event`` JSON); they reach ``on_events``. After a reconnect every channel
is subscribed again and, once Redis confirmed them all, ``on_resync`` is told the node's keys:
whatever was published meanwhile is in the log, and the readers re-read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._errors import MalformedEventError, NotifierUnavailableError
from ._model import Event

__all__ = ["RedisNotifier", "RedisNotifierConfig", "channel_for"]

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "rt:"


def channel_for(key: str, prefix: str = CHANNEL_PREFIX) -> str:
    """The pub/sub channel of ``key`` (publishers and subscribers must agree)."""
    return prefix + key


@dataclass(frozen=True)
class RedisNotifierConfig:
    channel_prefix: str = CHANNEL_PREFIX
    confirm_timeout_s: float = 2.0  # a SUBSCRIBE not confirmed in time fails the open (503)
    connect_timeout_s: float = 2.0
    ping_interval_s: float = 5.0  # an idle link sends PING; no answer in 2 intervals: reconnect
    reconnect_max_s: float = 2.0  # back-off cap between reconnect attempts


OnEvents = Callable[[str, Sequence[Event]], None]
OnResync = Callable[[list[str]], None]


class _Link:
    """One cache node: its connection, desired channels and pending confirmations."""

    def __init__(
        self,
        host: str,
        port: int,
        config: RedisNotifierConfig,
        on_events: OnEvents,
        on_resync: OnResync,
    ) -> None:
        self.host, self.port = host, port
        self.config = config
        self.on_events = on_events
        self.on_resync = on_resync
        self.desired: set[str] = set()
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.resubscribing: set[str] = set()
        self.commands: deque[tuple[str, str]] = deque()
        self._has_commands = asyncio.Event()
        self.up = asyncio.Event()
        self.connected = False
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "up" if self.connected else "down"
        return f"<RedisLink {self.host}:{self.port} {state} channels={len(self.desired)}>"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pubsub-{self.host}:{self.port}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_waiting("closed")

    async def subscribe(self, channel: str) -> None:
        if not self.connected:
            raise NotifierUnavailableError(f"pub/sub node {self.host}:{self.port} is down")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(channel, deque()).append(future)
        self.desired.add(channel)
        self._queue("SUBSCRIBE", channel)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.config.confirm_timeout_s)
        except TimeoutError as exc:
            raise NotifierUnavailableError(f"SUBSCRIBE {channel} not confirmed") from exc

    def unsubscribe(self, channel: str) -> None:
        self.desired.discard(channel)
        if self.connected:
            self._queue("UNSUBSCRIBE", channel)

    def _queue(self, op: str, channel: str) -> None:
        self.commands.append((op, channel))
        self._has_commands.set()

    def _fail_waiting(self, why: str) -> None:
        for queue in self.waiting.values():
            for future in queue:
                if not future.done():
                    future.set_exception(NotifierUnavailableError(why))
                    future.exception()
        self.waiting.clear()

    async def _run(self) -> None:
        attempt = 0
        while True:
            client = aioredis.Redis(
                host=self.host,
                port=self.port,
                socket_connect_timeout=self.config.connect_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub()
            try:
                await self._session(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected or attempt == 0:
                    log.warning("pub/sub link %s:%s lost: %r", self.host, self.port, exc)
            finally:
                self.connected = False
                self.up.clear()
                self._fail_waiting("pub/sub connection lost")
                self.resubscribing.clear()
                self.commands.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            attempt += 1
            await asyncio.sleep(min(self.config.reconnect_max_s, 0.05 * 2 ** min(attempt, 10)))

    async def _session(self, pubsub: PubSub) -> None:
        await pubsub.execute_command("PING")  # connects; raises when the node is down
        channels = sorted(self.desired)
        if channels:
            self.resubscribing = set(channels)
            await pubsub.execute_command("SUBSCRIBE", *channels)
        self.connected = True
        self.up.set()
        first = self.reconnects == 0
        self.reconnects += 1
        if not channels and not first:
            self.on_resync([])
        writer = asyncio.create_task(self._write(pubsub))
        reader = asyncio.create_task(self._read(pubsub))
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in (writer, reader):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _write(self, pubsub: PubSub) -> None:
        while True:
            if not self.commands:
                self._has_commands.clear()
                try:
                    async with asyncio.timeout(self.config.ping_interval_s):
                        await self._has_commands.wait()
                except TimeoutError:
                    await pubsub.execute_command("PING")
                continue
            op, channel = self.commands.popleft()
            batch = [channel]
            # Coalesce a burst of the same op (many clients connecting at once) into one command.
            while self.commands and self.commands[0][0] == op and len(batch) < 512:
                batch.append(self.commands.popleft()[1])
            await pubsub.execute_command(op, *batch)

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if message is None:
                if now - last_heard > 3 * self.config.ping_interval_s:
                    raise TimeoutError("pub/sub link silent past its ping interval")
                continue
            last_heard = now
            kind = message["type"]
            if kind in ("message", b"message"):
                self._dispatch(message["channel"], message["data"])
            elif kind in ("subscribe", b"subscribe"):
                self._confirmed(_text(message["channel"]))

    def _confirmed(self, channel: str) -> None:
        if channel in self.resubscribing:
            self.resubscribing.discard(channel)
            if not self.resubscribing:
                prefix = self.config.channel_prefix
                self.on_resync([c[len(prefix) :] for c in self.desired])
            return
        queue = self.waiting.get(channel)
        if not queue:
            return
        future = queue.popleft()
        if not queue:
            del self.waiting[channel]
        if not future.done():
            future.set_result(None)

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = _text(channel)
        prefix = self.config.channel_prefix
        if not name.startswith(prefix):
            return
        try:
            event = Event.from_json(data)
        except MalformedEventError as exc:
            log.warning("ignoring a malformed event on %s: %s", name, exc)
            return
        self.on_events(name[len(prefix) :], (event,))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisNotifier:
    """A :class:`Notifier` over Redis pub/sub on ``nodes`` (host, port); ``node_for`` places keys.

    ``start()`` connects in the background (``subscribe`` raises NotifierUnavailableError until
    a node is up); ``aclose()`` stops.
    """

    def __init__(
        self,
        nodes: Sequence[tuple[str, int]],
        node_for: Callable[[str], int],
        *,
        on_events: OnEvents,
        on_resync: OnResync,
        config: RedisNotifierConfig | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("RedisNotifier needs at least one node")
        self.config = config or RedisNotifierConfig()
        self._node_for = node_for
        self._links = [_Link(host, port, self.config, on_events, on_resync) for host, port in nodes]

    def __repr__(self) -> str:
        return f"<RedisNotifier {self._links!r}>"

    @property
    def links_up(self) -> int:
        return sum(1 for link in self._links if link.connected)

    async def start(self, *, wait_s: float = 0.0) -> None:
        """Start every link; wait up to ``wait_s`` for all of them to connect."""
        for link in self._links:
            link.start()
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await asyncio.gather(*(link.up.wait() for link in self._links))

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self._links))

    def _link(self, key: str) -> _Link:
        return self._links[self._node_for(key)]

    async def subscribe(self, key: str) -> None:
        await self._link(key).subscribe(channel_for(key, self.config.channel_prefix))

    def unsubscribe(self, key: str) -> None:
        self._link(key).unsubscribe(channel_for(key, self.config.channel_prefix))
