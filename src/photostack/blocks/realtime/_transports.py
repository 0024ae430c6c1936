"""Transport adapters over ASGI/Starlette: SSE, long polling and WebSocket, one semantics.

Each takes an open, primed :class:`Subscription` and drives it until the client leaves, the hub
closes it (drain) or the consumer falls behind. They only frame and write; what to send and when
to give up is the cursor's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ._cursor import CloseReason
from ._framing import (
    InvalidClientMessageError,
    close_message,
    parse_client_message,
    poll_body,
    sse_close,
    sse_comment,
    sse_events,
    sse_retry,
)
from ._hub import Subscription
from ._model import Event

__all__ = [
    "WS_CLOSE_RESTART",
    "WS_CLOSE_TRY_AGAIN",
    "EventStreamResponse",
    "LongPollResponse",
    "StreamConfig",
    "serve_websocket",
]

log = logging.getLogger(__name__)

WS_CLOSE_RESTART = 1012  # "service restart": reconnect, maybe elsewhere
WS_CLOSE_TRY_AGAIN = 1013  # "try again later": slow consumer, resume point in the reason
_JSON = b"application/json; charset=utf-8"


@dataclass(frozen=True)
class StreamConfig:
    heartbeat_interval_s: float = 15.0  # SSE comment / long-poll whitespace at least this often
    send_timeout_s: float = 30.0  # one write blocked longer: a slow or dead consumer, cut off
    reconnect_ms: int = 1000  # the SSE retry: hint
    close_timeout_s: float = 2.0  # for the last frame of a stream we end
    direct_writes: bool = True  # SSE: live events straight to uvicorn's transport when caught up


Headers = list[tuple[bytes, bytes]]


def _headers(extra: dict[str, str]) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]


def _sse_chunk(events: Sequence[Event]) -> bytes:
    """SSE frames for ``events`` as one HTTP/1.1 chunk (shared by every connection)."""
    frame = sse_events(events)
    return b"%x\r\n" % len(frame) + frame + b"\r\n"


class _UvicornSse:
    """A :class:`Pusher` on uvicorn's httptools connection under a chunked streaming response.

    Found through the ASGI ``receive`` callable, which is uvicorn's own bound method when no
    middleware wraps it (the web node's stack passes it through). It writes an HTTP chunk to the
    connection's transport: what uvicorn's ``send`` would do, without the ASGI send chain and
    without waking the stream's task. ``writable`` is False while uvicorn's flow control has
    paused writing (the peer is not reading): the event then takes the buffered path with its
    send deadline, so a slow consumer is still cut off. Nothing in the response path may
    transform body bytes (no compression middleware) for this to be valid.
    """

    __slots__ = ("_cycle", "_flow", "_transport")

    encode = staticmethod(_sse_chunk)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._transport = cycle.transport

    @classmethod
    def find(cls, receive: Receive) -> _UvicornSse | None:
        """The pusher of this response, or None (another server, or a wrapped ``receive``)."""
        cycle = getattr(receive, "__self__", None)
        if (
            cycle is None
            or type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl"
            or getattr(cycle, "chunked_encoding", None) is not True
            or getattr(cycle, "response_started", None) is not True
            or not hasattr(getattr(cycle, "flow", None), "write_paused")
            or not hasattr(getattr(cycle, "transport", None), "is_closing")
        ):
            return None
        return cls(cycle)

    def writable(self) -> bool:
        cycle = self._cycle
        return not (
            cycle.disconnected
            or cycle.response_complete
            or self._flow.write_paused
            or self._transport.is_closing()
        )

    def write(self, data: bytes) -> None:
        self._transport.write(data)


async def _watch_disconnect(receive: Receive, sub: Subscription) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close(CloseReason.CLIENT_GONE)
            return


class _Streamer:
    """Shared write discipline: every write has a deadline; missing it means slow consumer."""

    def __init__(self, send: Send, sub: Subscription, config: StreamConfig) -> None:
        self.send = send
        self.sub = sub
        self.config = config

    async def write(
        self, data: bytes, *, more: bool = True, timeout_s: float | None = None
    ) -> bool:
        message: Message = {"type": "http.response.body", "body": data, "more_body": more}
        try:
            async with asyncio.timeout(timeout_s or self.config.send_timeout_s):
                await self.send(message)
        except TimeoutError:
            self.sub.cursor.overflow()
            return False
        except OSError:
            self.sub.close(CloseReason.CLIENT_GONE)
            return False
        return True


class EventStreamResponse(Response):
    """``text/event-stream``: a retry hint, the primed events, then live events and heartbeats."""

    def __init__(
        self,
        sub: Subscription,
        first: list[Event],
        config: StreamConfig,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self.sub = sub
        self.first = first
        self.config = config
        self.extra_headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub, config = self.sub, self.config
        headers = _headers(
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-store",
                "x-accel-buffering": "no",  # nginx: do not buffer this response
                **self.extra_headers,
            }
        )
        watcher = asyncio.ensure_future(_watch_disconnect(receive, sub))
        out = _Streamer(send, sub, config)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if not await out.write(sse_retry(config.reconnect_ms) + sse_events(self.first)):
                return
            sub.sent(self.first)
            if config.direct_writes:
                sub.attach(_UvicornSse.find(receive))
            while sub.is_open:
                events = await sub.next_events(config.heartbeat_interval_s)
                if events:
                    if not await out.write(sse_events(events)):
                        break
                    sub.sent(events)
                elif sub.is_open and not await out.write(sse_comment("hb")):
                    break
            reason, resume_after = sub.cursor.close_reason, sub.cursor.resume_after
            sub.close()  # leave the hub now: the last frame may take a while to get through
            if reason in (CloseReason.DRAINING, CloseReason.SLOW_CONSUMER):
                frame = sse_close(reason, resume_after, config.reconnect_ms)
                await out.write(frame, more=False, timeout_s=config.close_timeout_s)
            elif reason is not CloseReason.CLIENT_GONE:
                await out.write(b"", more=False, timeout_s=config.close_timeout_s)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            sub.close()


class LongPollResponse(Response):
    """The long-poll answer once a subscription had nothing at first.

    The head goes out at once (so no proxy's response-head deadline cuts a long wait), then
    whitespace every heartbeat (valid before a JSON value), then the JSON body as soon as there
    is >= 1 event or the timeout passes.
    """

    def __init__(
        self,
        sub: Subscription,
        after: int,
        timeout_s: float,
        config: StreamConfig,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self.sub = sub
        self.after = after
        self.timeout_s = timeout_s
        self.config = config
        self.extra_headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub, config = self.sub, self.config
        headers = _headers({"cache-control": "no-store", **self.extra_headers})
        headers.append((b"content-type", _JSON))
        watcher = asyncio.ensure_future(_watch_disconnect(receive, sub))
        out = _Streamer(send, sub, config)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        events: list[Event] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while sub.is_open and not events:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                events = await sub.next_events(min(remaining, config.heartbeat_interval_s))
                if not events and sub.is_open and deadline - loop.time() > 0:
                    await out.write(b"\n")
            if sub.cursor.close_reason is not CloseReason.CLIENT_GONE:
                await out.write(poll_body(events, self.after), more=False)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            sub.close()


async def _ws_send(ws: WebSocket, sub: Subscription, text: str, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await ws.send_text(text)
    except TimeoutError:
        sub.cursor.overflow()
        return False
    except (WebSocketDisconnect, OSError, RuntimeError):
        sub.close(CloseReason.CLIENT_GONE)
        return False
    return True


async def _ws_reader(
    ws: WebSocket, sub: Subscription, on_error: Callable[[str], Awaitable[None]]
) -> None:
    while True:
        try:
            text = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            sub.close(CloseReason.CLIENT_GONE)
            return
        try:
            op = parse_client_message(text)
        except InvalidClientMessageError as exc:
            await on_error(str(exc))
            continue
        if op.op == "ack" and op.seq is not None:
            sub.cursor.ack(op.seq)
        elif op.op == "resume":
            sub.cursor.rewind(op.seq)
            sub.wake()


async def _ws_send_all(
    ws: WebSocket, sub: Subscription, events: list[Event], timeout_s: float
) -> bool:
    """Send ``events`` as frames; returns whether the subscription is still open."""
    for event in events:
        if not await _ws_send(ws, sub, event.body.decode("utf-8"), timeout_s):
            return False
    sub.sent(events)
    return sub.is_open


async def serve_websocket(
    ws: WebSocket, sub: Subscription, first: list[Event], config: StreamConfig
) -> None:
    """Drive an accepted WebSocket: EVENT frames out; ``resume`` / ``ack`` ops in.

    Ends with close code 1012 when the node drains, 1013 (reason ``resume_after=N``, after a
    ``{"op":"close",...}`` frame) for a slow consumer.
    """
    timeout_s = config.send_timeout_s

    async def on_error(message: str) -> None:
        body = {"op": "error", "code": "invalid_message", "message": message}
        await _ws_send(ws, sub, json.dumps(body), timeout_s)

    reader = asyncio.ensure_future(_ws_reader(ws, sub, on_error))
    try:
        events = first
        while await _ws_send_all(ws, sub, events, timeout_s):
            events = await sub.next_events(config.heartbeat_interval_s)
        reason, resume_after = sub.cursor.close_reason, sub.cursor.resume_after
        sub.close()
        if (
            ws.application_state is WebSocketState.CONNECTED
            and ws.client_state is WebSocketState.CONNECTED
        ):
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(config.close_timeout_s):
                    if reason is CloseReason.DRAINING:
                        await ws.close(WS_CLOSE_RESTART, "service restart")
                    elif reason is CloseReason.SLOW_CONSUMER:
                        frame = b'{"op":"close",' + close_message(reason, resume_after)[1:]
                        await ws.send_text(frame.decode("utf-8"))
                        await ws.close(WS_CLOSE_TRY_AGAIN, f"resume_after={resume_after}")
                    elif reason is not CloseReason.CLIENT_GONE:
                        await ws.close()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sub.close()
