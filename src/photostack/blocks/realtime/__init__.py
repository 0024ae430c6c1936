"""Real-time delivery of per-key event logs: cursors, a local hub, pub/sub and transports.

Generic: a key is any string (the product uses user ids), an event is JSON with a ``seq`` that
increases per key and a ``type``. The log is the truth and pub/sub only wakes readers, so a lost
notification costs a read, never an event. Transports (SSE, long polling, WebSocket) share one
cursor semantics: resume after a seq, at-least-once, bounded buffering with a resume point.
"""

from ._cursor import CloseReason, CursorState, DeliveryCursor
from ._errors import (
    HubDrainingError,
    HubFullError,
    HubUnavailableError,
    LogUnavailableError,
    MalformedEventError,
    NotifierUnavailableError,
    RealtimeError,
)
from ._framing import (
    ClientOp,
    InvalidClientMessageError,
    close_message,
    parse_client_message,
    parse_last_event_id,
    poll_body,
    sse_close,
    sse_comment,
    sse_events,
    sse_retry,
)
from ._heap import GcControl, HeapFreezer
from ._hub import Hub, HubConfig, Notifier, Pusher, Subscription
from ._model import Event, EventLog, LogRead, last_seq
from ._redis import CHANNEL_PREFIX, RedisNotifier, RedisNotifierConfig, channel_for
from ._transports import (
    WS_CLOSE_RESTART,
    WS_CLOSE_TRY_AGAIN,
    EventStreamResponse,
    LongPollResponse,
    StreamConfig,
    serve_websocket,
)

__all__ = [
    "CHANNEL_PREFIX",
    "WS_CLOSE_RESTART",
    "WS_CLOSE_TRY_AGAIN",
    "ClientOp",
    "CloseReason",
    "CursorState",
    "DeliveryCursor",
    "Event",
    "EventLog",
    "EventStreamResponse",
    "GcControl",
    "HeapFreezer",
    "Hub",
    "HubConfig",
    "HubDrainingError",
    "HubFullError",
    "HubUnavailableError",
    "InvalidClientMessageError",
    "LogRead",
    "LogUnavailableError",
    "LongPollResponse",
    "MalformedEventError",
    "Notifier",
    "NotifierUnavailableError",
    "Pusher",
    "RealtimeError",
    "RedisNotifier",
    "RedisNotifierConfig",
    "StreamConfig",
    "Subscription",
    "channel_for",
    "close_message",
    "last_seq",
    "parse_client_message",
    "parse_last_event_id",
    "poll_body",
    "serve_websocket",
    "sse_close",
    "sse_comment",
    "sse_events",
    "sse_retry",
]
