"""The hub over an in-memory log and a lossy in-process bus (no sockets)."""

from __future__ import annotations

import asyncio
import json

import pytest

from photostack.blocks.realtime import (
    CloseReason,
    Event,
    Hub,
    HubConfig,
    HubDrainingError,
    HubFullError,
    LogUnavailableError,
    MalformedEventError,
    NotifierUnavailableError,
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
