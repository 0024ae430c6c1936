"""The delivery cursor: no gap, no duplicate, whatever pub/sub loses, repeats or races."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photostack.blocks.realtime import CloseReason, CursorState, DeliveryCursor, LogRead
from photostack.blocks.realtime.testing import make_event


def _log(n: int) -> list:  # type: ignore[type-arg]
    return [make_event(i) for i in range(1, n + 1)]


def _read(log: list, after: int, limit: int) -> LogRead:  # type: ignore[type-arg]
    newer = [e for e in log if e.seq > after]
    return LogRead(tuple(newer[:limit]), more=len(newer) > limit)


def _drain(cursor: DeliveryCursor, log: list, delivered: list[int]) -> None:  # type: ignore[type-arg]
    for _ in range(1000):
        if cursor.needs_read:
            after, limit = cursor.begin_read()
            cursor.end_read(_read(log, after, limit))
        batch = cursor.take(7)
        if not batch and not cursor.needs_read:
            return
        delivered.extend(e.seq for e in batch)
        cursor.sent(batch)
    raise AssertionError("did not converge")


def test_a_new_cursor_reads_the_log_first_then_takes_live_events_in_order() -> None:
    log = _log(3)
    cursor = DeliveryCursor(1, max_buffered=10)
    assert cursor.needs_read
    cursor.offer([log[2]])  # a read is due: live events only raise the head
    assert (cursor.buffered, cursor.known_head) == (0, 3)
    delivered: list[int] = []
    _drain(cursor, log, delivered)
    assert delivered == [2, 3]
    log.append(make_event(4))
    assert cursor.offer([log[3]])
    assert not cursor.needs_read  # continues exactly: no read
    _drain(cursor, log, delivered)
    assert delivered == [2, 3, 4]


def test_a_gap_in_live_events_is_filled_from_the_log() -> None:
    log = _log(5)
    cursor = DeliveryCursor(0, max_buffered=10)
    delivered: list[int] = []
    _drain(cursor, _log(2), delivered)
    cursor.offer([log[4]])  # 3 and 4 were lost
    assert cursor.needs_read
    _drain(cursor, log, delivered)
    assert delivered == [1, 2, 3, 4, 5]


def test_a_live_event_past_a_full_buffer_overflows_with_the_last_delivered_seq() -> None:
    log = _log(6)
    cursor = DeliveryCursor(0, max_buffered=2)
    delivered: list[int] = []
    _drain(cursor, [], delivered)
    cursor.offer(log[:2])
    batch = cursor.take(1)
    cursor.sent(batch)
    cursor.offer(log[2:3])  # buffer: 2, 3 (full)
    assert cursor.state is CursorState.OPEN
    cursor.offer(log[3:4])
    assert cursor.state is CursorState.OVERFLOWED
    assert cursor.close_reason is CloseReason.SLOW_CONSUMER
    assert cursor.resume_after == 1
    assert cursor.take(10) == []
    assert not cursor.needs_read


def test_catching_up_never_overflows_it_reads_at_its_own_pace() -> None:
    log = _log(50)
    cursor = DeliveryCursor(0, max_buffered=4)
    after, limit = cursor.begin_read()
    assert limit == 4
    cursor.end_read(_read(log, after, limit))
    log.append(make_event(51))
    cursor.offer([log[-1]])  # behind: raises the head only
    assert cursor.is_open
    delivered: list[int] = []
    _drain(cursor, log, delivered)
    assert delivered == list(range(1, 52))


def test_rewind_resends_after_the_last_ack_and_ignores_a_stale_read() -> None:
    log = _log(5)
    cursor = DeliveryCursor(0, max_buffered=10)
    delivered: list[int] = []
    _drain(cursor, log, delivered)
    cursor.ack(2)
    cursor.ack(99)  # capped at what was sent
    assert cursor.acked == 5
    cursor.rewind(3)
    after, limit = cursor.begin_read()
    cursor.rewind(None)  # back to the ack (3 after the first rewind)
    cursor.end_read(_read(log, after, limit))  # stale: answered for another position
    resent: list[int] = []
    _drain(cursor, log, resent)
    assert resent == [4, 5]


def test_sent_after_a_rewind_does_not_move_delivered_forward() -> None:
    log = _log(3)
    cursor = DeliveryCursor(0, max_buffered=10)
    after, limit = cursor.begin_read()
    cursor.end_read(_read(log, after, limit))
    batch = cursor.take(10)
    cursor.rewind(1)
    cursor.sent(batch)
    assert cursor.delivered == 1


def test_push_writes_only_for_an_exactly_caught_up_cursor() -> None:
    log = _log(3)
    cursor = DeliveryCursor(0, max_buffered=4)
    assert cursor.push(log[:1]) is None  # a new cursor reads the log first
    after, limit = cursor.begin_read()
    assert cursor.push(log[:1]) is None  # a read in flight
    cursor.end_read(_read(log, after, limit))
    assert cursor.push([make_event(4)]) is None  # events buffered, not yet taken
    batch = cursor.take(10)
    assert [e.seq for e in batch] == [1, 2, 3]
    assert cursor.push([make_event(4)]) is None  # taken, not yet sent
    cursor.sent(batch)
    assert cursor.push([make_event(3)]) == []  # already delivered: nothing to write
    assert [e.seq for e in cursor.push([make_event(3), make_event(4), make_event(5)]) or []] == [
        4,
        5,
    ]
    assert (cursor.delivered, cursor.position, cursor.known_head) == (5, 5, 5)
    assert cursor.push([make_event(7)]) is None  # a gap: the log fills it
    assert cursor.offer([make_event(7)])
    assert cursor.needs_read
    cursor.close(CloseReason.CLIENT_GONE)
    assert cursor.push([make_event(6)]) is None


def test_illegal_use_raises() -> None:
    with pytest.raises(ValueError, match="after"):
        DeliveryCursor(-1, max_buffered=1)
    cursor = DeliveryCursor(0, max_buffered=1)
    cursor.begin_read()
    with pytest.raises(RuntimeError):
        cursor.begin_read()
    cursor.close(CloseReason.DRAINING)
    cursor.close(CloseReason.IDLE)
    assert cursor.close_reason is CloseReason.DRAINING
    assert "closed" in repr(cursor)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.booleans(), st.booleans()),
        st.tuples(st.just("push"), st.booleans(), st.booleans()),
        st.tuples(st.just("begin"), st.just(False), st.just(False)),
        st.tuples(st.just("end"), st.just(False), st.just(False)),
        st.tuples(st.just("take"), st.just(False), st.just(False)),
        st.tuples(st.just("resync"), st.just(False), st.just(False)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, start=st.integers(0, 3), buffered=st.integers(1, 6))
def test_delivery_is_the_log_in_order_whatever_pubsub_does(
    ops: list[tuple[str, bool, bool]], start: int, buffered: int
) -> None:
    log = _log(start)
    cursor = DeliveryCursor(start, max_buffered=buffered)
    delivered: list[int] = []
    pending: LogRead | None = None
    for op, drop, dup in ops:
        if op in ("append", "push"):  # push: the hub's direct path when caught up, else offer
            event = make_event(len(log) + 1)
            log.append(event)
            if not drop:
                live = [event, event] if dup else [event]
                pushed = cursor.push(live) if op == "push" else None
                if pushed is None:
                    cursor.offer(live)
                else:
                    delivered.extend(e.seq for e in pushed)
        elif op == "begin" and pending is None and cursor.needs_read:
            after, limit = cursor.begin_read()
            pending = _read(log, after, limit)  # answered now, delivered at "end"
        elif op == "end" and pending is not None:
            cursor.end_read(pending)
            pending = None
        elif op == "take":
            batch = cursor.take(3)
            delivered.extend(e.seq for e in batch)
            cursor.sent(batch)
        elif op == "resync":
            cursor.resync()
    if pending is not None:
        cursor.end_read(pending)
    if cursor.state is CursorState.OVERFLOWED:
        assert delivered == list(range(start + 1, cursor.resume_after + 1))
        return
    cursor.resync()  # what the hub does periodically: catches lost last events
    _drain(cursor, log, delivered)
    assert delivered == list(range(start + 1, len(log) + 1))
