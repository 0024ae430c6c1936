"""Wire formats, pure: Server-Sent Events frames, poll bodies, WebSocket control messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ._cursor import CloseReason
from ._model import Event

__all__ = [
    "ClientOp",
    "InvalidClientMessageError",
    "close_message",
    "parse_client_message",
    "parse_last_event_id",
    "poll_body",
    "sse_close",
    "sse_comment",
    "sse_events",
    "sse_retry",
]


def sse_events(events: Sequence[Event]) -> bytes:
    """``id: SEQ`` / ``event: TYPE`` / ``data: EVENT`` frames, one per event."""
    parts: list[bytes] = []
    for event in events:
        parts.append(b"id: %d\nevent: %s\n" % (event.seq, event.type.encode("utf-8")))
        for line in event.body.split(b"\n"):  # JSON encoders escape newlines; be safe anyway
            parts.append(b"data: " + line + b"\n")
        parts.append(b"\n")
    return b"".join(parts)


def sse_comment(text: str = "") -> bytes:
    """A comment line: keeps proxies and clients from timing the stream out."""
    return b": " + text.encode("utf-8") + b"\n\n"


def sse_retry(reconnect_ms: int) -> bytes:
    """The reconnection delay hint EventSource honours."""
    return b"retry: %d\n\n" % reconnect_ms


def close_message(reason: CloseReason, resume_after: int) -> bytes:
    """The JSON a transport sends before it closes: why, and where to resume."""
    return json.dumps(
        {"reason": reason.value, "resume_after": resume_after}, separators=(",", ":")
    ).encode("utf-8")


def sse_close(reason: CloseReason, resume_after: int, reconnect_ms: int) -> bytes:
    """The last frame of a stream the server ends: ``event: close`` plus a retry hint."""
    return (
        b"retry: %d\nevent: close\ndata: " % reconnect_ms
        + close_message(reason, resume_after)
        + b"\n\n"
    )


def parse_last_event_id(value: str | None) -> int | None:
    """The seq of a ``Last-Event-ID`` header: None when absent or empty; ValueError when bad."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 18:
        raise ValueError(f"Last-Event-ID {value!r} is not a seq")
    return int(text)


def poll_body(events: Sequence[Event], after: int) -> bytes:
    """``{"events": [...], "next": SEQ}`` with the events' own encodings."""
    next_seq = events[-1].seq if events else after
    return b'{"events":[' + b",".join(e.body for e in events) + b'],"next":%d}' % next_seq


class InvalidClientMessageError(ValueError):
    """A WebSocket frame from the client that is not a known op."""


@dataclass(frozen=True)
class ClientOp:
    """``{"op":"resume","after":SEQ?}`` or ``{"op":"ack","seq":SEQ}``."""

    op: str
    seq: int | None


def _seq_field(obj: dict[str, object], name: str, *, required: bool) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidClientMessageError(f"{name} must be an int >= 0")
    return value


def parse_client_message(text: str) -> ClientOp:
    """Parse one client frame. Raises InvalidClientMessageError."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidClientMessageError("not JSON") from exc
    if not isinstance(obj, dict):
        raise InvalidClientMessageError("not a JSON object")
    op = obj.get("op")
    if op == "resume":
        return ClientOp("resume", _seq_field(obj, "after", required=False))
    if op == "ack":
        return ClientOp("ack", _seq_field(obj, "seq", required=True))
    raise InvalidClientMessageError("op must be resume or ack")
