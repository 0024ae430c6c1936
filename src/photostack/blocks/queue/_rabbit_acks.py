"""Settling RabbitMQ deliveries with as few frames as possible, without settling the wrong ones.

Every ack is a frame the client writes (a send syscall and a drain) and the broker parses. The
:class:`AckBatcher` of a consuming channel knows every delivery the channel has handed us, in
delivery-tag order. Acks asked for in the same turn of the event loop (a completion batch
resumes all its completers at once) go out together: the longest run of settled deliveries from
the oldest outstanding one is acked with **one** ``basic.ack(multiple=True)`` on its last tag;
a settled delivery behind one that is still running or waiting is acked on its own (never held
back: an unacked delivery keeps a prefetch slot).

Why a multiple ack cannot settle the wrong delivery: it covers every delivery of the channel up
to its tag, and the only deliveries below that tag the broker still counts as outstanding are
ones we have tracked and settled. A delivery to be nacked (retry published, dead-lettered,
released) stays *unsettled* in the table until its nack frame is queued on the connection, so
no multiple ack can pass over it before the nack is on the wire; frames of one connection are
written in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from photostack.blocks.queue._translate import DRIVER_ERRORS

__all__ = ["AckBatcher", "Delivery"]


class Delivery(Protocol):
    """What the batcher needs of an incoming message (aio-pika's ``IncomingMessage``)."""

    @property
    def delivery_tag(self) -> int | None: ...

    async def ack(self, multiple: bool = False) -> None: ...

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None: ...


class AckBatcher:
    """Acks and nacks of one consuming channel. ``track`` every delivery as it arrives."""

    def __init__(self) -> None:
        # delivery tag -> the delivery once it may be acked, None while unsettled. Tags of one
        # channel only grow, and dicts keep insertion order: this is in tag order.
        self._open: dict[int, Delivery | None] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._singles: set[asyncio.Task[None]] = set()
        self.frames = 0  # ack frames sent (for tests and curiosity)

    def __repr__(self) -> str:
        return f"<AckBatcher open={len(self._open)} frames={self.frames}>"

    def track(self, message: Delivery) -> None:
        tag = message.delivery_tag
        if tag is not None:
            self._open[tag] = None

    def ack(self, message: Delivery) -> None:
        """Ack ``message`` soon (this turn of the loop's acks together). Never raises."""
        tag = message.delivery_tag
        if tag is None or tag not in self._open:  # not ours to batch: settle it on its own
            task = asyncio.create_task(self._ack_one(message, multiple=False))
            self._singles.add(task)
            task.add_done_callback(self._singles.discard)
            return
        self._open[tag] = message
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    async def nack(self, message: Delivery, *, requeue: bool) -> None:
        """Nack ``message`` now; it stays unsettled here until the frame is queued."""
        try:
            await message.nack(requeue=requeue)
        finally:
            if message.delivery_tag is not None:
                self._open.pop(message.delivery_tag, None)

    def forget(self, message: Delivery) -> None:
        """Stop tracking a delivery whose channel is gone (the broker redelivers it)."""
        if message.delivery_tag is not None:
            self._open.pop(message.delivery_tag, None)

    async def aclose(self) -> None:
        """Wait until every ack asked for so far is written (before closing the channel)."""
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
        if self._singles:
            await asyncio.gather(*self._singles)

    async def _ack_one(self, message: Delivery, *, multiple: bool) -> None:
        # A failed ack (channel closed) is harmless: the broker redelivers, and the status
        # row (succeeded, or already started) makes the worker drop the duplicate.
        self.frames += 1
        with contextlib.suppress(*DRIVER_ERRORS):
            await message.ack(multiple=multiple)

    async def _flush(self) -> None:
        while True:
            last: Delivery | None = None
            singles: list[Delivery] = []
            blocked = False
            for tag, message in list(self._open.items()):
                if message is None:
                    blocked = True
                elif blocked:
                    singles.append(message)
                    del self._open[tag]
                else:
                    last = message
                    del self._open[tag]
            if last is None and not singles:
                return
            if last is not None:
                await self._ack_one(last, multiple=True)
            for message in singles:
                await self._ack_one(message, multiple=False)
