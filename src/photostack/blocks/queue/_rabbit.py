"""The alternative engine: RabbitMQ (through aio-pika) carries delivery; Postgres keeps status.

Topology for a queue named ``q`` (all durable):

- ``q``: the ready queue for new work. ``x-max-length`` with ``x-overflow: reject-publish`` is
  the queue-length limit (the broker nacks the publish: QueueFull, and the status row written
  before the publish is deleted again); ``x-max-priority`` gives priorities; dead letters go to
  ``q.dlx``.
- ``q.due``: where delayed tasks and retries arrive when their time comes (no length limit:
  work already accepted is never dropped because new work filled ``q``). Consumed with ``q``.
- ``q.delay.<ms>`` / ``q.retry.<ms>``: tiers with a queue TTL of ``ms`` that dead-letter into
  ``q.due``; a per-queue TTL expires strictly in order, and a message arriving early is delayed
  again for the remainder. ``q.delay.*`` (delayed new work) carry the length limit too.
- ``q.dlx`` (fanout) -> ``q.dead``: the dead-letter queue, fed by ``nack(requeue=False)``.

A lease is an unacknowledged delivery: if the worker's channel closes (crash, kill, lost
connection) the broker delivers the message again. RabbitMQ has no lookup by id, so every task
also has a row in the Postgres status store (``queue_tasks``), which answers ``status``,
``dead_letters`` and ``replay`` and fences outcomes with the lease token.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from photostack.blocks.queue._backend import ReapResult
from photostack.blocks.queue._errors import LeaseLost, QueueFull, QueueUnavailable
from photostack.blocks.queue._model import (
    Json,
    Lease,
    QueueConfig,
    QueueStats,
    TaskInfo,
    TaskState,
    encode_payload,
)
from photostack.blocks.queue._pgstore import CompletionBatcher, TaskStore, create_pool
from photostack.blocks.queue._policy import (
    DELAY_TIERS_MS,
    decide_failure,
    decide_lost_lease,
    delay_tier_ms,
)
from photostack.blocks.queue._rabbit_acks import AckBatcher
from photostack.blocks.queue._translate import DRIVER_ERRORS, translated

__all__ = ["RabbitQueue", "delete_topology"]

_RUN_AT = "x-photostack-run-at-ms"
_KIND = "x-photostack-kind"
_PUBLISH_TIMEOUT_S = 10.0
#: Deliveries the broker may push ahead of the worker's free slots (prefetch = concurrency x
#: this): the next batch is already here when a batch finishes, instead of one broker round trip
#: later. They wait in the worker's inbox unstarted (status ``queued``) and go back to the broker
#: on stop or crash.
PREFETCH_HEADROOM = 2


class RabbitQueue:
    """A :class:`QueueBackend` over RabbitMQ, with task status in Postgres (``status_dsn``)."""

    def __init__(
        self,
        amqp_url: str,
        status_dsn: str,
        config: QueueConfig,
        *,
        pool_size: int = 4,
        rand: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.amqp_url = amqp_url
        self.status_dsn = status_dsn
        self.config = config
        self.pool_size = pool_size
        self._rand = rand
        self._wall = wall_clock
        self._pool: asyncpg.Pool | None = None
        self._store: TaskStore | None = None
        self._connection: AbstractConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._consumer: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._tiers: set[str] = set()
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._held: dict[str, AbstractIncomingMessage] = {}  # lease token -> delivery
        self._acks = AckBatcher()  # of the consuming channel; a new one per channel
        self._completions = CompletionBatcher(lambda: self.store)
        self.names = _Names(config.name)

    def __repr__(self) -> str:
        return f"<RabbitQueue {self.config.name!r} {'open' if self._connection else 'closed'}>"

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            raise RuntimeError("RabbitQueue.start() was not awaited")
        return self._store

    @property
    def _channel(self) -> AbstractChannel:
        if self._publisher is None:
            raise RuntimeError("RabbitQueue.start() was not awaited")
        return self._publisher

    async def start(self) -> None:
        if self._connection is not None:
            return
        async with translated("connect to RabbitMQ and the status store"):
            self._pool = await create_pool(self.status_dsn, self.pool_size)
            self._store = TaskStore(self._pool, self.config.name)
            await self._store.create_schema()
            self._connection = await aio_pika.connect(self.amqp_url)
            self._publisher = await self._connection.channel(publisher_confirms=True)
            await self._declare(self._publisher)

    async def _declare(self, channel: AbstractChannel) -> None:
        names, cfg = self.names, self.config
        dlx = await channel.declare_exchange(names.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(names.dead, durable=True)
        await dead.bind(dlx)
        common: dict[str, Any] = {
            "x-max-priority": cfg.max_priority,
            "x-dead-letter-exchange": names.dlx,
        }
        await channel.declare_queue(
            names.ready,
            durable=True,
            arguments={
                **common,
                "x-max-length": cfg.max_length,
                "x-overflow": "reject-publish",
            },
        )
        await channel.declare_queue(names.due, durable=True, arguments=common)

    async def _tier(self, family: str, tier_ms: int) -> str:
        name = f"{self.config.name}.{family}.{tier_ms}"
        if name not in self._tiers:
            arguments: dict[str, Any] = {
                "x-message-ttl": tier_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.names.due,
            }
            if family == "delay":  # delayed *new* work counts against the length limit
                arguments |= {
                    "x-max-length": self.config.max_length,
                    "x-overflow": "reject-publish",
                }
            await self._channel.declare_queue(name, durable=True, arguments=arguments)
            self._tiers.add(name)
        return name

    async def aclose(self) -> None:
        await self.stop_consuming()
        await self._completions.aclose()
        await self._acks.aclose()
        connection, self._connection = self._connection, None
        self._publisher = self._consumer = None
        if connection is not None:
            with contextlib.suppress(*DRIVER_ERRORS):
                await connection.close()
        if self._pool is not None:
            pool, self._pool, self._store = self._pool, None, None
            await pool.close()

    def _connection_or_raise(self) -> AbstractConnection:
        if self._connection is None:
            raise RuntimeError("RabbitQueue.start() was not awaited")
        return self._connection

    # -- producers ---------------------------------------------------------------------------
    async def enqueue(
        self,
        kind: str,
        payload: Json,
        *,
        priority: int = 0,
        delay_s: float = 0.0,
        idempotency_key: str | None = None,
    ) -> str:
        self.config.check_priority(priority)
        self.config.check_delay(delay_s)
        text = encode_payload(payload, self.config.max_payload_bytes)
        store = self.store
        async with translated("enqueue: status store"), store.pool.acquire() as conn:
            task_id, created = await store.insert(
                conn,
                kind=kind,
                payload_json=text,
                priority=priority,
                delay_s=delay_s,
                max_attempts=self.config.policy_for(kind).max_attempts,
                idempotency_key=idempotency_key,
            )
        if not created:
            return task_id
        tier = delay_tier_ms(delay_s)
        try:
            route = self.names.ready if tier is None else await self._tier("delay", tier)
            await self._publish(
                task_id, kind, text, priority=priority, delay_s=delay_s, route=route
            )
        except aiormq.exceptions.DeliveryError as exc:  # nacked: the queue is at x-max-length
            async with translated("enqueue: undo the status row"):
                await store.delete_queued(task_id)
            raise QueueFull(
                self.config.name, self.config.max_length, self.config.full_retry_after_s
            ) from exc
        except DRIVER_ERRORS as exc:
            with contextlib.suppress(*DRIVER_ERRORS):
                await store.delete_queued(task_id)
            raise QueueUnavailable(f"enqueue: publish: {type(exc).__name__}: {exc}") from exc
        return task_id

    async def _publish(
        self, task_id: str, kind: str, text: str, *, priority: int, delay_s: float, route: str
    ) -> None:
        """Publish and wait for the broker's confirm; a nack raises DeliveryError."""
        message = aio_pika.Message(
            text.encode(),
            message_id=task_id,
            priority=priority,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={_KIND: kind, _RUN_AT: int((self._wall() + delay_s) * 1000)},
        )
        await self._channel.default_exchange.publish(
            message, routing_key=route, timeout=_PUBLISH_TIMEOUT_S
        )

    async def status(self, task_id: str) -> TaskInfo:
        async with translated("task status"):
            return await self.store.status(task_id)

    # -- operators ---------------------------------------------------------------------------
    async def dead_letters(self, limit: int = 100) -> list[TaskInfo]:
        async with translated("list dead letters"):
            return await self.store.dead_letters(limit)

    async def replay(self, task_id: str) -> TaskInfo:
        """Requeue a dead task from its status row (the copy in ``q.dead`` stays as the
        broker-side archive; the status row decides whether a delivery still runs)."""
        async with translated("replay"):
            info, text = await self.store.replay(task_id)
            await self._publish(
                task_id, info.kind, text, priority=info.priority, delay_s=0.0, route=self.names.due
            )
        return info

    async def stats(self) -> QueueStats:
        async with translated("queue stats"):
            return await self.store.stats()

    # -- workers -----------------------------------------------------------------------------
    async def start_consuming(self, prefetch: int) -> None:
        if self._consumer is not None:
            return
        async with translated("start consuming"):
            self._consumer = await self._connection_or_raise().channel()
            self._acks = AckBatcher()
            # One prefetch for the channel, shared by the ready and due consumers.
            await self._consumer.set_qos(prefetch_count=prefetch * PREFETCH_HEADROOM, global_=True)
            for name in (self.names.ready, self.names.due):
                queue = await self._consumer.get_queue(name, ensure=False)
                tag = await queue.consume(self._on_message)
                self._consumers.append((queue, tag))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.track(message)
        self._inbox.put_nowait(message)
        self._arrived.set()

    async def stop_consuming(self) -> None:
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            with contextlib.suppress(*DRIVER_ERRORS):
                await queue.cancel(tag)
        while not self._inbox.empty():  # delivered to us, never started: back to the broker
            message = self._inbox.get_nowait()
            with contextlib.suppress(*DRIVER_ERRORS):
                await self._acks.nack(message, requeue=True)
        await self._acks.aclose()  # acks asked for are written before the channel may close
        if self._consumer is not None and not self._held:
            channel, self._consumer = self._consumer, None
            with contextlib.suppress(*DRIVER_ERRORS):
                await channel.close()

    async def wait_for_work(self, timeout_s: float) -> None:
        if self._inbox.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
        self._arrived.clear()

    async def lease(self, max_tasks: int, visibility_timeout_s: float, worker: str) -> list[Lease]:
        if self._consumer is None or self._consumer.is_closed:
            raise QueueUnavailable("the consuming channel is closed (connection lost?)")
        due: list[AbstractIncomingMessage] = []
        async with translated("lease deliveries"):
            while len(due) < max_tasks and not self._inbox.empty():
                message = self._inbox.get_nowait()
                if await self._is_due(message):
                    due.append(message)
            started = await self.store.start_many(
                [str(m.message_id) for m in due], visibility_timeout_s, worker
            )
            leases = []
            for message in due:
                entry = started.get(str(message.message_id))
                if entry is None:  # finished already, or never committed: a duplicate
                    self._acks.ack(message)
                    continue
                old_state, lease = entry
                if old_state is TaskState.RUNNING and (
                    decide_lost_lease(lease.attempt - 1, lease.max_attempts) is TaskState.DEAD
                ):
                    await self.store.fail(
                        lease, TaskState.DEAD, 0.0, "worker lost on its last attempt"
                    )
                    await self._acks.nack(message, requeue=False)
                    continue
                self._held[lease.token] = message
                leases.append(lease)
        return leases

    async def _is_due(self, message: AbstractIncomingMessage) -> bool:
        """True when the delivery may run now; an early one is delayed again (and acked)."""
        run_at_ms = (message.headers or {}).get(_RUN_AT)
        remaining_s = run_at_ms / 1000.0 - self._wall() if isinstance(run_at_ms, int) else 0.0
        tier = delay_tier_ms(remaining_s)
        if tier is not None:  # tiers round down: delay again for the rest
            await self._publish_raw(message, await self._tier("retry", tier))
            self._acks.ack(message)
            return False
        if remaining_s > 0:  # within the smallest tier: wait it out rather than run early
            await asyncio.sleep(remaining_s)
        return True

    async def _publish_raw(self, message: AbstractIncomingMessage, route: str) -> None:
        copy = aio_pika.Message(
            message.body,
            message_id=message.message_id,
            priority=message.priority,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=dict(message.headers or {}),
        )
        await self._channel.default_exchange.publish(
            copy, routing_key=route, timeout=_PUBLISH_TIMEOUT_S
        )

    def _delivery(self, lease: Lease) -> AbstractIncomingMessage:
        message = self._held.get(lease.token)
        if message is None or message.channel.is_closed:
            self._held.pop(lease.token, None)
            if message is not None:
                self._acks.forget(message)
            raise LeaseLost(f"task {lease.task_id}: its delivery's channel is gone")
        return message

    async def heartbeat(self, lease: Lease, visibility_timeout_s: float) -> None:
        self._delivery(lease)
        async with translated("heartbeat"):
            await self.store.heartbeat(lease, visibility_timeout_s)

    async def complete(self, lease: Lease, result: Json) -> None:
        message = self._delivery(lease)
        text = encode_payload(result, max(self.config.max_payload_bytes, 1 << 20))
        try:
            await self._completions.complete(lease, text)
        finally:
            self._held.pop(lease.token, None)
            # Batched with this turn's other acks; a lost ack means a redelivery that the
            # status row (succeeded) turns into a dropped duplicate.
            self._acks.ack(message)

    async def fail(self, lease: Lease, error: str, *, permanent: bool = False) -> TaskState:
        message = self._delivery(lease)
        policy = replace(self.config.policy_for(lease.kind), max_attempts=lease.max_attempts)
        decision = decide_failure(policy, lease.attempt, self._rand(), permanent=permanent)
        self._held.pop(lease.token, None)
        async with translated("record failure"):
            await self.store.fail(lease, decision.state, decision.delay_s, error)
            if decision.state is TaskState.DEAD:
                await self._acks.nack(message, requeue=False)  # -> q.dlx -> q.dead
                return decision.state
            copy = aio_pika.Message(
                message.body,
                message_id=message.message_id,
                priority=message.priority,
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={
                    **dict(message.headers or {}),
                    _RUN_AT: int((self._wall() + decision.delay_s) * 1000),
                },
            )
            tier = delay_tier_ms(decision.delay_s)
            route = self.names.due if tier is None else await self._tier("retry", tier)
            # Publish the retry before acking: a crash in between duplicates, never loses.
            await self._channel.default_exchange.publish(
                copy, routing_key=route, timeout=_PUBLISH_TIMEOUT_S
            )
            self._acks.ack(message)
        return decision.state

    async def release(self, lease: Lease) -> None:
        message = self._delivery(lease)
        self._held.pop(lease.token, None)
        async with translated("release"):
            await self.store.release(lease)
            await self._acks.nack(message, requeue=True)

    async def reap_expired(self) -> ReapResult:
        # The broker redelivers a dead consumer's messages itself when its channel closes.
        return ReapResult((0, 0))


class _Names:
    def __init__(self, name: str) -> None:
        self.ready = name
        self.due = f"{name}.due"
        self.dead = f"{name}.dead"
        self.dlx = f"{name}.dlx"


async def delete_topology(amqp_url: str, name: str) -> None:
    """Delete every queue and exchange of queue ``name`` (tests and teardown)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        names = _Names(name)
        tiers = [f"{name}.{family}.{ms}" for family in ("delay", "retry") for ms in DELAY_TIERS_MS]
        for queue in (names.ready, names.due, names.dead, *tiers):
            await channel.queue_delete(queue)
        await channel.exchange_delete(names.dlx)
    finally:
        await connection.close()
