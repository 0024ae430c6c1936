"""The hub over an in-memory log and a lossy in-process bus (no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from photostack.blocks.realtime import (
    CloseReason,
    Event,
    HeapFreezer,
    Hub,
    HubConfig,
    HubDrainingError,
    HubFullError,
    LogUnavailableError,
    MalformedEventError,
    NotifierUnavailableError,
    Subscription,
    parse_client_message,
    parse_last_event_id,
    poll_body,
    sse_close,
    sse_events,
)
from photostack.blocks.realtime import InvalidClientMessageError as BadOp
from photostack.blocks.realtime.testing import LocalBus, MemoryEventLog, make_event


def _hub(config: HubConfig | None = None) -> tuple[Hub, MemoryEventLog, LocalBus]:
    log, bus = MemoryEventLog(), LocalBus()
    hub = Hub(log, config)
    hub.notifier = bus.notifier(hub.deliver)
    return hub, log, bus


def _emit(log: MemoryEventLog, bus: LocalBus, key: str) -> Event:
    event = log.append(key)
    bus.publish(key, event)
    return event


async def _collect(sub, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    got: list[int] = []
    async with asyncio.timeout(5):
        while len(got) < count:
            events = await sub.next_events(1.0)
            sub.sent(events)
            got.extend(e.seq for e in events)
    return got


def test_live_events_reach_every_subscription_of_the_key_only() -> None:
    async def main() -> None:
        hub, log, bus = _hub()
        a1, a2, b = await hub.open("a", 0), await hub.open("a", 0), await hub.open("b", 0)
        assert (hub.connections, hub.keys) == (3, 2)
        assert await a1.prime() == []
        _emit(log, bus, "a")
        _emit(log, bus, "a")
        assert await _collect(a1, 2) == [1, 2]
        assert await _collect(a2, 2) == [1, 2]
        assert await b.next_events(0.01) == []
        for sub in (a1, a2, b):
            sub.close()
        assert (hub.connections, hub.keys) == (0, 0)

    asyncio.run(main())


def test_a_lost_notification_costs_a_read_not_an_event() -> None:
    async def main() -> None:
        hub, log, bus = _hub(HubConfig(resync_interval_s=0.05))
        hub.start()
        sub = await hub.open("k", 0)
        await sub.prime()
        bus.drop_next = 1
        _emit(log, bus, "k")  # lost
        _emit(log, bus, "k")  # a gap: read the log
        assert await _collect(sub, 2) == [1, 2]
        bus.drop_next = 1
        _emit(log, bus, "k")  # the last one lost: the periodic resync finds it
        assert await _collect(sub, 1) == [3]
        assert log.fresh_reads >= 1
        sub.close()
        await hub.aclose()

    asyncio.run(main())


def test_open_resumes_from_the_log_and_a_trimmed_range_is_skipped() -> None:
    async def main() -> None:
        hub, log, _ = _hub()
        for _ in range(10):
            log.append("k")
        log.trim("k", keep=3)
        sub = await hub.open("k", 2)
        first = await sub.prime()
        assert [e.seq for e in first] == [8, 9, 10]
        sub.close()

    asyncio.run(main())


def test_limits_drain_and_unavailable_pieces() -> None:
    async def main() -> None:
        hub, _, _ = _hub(HubConfig(max_connections=1))
        sub = await hub.open("k", 0)
        with pytest.raises(HubFullError) as full:
            await hub.open("k", 0)
        assert full.value.retry_after_s == 1
        assert hub.connections == 1
        assert hub.drain() == 1
        assert sub.cursor.close_reason is CloseReason.DRAINING
        assert await sub.next_events(1.0) == []
        sub.close()
        with pytest.raises(HubDrainingError):
            await hub.open("k", 0)

        hub2, log2, bus2 = _hub()
        bus2.available = False
        with pytest.raises(NotifierUnavailableError):
            await hub2.open("k", 0)
        assert (hub2.connections, hub2.keys) == (0, 0)
        bus2.available = True
        log2.available = False
        sub2 = await hub2.open("k", 0)
        with pytest.raises(LogUnavailableError):
            await sub2.prime()
        sub2.close()
        assert hub2.connections == 0

    asyncio.run(main())


def test_framing() -> None:
    event = make_event(7, "photo.ready")
    frame = sse_events([event]).decode()
    assert frame.startswith("id: 7\nevent: photo.ready\ndata: {")
    assert frame.endswith("}\n\n")
    closing = sse_close(CloseReason.SLOW_CONSUMER, 6, 1000).decode()
    assert closing.startswith("retry: 1000\nevent: close\ndata: ")
    assert json.loads(closing.split("data: ")[1]) == {"reason": "slow_consumer", "resume_after": 6}
    body = json.loads(poll_body([event], 3))
    assert body["next"] == 7
    assert body["events"][0]["seq"] == 7
    assert json.loads(poll_body([], 3)) == {"events": [], "next": 3}
    assert parse_last_event_id(None) is None
    assert parse_last_event_id(" 42 ") == 42
    with pytest.raises(ValueError, match="seq"):
        parse_last_event_id("-1")
    assert parse_client_message('{"op":"resume"}').seq is None
    assert parse_client_message('{"op":"resume","after":3}').seq == 3
    assert parse_client_message('{"op":"ack","seq":4}').seq == 4
    for bad in ("nope", "[]", '{"op":"ack"}', '{"op":"ack","seq":true}', '{"op":"x"}'):
        with pytest.raises(BadOp):
            parse_client_message(bad)
    for bad_event in (b"x", b"[]", b'{"seq":0,"type":"a"}', b'{"seq":1,"type":""}'):
        with pytest.raises(MalformedEventError):
            Event.from_json(bad_event)
    assert Event.from_json('{"seq":1,"type":"a"}').seq == 1


_ENCODED: list[int] = []  # how many times the pushers' shared encoder ran


def _encode(events: Sequence[Event]) -> bytes:
    _ENCODED.append(len(events))
    return b"".join(b"%d;" % e.seq for e in events)


class _Pipe:
    """A Pusher double: records what the hub writes; ``open`` is what ``writable`` says."""

    encode = staticmethod(_encode)

    def __init__(self) -> None:
        self.open = True
        self.data = b""

    def writable(self) -> bool:
        return self.open

    def write(self, data: bytes) -> None:
        self.data += data


async def _parked(subs: list[Subscription]) -> list[asyncio.Task[list[Event]]]:
    """Each subscription's driver waiting in next_events (where the hub may push)."""
    tasks = [asyncio.create_task(sub.next_events(5.0)) for sub in subs]
    for _ in range(100):
        if all(sub.pusher is not None for sub in subs):
            return tasks
        await asyncio.sleep(0)
    raise AssertionError("the drivers did not park")


def test_a_broadcast_is_encoded_once_and_written_to_every_waiting_connection() -> None:
    async def main() -> None:
        hub, log, bus = _hub()
        subs = [await hub.open("k", 0) for _ in range(50)]
        pipes = [_Pipe() for _ in subs]
        for sub, pipe in zip(subs, pipes, strict=True):
            assert await sub.prime() == []
            sub.attach(pipe)
        tasks = await _parked(subs)
        _ENCODED.clear()
        _emit(log, bus, "k")
        _emit(log, bus, "k")
        assert _ENCODED == [1, 1]  # once per broadcast, not per connection
        assert (hub.pushed, hub.woken) == (100, 0)
        assert all(p.data == b"1;2;" for p in pipes)
        assert all(s.cursor.delivered == 2 for s in subs)
        assert not any(t.done() for t in tasks)  # no task was woken for it
        _emit(log, bus, "other")  # another key: untouched
        assert hub.pushed == 100
        hub.drain()
        assert await asyncio.gather(*tasks) == [[]] * 50
        assert all(s.pusher is None for s in subs)
        for sub in subs:
            sub.close()

    asyncio.run(main())


def test_an_unwritable_or_busy_connection_takes_the_buffered_path_and_its_cut_off() -> None:
    async def main() -> None:
        hub, log, bus = _hub(HubConfig(max_buffered_events=2))
        sub = await hub.open("k", 0)
        await sub.prime()
        pipe = _Pipe()
        sub.attach(pipe)
        _emit(log, bus, "k")  # the driver is not waiting: buffered, not pushed
        assert (hub.pushed, pipe.data) == (0, b"")
        events = await sub.next_events(1.0)
        assert [e.seq for e in events] == [1]
        sub.sent(events)
        (task,) = await _parked([sub])
        pipe.open = False  # the peer stopped reading: flow control paused writing
        _emit(log, bus, "k")
        assert [e.seq for e in await task] == [2]  # woken, buffered path
        assert (hub.pushed, hub.woken, pipe.data) == (0, 2, b"")
        for _ in range(3):  # the driver is stuck writing 2: the buffer overflows
            _emit(log, bus, "k")
        assert sub.cursor.close_reason is CloseReason.SLOW_CONSUMER
        assert sub.cursor.resume_after == 1
        sub.close()

    asyncio.run(main())


class _Gc:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


def test_the_heap_freezer_freezes_on_growth_and_unfreezes_after_churn_or_shrinking() -> None:
    gc = _Gc()
    freezer = HeapFreezer(step=10, control=gc)
    for count in range(1, 10):
        freezer(count)
    assert gc.calls == []
    freezer(10)
    assert (gc.calls, freezer.frozen_at) == (["freeze"], 10)
    freezer(19)
    freezer(20)
    assert gc.calls == ["freeze", "freeze"]
    for _ in range(19):  # churn: as many closes as were held, count stays about the same
        freezer(19)
        freezer(20)
    assert gc.calls == ["freeze", "freeze"]
    freezer(19)  # the 20th close
    assert (gc.calls[-1], freezer.frozen_at) == ("unfreeze", 0)
    freezer(29)
    assert (gc.calls[-1], freezer.frozen_at) == ("freeze", 29)
    freezer(7)  # fell to a quarter
    assert gc.calls[-1] == "unfreeze"
    freezer(16)
    assert gc.calls[-1] == "unfreeze"
    freezer(17)  # grown by a step from the lowest count
    assert gc.calls[-1] == "freeze"
    with pytest.raises(ValueError, match="step"):
        HeapFreezer(step=0)


def test_a_connection_that_breaks_on_a_direct_write_is_closed_and_the_others_still_get_it() -> None:
    class _Broken(_Pipe):
        def write(self, data: bytes) -> None:
            raise ConnectionResetError("peer reset")

    async def main() -> None:
        hub, log, bus = _hub()
        good, bad = await hub.open("k", 0), await hub.open("k", 0)
        pipe = _Pipe()
        for sub, pusher in ((good, pipe), (bad, _Broken())):
            await sub.prime()
            sub.attach(pusher)
        tasks = await _parked([good, bad])
        _emit(log, bus, "k")
        assert pipe.data == b"1;"
        assert bad.cursor.close_reason is CloseReason.CLIENT_GONE
        assert hub.connections == 1
        assert await tasks[1] == []
        hub.drain()
        await tasks[0]
        good.close()

    asyncio.run(main())
