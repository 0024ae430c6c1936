"""The distributed cache client: keys placed on cache nodes by our consistent-hash ring.

Client-side routing (not Redis Cluster): every app node holds the same :class:`HashRing` over the
configured cache nodes and a redis-py asyncio pool per node, so the same key always reaches the
same node. The nodes are plain Redis servers or photostack cache nodes (same protocol).

Failure handling, per node (``FailureMode``): an operation that fails with a connection error or
a timeout takes the node DOWN for this client; its keys then go to the next up node on the ring
(``remap``) or are not cached at all (``fail-closed``: reads go to the database). A prober PINGs
down nodes every ``probe_interval_s``; a node gets keys again only after it answered.

No stale read after a flap: each node holds an epoch counter (``epoch_key``); every value is
stored tagged with the epoch the writer knew, and every read is ``MGET epoch key`` (one round
trip), so a value tagged with another epoch than the node's current one is a miss. A client
bumps the epoch when it re-admits a node after a probe, and whenever one of its
connections to the node *re*connects (the node restarted or the path broke, possibly unseen by
this client's operations), so entries written before the flap are never served again — even
from a Redis that restarted with its old data or a node that was only partitioned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from photostack.blocks.cache._ring_routing import (
    FailureMode,
    NodeHealth,
    NodeState,
    Route,
    invalidation_targets,
    route,
)
from photostack.blocks.ring import HashRing

__all__ = ["CacheNodeAddress", "RingCache", "RingCacheConfig", "RingCacheStats"]

log = logging.getLogger(__name__)

# A node failure (the node is down or unreachable), as opposed to a refused command (OOM).
NODE_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)
ANY_ERRORS: tuple[type[Exception], ...] = (*NODE_ERRORS, RedisError)


@dataclass(frozen=True)
class CacheNodeAddress:
    name: str
    host: str
    port: int
    mode: FailureMode = FailureMode.REMAP


@dataclass(frozen=True)
class RingCacheConfig:
    """``op_timeout_s``: one command's deadline (then the node counts as failed).
    ``remap_ttl_s``: the longest TTL of a value stored on a node that is not its owner (it may
    be left behind when the owner comes back). ``vnodes``: ring points per node."""

    op_timeout_s: float = 0.5
    connect_timeout_s: float = 0.25
    probe_interval_s: float = 0.25
    max_connections_per_node: int = 64
    remap_ttl_s: float = 10.0
    epoch_key: str = "ps:cache:epoch"
    vnodes: int = 1024

    def __post_init__(self) -> None:
        if min(self.op_timeout_s, self.connect_timeout_s, self.probe_interval_s) <= 0:
            raise ValueError(f"timeouts must be > 0: {self!r}")
        if self.max_connections_per_node < 1 or self.remap_ttl_s <= 0 or self.vnodes < 1:
            raise ValueError(f"bad ring cache config {self!r}")


@dataclass
class RingCacheStats:
    hits: int = 0
    misses: int = 0
    epoch_misses: int = 0  # found, but written under another epoch: ignored
    remapped: int = 0  # operations served by a node other than the key's owner
    fail_closed: int = 0  # operations skipped because the owner is down and fails closed
    node_errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    epoch_bumps: int = 0


def tag(epoch: int, payload: bytes) -> bytes:
    return b"%d\n%s" % (epoch, payload)


def new_epoch() -> int:
    """A fresh epoch: wall-clock microseconds, so it never repeats an earlier one — not even
    after the epoch key was evicted or lost with a restart (a counter would start over and
    could match the tags of old entries)."""
    return time.time_ns() // 1000


def untag(raw: bytes, epoch: int) -> bytes | None:
    """The payload when ``raw`` was written under ``epoch``, else None."""
    head, sep, payload = raw.partition(b"\n")
    if not sep or not head.isdigit() or int(head) != epoch:
        return None
    return payload


def _epoch(raw: object) -> int:
    """The epoch counter as read; a node without one (fresh or flushed) is at epoch 0."""
    if isinstance(raw, bytes) and raw.isdigit():
        return int(raw)
    return 0


ClientFactory = Callable[[CacheNodeAddress, Callable[[AbstractConnection], Awaitable[None]]], Any]


class RingCache:
    """Bytes by string key over a ring of cache nodes. Never raises for a node failure: a read
    is then a miss, a write is dropped (the database stays the system of record)."""

    def __init__(
        self,
        nodes: Sequence[CacheNodeAddress],
        config: RingCacheConfig | None = None,
        *,
        client_factory: ClientFactory | None = None,
        on_node_state: Callable[[str, NodeState], None] | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("a ring cache needs at least one node")
        self.config = config or RingCacheConfig()
        self.ring = HashRing({n.name: 1.0 for n in nodes}, vnodes=self.config.vnodes)
        self.health = {n.name: NodeHealth(n.name, n.mode) for n in nodes}
        self.addresses = {n.name: n for n in nodes}
        factory = client_factory or self._default_client
        self._clients = {n.name: factory(n, self._connect_hook(n.name)) for n in nodes}
        self._seen: dict[str, weakref.WeakSet[AbstractConnection]] = {
            n.name: weakref.WeakSet() for n in nodes
        }
        self._on_node_state = on_node_state
        self._prober: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.stats = RingCacheStats()

    def __repr__(self) -> str:
        states = ",".join(f"{h.name}={h.state}" for h in self.health.values())
        return f"<RingCache {states}>"

    def client(self, name: str) -> Any:
        """The redis-py client of node ``name`` (for pub/sub and tests)."""
        return self._clients[name]

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn every node's epoch (an unreachable node starts DOWN) and start the prober."""
        await asyncio.gather(*(self._read_epoch(name) for name in self.health))
        self._prober = asyncio.create_task(self._probe_forever(), name="ring-cache-prober")

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for client in self._clients.values():
            with contextlib.suppress(*ANY_ERRORS):
                await client.aclose()

    # -- reads -----------------------------------------------------------------------------------

    def route(self, key: str) -> Route:
        return route(self.ring, self.health, key)

    async def get(self, key: str) -> bytes | None:
        """One key: the MGET path without the per-node fan-out (the hot path)."""
        for _ in range(2):
            where = self.route(key)
            if where.node is None:
                self.stats.fail_closed += 1
                self.stats.misses += 1
                return None
            if where.remapped:
                self.stats.remapped += 1
            found = await self._mget_on(where.node, [key])
            if found is not None:
                return found.get(key)
        return None

    async def mget(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The keys found (fresh under their node's epoch); one MGET per node, in parallel.
        Keys whose node fails are retried once on their new route (remap) or skipped."""
        pending = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        for _ in range(2):  # the second round serves keys of a node that failed in the first
            groups = self._group(pending)
            if not groups:
                break
            results = await asyncio.gather(*(self._mget_on(n, ks) for n, ks in groups.items()))
            pending = []
            for group, result in zip(groups.values(), results, strict=True):
                if result is None:
                    pending.extend(group)
                else:
                    found.update(result)
        return found

    def _group(self, keys: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            where = self.route(key)
            if where.node is None:
                self.stats.fail_closed += 1
                self.stats.misses += 1
                continue
            if where.remapped:
                self.stats.remapped += 1
            groups[where.node].append(key)
        return groups

    async def _mget_on(self, name: str, keys: list[str]) -> dict[str, bytes] | None:
        """None when the node failed (it is now down)."""
        try:
            raw = await self._call(name, "mget", self.config.epoch_key, *keys)
        except NODE_ERRORS as exc:
            self._failed(name, exc)
            return None
        except RedisError as exc:
            log.warning("cache node %s refused MGET: %r", name, exc)
            self.stats.misses += len(keys)
            return {}
        epoch = _epoch(raw[0])
        self.health[name].epoch = epoch  # what later writes are tagged with
        out: dict[str, bytes] = {}
        for key, value in zip(keys, raw[1:], strict=True):
            payload = untag(value, epoch) if value is not None else None
            if payload is None:
                self.stats.misses += 1
                if value is not None:
                    self.stats.epoch_misses += 1
            else:
                self.stats.hits += 1
                out[key] = payload
        return out

    # -- writes ----------------------------------------------------------------------------------

    async def set(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Store ``value`` for ``ttl_s`` on the key's node. False when it was not stored."""
        for _ in range(2):
            where = self.route(key)
            if where.node is None:
                self.stats.fail_closed += 1
                return False
            ttl = min(ttl_s, self.config.remap_ttl_s) if where.remapped else ttl_s
            epoch = self.health[where.node].epoch
            try:
                await self._call(
                    where.node, "set", key, tag(epoch, value), px=max(1, int(ttl * 1000))
                )
            except NODE_ERRORS as exc:
                self._failed(where.node, exc)
                continue
            except RedisError as exc:  # OOM under noeviction, and the like: not cached
                log.warning("cache node %s refused SET: %r", where.node, exc)
                return False
            return True
        return False

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` wherever they may live: on the owner and on the owner's successor
        (the remap target), on every up node among those."""
        per_node: dict[str, list[str]] = defaultdict(list)
        for key in dict.fromkeys(keys):
            for name in invalidation_targets(self.ring, self.health, key):
                per_node[name].append(key)
        await asyncio.gather(*(self._delete_on(n, ks) for n, ks in per_node.items()))

    async def _delete_on(self, name: str, keys: list[str]) -> None:
        try:
            await self._call(name, "delete", *keys)
        except NODE_ERRORS as exc:
            self._failed(name, exc)
        except RedisError as exc:
            log.warning("cache node %s refused DEL: %r", name, exc)

    # -- health ----------------------------------------------------------------------------------

    async def _call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        # The deadline is the connection's socket timeout (op_timeout_s), the pool's wait
        # timeout and the connect timeout: no wait_for task per command on the hot path.
        return await getattr(self._clients[name], method)(*args, **kwargs)

    def _failed(self, name: str, exc: BaseException) -> None:
        self.stats.node_errors[name] += 1
        if self.health[name].fail():
            log.warning("cache node %s down: %r", name, exc)
            self._changed(name, NodeState.DOWN)
            self._wake.set()

    def _changed(self, name: str, state: NodeState) -> None:
        if self._on_node_state is not None:
            self._on_node_state(name, state)

    async def _read_epoch(self, name: str) -> None:
        try:
            self.health[name].epoch = _epoch(await self._call(name, "get", self.config.epoch_key))
        except ANY_ERRORS as exc:
            self._failed(name, exc)

    async def probe(self, name: str) -> bool:
        """Probe one down node: PING, then bump its epoch; up again only if both worked."""
        health = self.health[name]
        if health.state is not NodeState.DOWN:
            return health.up
        health.to(NodeState.PROBING)
        try:
            pong = await self._call(name, "ping")
            epoch = new_epoch()
            await self._call(name, "set", self.config.epoch_key, epoch)
        except ANY_ERRORS:
            health.to(NodeState.DOWN)
            return False
        if not pong:
            health.to(NodeState.DOWN)
            return False
        self.stats.epoch_bumps += 1
        self._seen[name] = weakref.WeakSet()  # bumped for this flap: reconnects need not
        health.epoch = epoch
        health.to(NodeState.UP)
        log.info("cache node %s back at epoch %d", name, epoch)
        self._changed(name, NodeState.UP)
        return True

    async def _probe_forever(self) -> None:
        while True:
            self._wake.clear()
            down = [h.name for h in self.health.values() if h.state is NodeState.DOWN]
            if down:
                await asyncio.gather(*(self.probe(n) for n in down))
            # probes never run more often than this; with every node up, wait for a failure
            await asyncio.sleep(self.config.probe_interval_s)
            if not any(h.state is NodeState.DOWN for h in self.health.values()):
                await self._wake.wait()

    def _connect_hook(self, name: str) -> Callable[[AbstractConnection], Awaitable[None]]:
        async def on_connect(conn: AbstractConnection) -> None:
            await conn.on_connect()
            seen = self._seen[name]
            if conn in seen:  # a REconnect: the node or the path flapped; forget what it holds
                epoch = new_epoch()
                await conn.send_command("SET", self.config.epoch_key, epoch)
                await conn.read_response()
                self.health[name].epoch = epoch
                self.stats.epoch_bumps += 1
                # one bump per flap: the other connections' reconnects count as first ones
                self._seen[name] = weakref.WeakSet([conn])
                log.info("cache node %s: reconnected, epoch bumped to %d", name, epoch)
            else:
                seen.add(conn)

        return on_connect

    def _default_client(
        self, node: CacheNodeAddress, hook: Callable[[AbstractConnection], Awaitable[None]]
    ) -> aioredis.Redis:
        cfg = self.config
        pool = aioredis.BlockingConnectionPool(
            host=node.host,
            port=node.port,
            max_connections=cfg.max_connections_per_node,
            timeout=cfg.op_timeout_s,
            socket_timeout=cfg.op_timeout_s,
            socket_connect_timeout=cfg.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            redis_connect_func=hook,
            protocol=2,
        )
        return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose closes it

    def snapshot(self) -> Mapping[str, dict[str, Any]]:
        """Per node: state, epoch, failures, rejoins, errors (for /metrics and tests)."""
        return {
            h.name: {
                "state": h.state.value,
                "epoch": h.epoch,
                "failures": h.failures,
                "rejoins": h.rejoins,
                "errors": self.stats.node_errors.get(h.name, 0),
            }
            for h in self.health.values()
        }
