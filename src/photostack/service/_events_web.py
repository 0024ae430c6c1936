"""The web node's real-time endpoints (API.md "Real-time events") over the realtime block.

``GET /v1/events`` (short poll), ``GET /v1/events/wait`` (long poll), ``GET /v1/events/stream``
(SSE) and ``GET /v1/ws`` (WebSocket) all read the token user's log through the app tier
(:class:`AppEventLog`) and are woken by Redis pub/sub on the cache nodes (the same hash of the
user id the app publishes with). Auth: ``Authorization: Bearer`` or ``?access_token=``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request, WebSocket
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection
from starlette.responses import Response

from photostack.blocks.realtime import (
    Event,
    EventStreamResponse,
    HeapFreezer,
    Hub,
    HubConfig,
    HubUnavailableError,
    LogRead,
    LogUnavailableError,
    LongPollResponse,
    NotifierUnavailableError,
    RedisNotifier,
    StreamConfig,
    Subscription,
    parse_last_event_id,
    poll_body,
    serve_websocket,
)
from photostack.blocks.storage import HashModPartitioner

from ._appclient import AppClient
from ._http import JSON_MEDIA_TYPE, ApiError, error_response
from ._tokens import InvalidTokenError, TokenSigner
from .settings import WebSettings

__all__ = ["AppEventLog", "WebEvents", "add_event_routes"]

log = logging.getLogger(__name__)

MAX_WAIT_S = 60.0
MAX_READ = 100
_NO_POLL_FALLBACK_RESYNC_S = 1.0  # without pub/sub, each key's log is re-read this often
AfterParam = Annotated[int, Query(ge=0, description="the last seq the client has")]


class AppEventLog:
    """A user's event log as the app tier serves it (an ``EventLog``)."""

    def __init__(
        self,
        client: AppClient,
        unavailable_errors: tuple[type[BaseException], ...],
        timeout_s: float,
    ) -> None:
        self._client = client
        self._unavailable = unavailable_errors
        self._timeout_s = timeout_s

    async def read(self, key: str, after: int, *, limit: int, fresh: bool = False) -> LogRead:
        limit = max(1, min(limit, MAX_READ))  # the app's page size cap
        path = f"/internal/v1/users/{key}/events?after={after}&limit={limit}"
        if fresh:
            path += "&fresh=true"
        headers = [("x-request-id", uuid.uuid4().hex)]
        try:
            reply = await self._client.request(
                "GET", path, headers=headers, timeout_s=self._timeout_s
            )
        except self._unavailable as exc:
            raise LogUnavailableError(f"no app node for events: {exc!r}") from exc
        if reply.status != 200:
            raise LogUnavailableError(f"app answered {reply.status} to an events read")
        try:
            body = json.loads(reply.body)
            events = tuple(
                Event(e["seq"], e["type"], json.dumps(e, separators=(",", ":")).encode("utf-8"))
                for e in body["events"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LogUnavailableError("malformed events answer from the app tier") from exc
        return LogRead(events, more=bool(body.get("more")))


class WebEvents:
    """One web node's hub, its pub/sub links and transport settings."""

    def __init__(
        self,
        settings: WebSettings,
        client: AppClient,
        unavailable_errors: tuple[type[BaseException], ...],
        registry: CollectorRegistry,
    ) -> None:
        self.log = AppEventLog(client, unavailable_errors, settings.app_timeout_s)
        nodes = [(p.host, p.port) for p in settings.cache_nodes]
        self.hub = Hub(
            self.log,
            HubConfig(
                max_connections=settings.events_max_connections,
                max_buffered_events=settings.events_max_buffered,
                resync_interval_s=settings.events_resync_s if nodes else _NO_POLL_FALLBACK_RESYNC_S,
            ),
        )
        self.notifier: RedisNotifier | None = None
        if nodes:
            self.notifier = RedisNotifier(
                nodes,
                HashModPartitioner(len(nodes)).shard_for,
                on_events=self.hub.deliver,
                on_resync=self.hub.resync,
            )
            self.hub.notifier = self.notifier
        self.stream = StreamConfig(
            heartbeat_interval_s=settings.events_heartbeat_s,
            send_timeout_s=settings.events_send_timeout_s,
            reconnect_ms=settings.events_reconnect_ms,
        )
        gauge = Gauge(
            "photostack_web_event_connections",
            "Real-time connections (SSE, WebSocket, long polls) held by this node.",
            registry=registry,
        )
        self.hub.watch(gauge.set)
        registry.register(_DeliveryCollector(self.hub))
        # Held connections are long-lived: keep full GC collections from rescanning them.
        self.heap = HeapFreezer()
        self.hub.watch(self.heap)

    async def start(self) -> None:
        self.hub.start()
        if self.notifier is not None:
            await self.notifier.start(wait_s=2.0)

    def drain(self) -> int:
        """Close every stream with a reconnect hint (SSE retry + close, WebSocket 1012)."""
        return self.hub.drain()

    async def aclose(self) -> None:
        await self.hub.aclose()
        if self.notifier is not None:
            await self.notifier.aclose()


class _DeliveryCollector(Collector):
    """Live deliveries by path: ``direct`` (written to the socket at once, no task woken) or
    ``buffered`` (queued on the connection, its task woken to write it)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "photostack_web_event_deliveries",
            "Live event deliveries to held connections, by path (direct or buffered).",
            labels=["path"],
        )
        family.add_metric(["direct"], self._hub.pushed)
        family.add_metric(["buffered"], self._hub.woken)
        yield family


def user_of(conn: HTTPConnection, signer: TokenSigner) -> str:
    """The token user: ``Authorization: Bearer`` or ``?access_token=``. Raises ApiError 401."""
    challenge = {"WWW-Authenticate": "Bearer"}
    header = conn.headers.get("authorization")
    token = conn.query_params.get("access_token")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(
                401, "invalid_token", "the Authorization header is not a Bearer token", challenge
            )
        token = value.strip()
    if not token:
        raise ApiError(
            401,
            "missing_token",
            "an Authorization: Bearer token or ?access_token= is required",
            challenge,
        )
    try:
        return signer.verify(token)
    except InvalidTokenError as exc:
        raise ApiError(401, "invalid_token", "the token is invalid", challenge) from exc


def _unavailable(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "events_unavailable", message, {"Retry-After": str(retry_after_s)})


async def _open(events: WebEvents, user: str, after: int) -> tuple[Subscription, list[Event]]:
    """A live, primed subscription. Raises ApiError 503 (limit, draining, pub/sub, log)."""
    try:
        sub = await events.hub.open(user, after)
    except HubUnavailableError as exc:
        raise _unavailable(str(exc), exc.retry_after_s) from exc
    except NotifierUnavailableError as exc:
        raise _unavailable("event notifications are unavailable") from exc
    try:
        first = await sub.prime()
    except LogUnavailableError as exc:
        sub.close()
        raise _unavailable("the event log is unavailable") from exc
    except BaseException:
        sub.close()
        raise
    return sub, first


def _json(body: bytes) -> Response:
    return Response(body, media_type=JSON_MEDIA_TYPE, headers={"Cache-Control": "no-store"})


def add_event_routes(app: FastAPI, signer: TokenSigner, events: WebEvents) -> None:
    @app.get("/v1/events")
    async def poll_events(request: Request, after: AfterParam = 0) -> Response:
        """Short polling: the token user's events after ``after``, at once."""
        user = user_of(request, signer)
        try:
            read = await events.log.read(user, after, limit=events.hub.config.max_batch_events)
        except LogUnavailableError as exc:
            raise _unavailable("the event log is unavailable") from exc
        return _json(poll_body(read.events, after))

    @app.get("/v1/events/wait")
    async def wait_events(
        request: Request,
        after: AfterParam = 0,
        timeout_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 30.0,
    ) -> Response:
        """Long polling: as soon as there is >= 1 event, or after ``timeout_s`` with none."""
        user = user_of(request, signer)
        sub, first = await _open(events, user, after)
        if first or timeout_s == 0:
            sub.sent(first)
            sub.close()
            return _json(poll_body(first, after))
        return LongPollResponse(sub, after, timeout_s, events.stream)

    @app.get("/v1/events/stream")
    async def stream_events(
        request: Request,
        after: AfterParam = 0,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Server-Sent Events; ``Last-Event-ID`` (a reconnecting EventSource) wins over after."""
        user = user_of(request, signer)
        try:
            resume = parse_last_event_id(last_event_id)
        except ValueError as exc:
            raise ApiError(422, "invalid_last_event_id", "Last-Event-ID must be a seq") from exc
        sub, first = await _open(events, user, after if resume is None else resume)
        return EventStreamResponse(sub, first, events.stream)

    @app.websocket("/v1/ws")
    async def websocket_events(websocket: WebSocket) -> None:
        """WebSocket: EVENT frames; the client may send resume and ack ops."""
        try:
            user = user_of(websocket, signer)
            after = _after_param(websocket.query_params.getlist("after"))
            sub, first = await _open(events, user, after)
        except ApiError as exc:
            await _deny(websocket, exc)
            return
        await websocket.accept()
        await serve_websocket(websocket, sub, first, events.stream)


def _after_param(values: Sequence[str]) -> int:
    if not values:
        return 0
    text = values[-1]
    if not text.isdigit() or len(text) > 18:
        raise ApiError(422, "invalid_after", "after: must be an integer >= 0")
    return int(text)


async def _deny(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse a handshake: the error shape when the server can send it, else a close code."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(
            error_response(exc.status, exc.code, exc.message, exc.headers)
        )
        return
    if exc.status == 503:  # accept, then "try again later", so the client can tell it apart
        await websocket.accept()
        await websocket.close(1013, exc.code)
        return
    await websocket.close(1008, exc.code)  # before accept: the server answers 403
