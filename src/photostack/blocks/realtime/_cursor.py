"""One connection's delivery state: what it has been sent, what it still needs, when to give up.

Pure logic, no I/O. Live events (from pub/sub) are appended only when they continue the
connection's position exactly; anything else (a gap, a duplicate, events that arrive while a log
read is in flight) only raises the known head, and the driver reads the log after the position.
The log is the truth: a lost live event costs a read, never a missing event.

Slow-consumer policy: a connection that is caught up buffers live events; when a live event
arrives and ``max_buffered`` events are already waiting, the connection is OVERFLOWED: buffered
events are dropped and the transport tells the client to resume after ``delivered``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence

from ._model import Event, LogRead

__all__ = ["CloseReason", "CursorState", "DeliveryCursor"]


class CursorState(enum.Enum):
    OPEN = "open"
    OVERFLOWED = "overflowed"  # fell behind: told where to resume, then closed
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a connection ends; each transport says it its own way."""

    DRAINING = "draining"  # the node is stopping: reconnect (elsewhere)
    SLOW_CONSUMER = "slow_consumer"  # buffer or send deadline exceeded: resume after `delivered`
    CLIENT_GONE = "client_gone"
    IDLE = "idle"  # no activity for the idle timeout


_TRANSITIONS: dict[CursorState, frozenset[CursorState]] = {
    CursorState.OPEN: frozenset({CursorState.OVERFLOWED, CursorState.CLOSED}),
    CursorState.OVERFLOWED: frozenset({CursorState.CLOSED}),
    CursorState.CLOSED: frozenset(),
}


class DeliveryCursor:
    """Per-connection positions: ``delivered`` <= ``position`` <= ``known_head``.

    ``delivered``: last seq handed to the transport. ``position``: last seq queued (buffer tail).
    ``known_head``: highest seq known to exist in the log. ``acked``: last seq the client
    acknowledged (WebSocket), never above ``delivered``.
    """

    __slots__ = (
        "_buffer",
        "_epoch",
        "_force_read",
        "_fresh",
        "_head_at_read",
        "_read_from",
        "_reading",
        "_state",
        "_taken_epoch",
        "acked",
        "close_reason",
        "delivered",
        "known_head",
        "max_buffered",
        "position",
    )

    def __init__(self, after: int, *, max_buffered: int) -> None:
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.max_buffered = max_buffered
        self.delivered = after
        self.position = after
        self.known_head = after
        self.acked = after
        self.close_reason: CloseReason | None = None
        self._buffer: deque[Event] = deque()
        self._state = CursorState.OPEN
        self._reading = False
        self._force_read = True  # a new connection first reads the log after its position
        self._fresh = False  # whether that read must bypass caches in front of the log
        self._head_at_read = after
        self._read_from = after
        self._epoch = 0  # bumped by rewind: events taken before it are not "sent" after it
        self._taken_epoch = 0

    def __repr__(self) -> str:
        return (
            f"<DeliveryCursor {self._state.value} delivered={self.delivered} "
            f"position={self.position} head={self.known_head} buffered={len(self._buffer)}>"
        )

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> CursorState:
        return self._state

    @property
    def is_open(self) -> bool:
        return self._state is CursorState.OPEN

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _to(self, new: CursorState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal cursor transition {self._state.value} -> {new.value}")
        self._state = new

    def close(self, reason: CloseReason) -> None:
        """End delivery (idempotent); the first reason given wins."""
        if self._state is CursorState.CLOSED:
            return
        if self.close_reason is None:
            self.close_reason = reason
        self._buffer.clear()
        self._to(CursorState.CLOSED)

    def overflow(self) -> None:
        """The consumer fell behind (buffer full, or a send missed its deadline)."""
        if self._state is not CursorState.OPEN:
            return
        self._buffer.clear()
        self.position = self.delivered
        self.close_reason = CloseReason.SLOW_CONSUMER
        self._to(CursorState.OVERFLOWED)

    @property
    def resume_after(self) -> int:
        """Where a client that is cut off now must resume: everything up to it was delivered."""
        return self.delivered

    # -- live events --------------------------------------------------------------------------

    def offer(self, events: Iterable[Event]) -> bool:
        """Live events of this key, in seq order. Returns whether the driver should wake."""
        if self._state is not CursorState.OPEN:
            return False
        wake = False
        for event in events:
            if event.seq <= self.position:
                continue  # already queued or delivered
            self.known_head = max(self.known_head, event.seq)
            if self._reading or self._force_read or event.seq != self.position + 1:
                wake = True  # a gap (or a read in flight): the log fills it
                continue
            if len(self._buffer) >= self.max_buffered:
                self.overflow()
                return True
            self._buffer.append(event)
            self.position = event.seq
            wake = True
        return wake

    def push(self, events: Sequence[Event]) -> list[Event] | None:
        """Live events a caught-up, idle connection can be written at once, bypassing the buffer.

        Returns the events to write now and counts them as delivered (the caller writes them
        before anything else happens on the connection); ``[]`` when every event is already
        delivered; None when the connection is not exactly caught up (a read in flight, events
        buffered or taken but not yet sent, a gap): then ``offer`` them as usual.
        """
        if (
            self._state is not CursorState.OPEN
            or self._reading
            or self._force_read
            or self._buffer
            or self.position != self.delivered
        ):
            return None
        position = self.position
        fresh = [e for e in events if e.seq > position]
        expected = position
        for event in fresh:
            expected += 1
            if event.seq != expected:
                return None  # a gap or a disorder: the log decides
        if fresh:
            self.position = self.delivered = expected
            self.known_head = max(self.known_head, expected)
        return fresh

    def resync(self) -> None:
        """Read the log (bypassing caches) at the next chance: pub/sub may have missed events."""
        if self._state is CursorState.OPEN:
            self._force_read = True
            self._fresh = True

    # -- log reads ----------------------------------------------------------------------------

    @property
    def needs_read(self) -> bool:
        """Whether the driver should read the log now (there is room and something to read)."""
        return (
            self._state is CursorState.OPEN
            and not self._reading
            and (self._force_read or self.known_head > self.position)
            and len(self._buffer) < self.max_buffered
        )

    @property
    def read_is_fresh(self) -> bool:
        """Whether the next read must bypass caches in front of the log (after a resync)."""
        return self._fresh

    def begin_read(self) -> tuple[int, int]:
        """Start a log read: returns (after, limit). Only when ``needs_read``."""
        if not self.needs_read:
            raise RuntimeError("begin_read without needs_read")
        self._reading = True
        self._head_at_read = self.known_head
        self._read_from = self.position
        return self.position, self.max_buffered - len(self._buffer)

    def end_read(self, read: LogRead | None) -> None:
        """The read's result; None when it failed (the driver retries later)."""
        self._reading = False
        if read is None or self._state is not CursorState.OPEN:
            return
        if self.position != self._read_from:
            return  # rewound while reading: the answer is for an old position
        self._force_read = False
        self._fresh = False
        for event in read.events:
            if event.seq <= self.position:
                continue
            self._buffer.append(event)  # may jump over a trimmed range: the log decides
            self.position = event.seq
        self.known_head = max(self.known_head, self.position)
        if read.more:
            self.known_head = max(self.known_head, self.position + 1)
        elif self.known_head == self._head_at_read:
            # Nothing announced during the read: the log is the truth, we are caught up.
            self.known_head = self.position

    # -- delivery -----------------------------------------------------------------------------

    def take(self, limit: int) -> list[Event]:
        """Up to ``limit`` buffered events for the transport to send next."""
        self._taken_epoch = self._epoch
        out: list[Event] = []
        while self._buffer and len(out) < limit:
            out.append(self._buffer.popleft())
        return out

    def sent(self, events: list[Event]) -> None:
        """The transport wrote ``events`` (from the last ``take``)."""
        if self._taken_epoch != self._epoch:
            return  # rewound meanwhile: the new position stands
        if events and events[-1].seq > self.delivered:
            self.delivered = events[-1].seq

    def ack(self, seq: int) -> None:
        """The client acknowledged every event up to ``seq`` (capped at what it was sent)."""
        self.acked = max(self.acked, min(seq, self.delivered))

    def rewind(self, after: int | None) -> None:
        """Resume after ``after`` (or after the last acknowledged event): resend from the log."""
        if self._state is not CursorState.OPEN:
            return
        target = self.acked if after is None else max(0, after)
        self._epoch += 1
        self._buffer.clear()
        self.delivered = self.position = target
        self.acked = min(self.acked, target)
        self.known_head = max(self.known_head, target)
        self._force_read = True
