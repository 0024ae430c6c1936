"""The RabbitMQ engine's ack batching, over fake deliveries (no broker): a multiple ack never
covers a delivery that is still unsettled or about to be nacked."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiormq

from photostack.blocks.queue._rabbit_acks import AckBatcher


class FakeDelivery:
    """Records settle frames on a shared wire, in the order they were queued."""

    def __init__(self, tag: int, wire: list[tuple[str, int, bool]]) -> None:
        self.tag = tag
        self.wire = wire
        self.nack_gate: asyncio.Event | None = None
        self.broken = False

    @property
    def delivery_tag(self) -> int | None:
        return self.tag

    async def ack(self, multiple: bool = False) -> None:
        if self.broken:
            raise aiormq.exceptions.ChannelInvalidStateError("closed")
        self.wire.append(("ack", self.tag, multiple))

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        if self.nack_gate is not None:  # the frame is not queued until the gate opens
            await self.nack_gate.wait()
        self.wire.append(("nack", self.tag, requeue))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 5))


def deliveries(count: int) -> tuple[AckBatcher, list[FakeDelivery], list[tuple[str, int, bool]]]:
    wire: list[tuple[str, int, bool]] = []
    acks = AckBatcher()
    messages = [FakeDelivery(tag, wire) for tag in range(1, count + 1)]
    for message in messages:
        acks.track(message)
    return acks, messages, wire


def test_acks_of_one_turn_go_out_as_one_multiple_ack() -> None:
    async def main() -> None:
        acks, messages, wire = deliveries(4)
        for message in messages:
            acks.ack(message)
        await acks.aclose()
        assert wire == [("ack", 4, True)]
        assert acks.frames == 1

    run(main())


def test_an_unsettled_delivery_is_never_covered() -> None:
    async def main() -> None:
        acks, m, wire = deliveries(5)
        for message in (m[0], m[1], m[3], m[4]):  # 3 still runs
            acks.ack(message)
        await acks.aclose()
        assert wire == [("ack", 2, True), ("ack", 4, False), ("ack", 5, False)]
        acks.ack(m[2])
        await acks.aclose()
        assert wire[-1] == ("ack", 3, True)  # nothing else is outstanding below it

    run(main())


def test_a_nack_in_flight_blocks_the_multiple_ack_until_its_frame_is_queued() -> None:
    async def main() -> None:
        acks, m, wire = deliveries(3)
        m[0].nack_gate = asyncio.Event()
        nacking = asyncio.create_task(acks.nack(m[0], requeue=False))
        await asyncio.sleep(0)
        acks.ack(m[1])
        acks.ack(m[2])
        await acks.aclose()
        assert wire == [("ack", 2, False), ("ack", 3, False)]  # no multiple over tag 1
        m[0].nack_gate.set()
        await nacking
        assert wire[-1] == ("nack", 1, False)
        follow = FakeDelivery(4, wire)
        acks.track(follow)
        acks.ack(follow)
        await acks.aclose()
        assert wire[-1] == ("ack", 4, True)

    run(main())


def test_untracked_and_failing_acks_are_settled_alone_and_never_raise() -> None:
    async def main() -> None:
        acks, m, wire = deliveries(2)
        m[0].broken = True  # its channel closed: the broker redelivers, the ack is moot
        acks.ack(m[0])
        stranger = FakeDelivery(99, wire)
        acks.ack(stranger)
        await acks.aclose()
        assert ("ack", 99, False) in wire
        acks.forget(m[1])  # its channel is gone: no longer blocks or counts
        later = FakeDelivery(3, wire)
        acks.track(later)
        acks.ack(later)
        await acks.aclose()
        assert wire[-1] == ("ack", 3, True)

    run(main())
