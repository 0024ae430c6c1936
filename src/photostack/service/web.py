"""The web node: the public HTTP API for users and follows (API.md).

It authenticates (bearer tokens, verified locally), validates, and forwards to an app node through
an :class:`AppClient`; it never touches storage. Every response carries ``X-Request-Id`` and
``X-Served-By: <web>[,<app>]``.
"""

from __future__ import annotations

import contextlib
import email.message
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, Path, Query, Request
from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response

from ._appclient import AppClient, AppReply, AppResponse
from ._codec import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    CreateUserIn,
    InvalidCursorError,
    InvalidInputError,
    decode_cursor,
    is_plausible_id,
    is_valid_username,
    parse_create_user,
)
from ._events_web import WebEvents, add_event_routes
from ._http import (
    JSON_MEDIA_TYPE,
    ApiError,
    Health,
    HealthState,
    JsonResponse,
    NodeMiddleware,
    install_error_handlers,
    metrics_response,
)
from ._photos_web import add_photo_routes
from ._tokens import InvalidTokenError, TokenSigner
from ._uploads import media_store_from
from ._uploads_web import add_upload_routes
from .settings import WebSettings

__all__ = ["AppClient", "AppReply", "AppResponse", "create_app"]

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
UserIdParam = Annotated[str, Path(description="an opaque user id")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size, 1-100")]
CursorParam = Annotated[str | None, Query(description="next_cursor of the previous page")]
# X-Cache: hit|miss of cached reads; X-Read-After / X-Data-Stale: docs/replication.md
_FORWARDED_HEADERS = ("retry-after", "x-cache", "x-read-after", "x-data-stale")


class WebNode:
    """One web node's collaborators: token signer, app client, health and metrics."""

    def __init__(
        self,
        settings: WebSettings,
        app_client: AppClient,
        unavailable_errors: tuple[type[BaseException], ...],
    ) -> None:
        self.settings = settings
        self.client = app_client
        self.unavailable_errors = unavailable_errors
        self.signer = TokenSigner(settings.token_secret_path.read_bytes())
        self.health = Health()
        self.registry = CollectorRegistry()
        self.app_unavailable = Counter(
            "photostack_web_app_unavailable",
            "Requests answered 503 because no app node could be reached.",
            registry=self.registry,
        )

    def authenticate(self, request: Request) -> str:
        """The user id of the request's bearer token. Raises ApiError 401."""
        challenge = {"WWW-Authenticate": "Bearer"}
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(
                401, "missing_token", "an Authorization: Bearer token is required", challenge
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "invalid_token", "the Authorization header is not a Bearer token", challenge
            )
        try:
            return self.signer.verify(token)
        except InvalidTokenError as exc:
            raise ApiError(401, "invalid_token", "the token is invalid", challenge) from exc

    async def call(self, request: Request, method: str, path: str, body: bytes = b"") -> AppReply:
        """One request to the app tier. Raises ApiError 503 ``app_unavailable``."""
        headers = [("x-request-id", str(request.state.request_id))]
        read_after = request.headers.get("x-read-after")  # read-your-writes token
        if read_after:
            headers.append(("x-read-after", read_after[:2048]))
        if body:
            headers.append(("content-type", JSON_MEDIA_TYPE))
        try:
            return await self.client.request(
                method, path, headers=headers, body=body, timeout_s=self.settings.app_timeout_s
            )
        except self.unavailable_errors as exc:
            self.app_unavailable.inc()
            log.warning("app tier unavailable for %s %s: %r", method, path, exc)
            raise ApiError(
                503, "app_unavailable", "no app node is available", {"Retry-After": "1"}
            ) from exc

    def served_by(self, reply: AppReply) -> str:
        app_name = next((v for k, v in reply.headers if k.lower() == "x-served-by"), reply.backend)
        return f"{self.settings.name},{app_name}" if app_name else self.settings.name

    def relay(self, reply: AppReply) -> Response:
        """The app's answer as ours: status and body as they are, our headers."""
        headers = {"X-Served-By": self.served_by(reply)}
        for key, value in reply.headers:
            if key.lower() in _FORWARDED_HEADERS:
                headers[key] = value
        if reply.status == 204 or not reply.body:
            return Response(status_code=reply.status, headers=headers)
        return Response(reply.body, reply.status, headers=headers, media_type=JSON_MEDIA_TYPE)

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body. Raises ApiError 400 / 413 / 415."""
        content_type = request.headers.get("content-type")
        if content_type:
            parsed = email.message.Message()
            parsed["content-type"] = content_type
            subtype = parsed.get_content_subtype()
            if parsed.get_content_maintype() != "application" or not (
                subtype == "json" or subtype.endswith("+json")
            ):
                raise ApiError(415, "unsupported_media_type", "send application/json")
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from exc


def _not_found() -> ApiError:
    return ApiError(404, "user_not_found", "no such user")


def create_app(
    settings: WebSettings,
    app_client: AppClient,
    *,
    unavailable_errors: tuple[type[BaseException], ...] = (),
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
) -> FastAPI:
    """The web node's ASGI application.

    ``unavailable_errors``: what ``app_client`` raises when no app node can answer (the cluster
    passes ``(BalancerError,)``); each becomes 503 ``app_unavailable`` with ``Retry-After``.
    ``on_startup`` / ``on_shutdown`` run in the lifespan (e.g. to start and close the client).
    Raises OSError when the token secret cannot be read, ValueError when it is too short.
    """
    node = WebNode(settings, app_client, unavailable_errors)
    media = media_store_from(settings.media)  # the origins uploads are stored on
    events = WebEvents(settings, app_client, unavailable_errors, node.registry)

    async def drain() -> None:
        """Before the server stops: 503 on /healthz, streams closed with a reconnect hint."""
        node.health.to(HealthState.DRAINING)
        events.drain()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        await events.start()
        node.health.to(HealthState.READY)
        try:
            yield
        finally:
            node.health.to(HealthState.DRAINING)
            await events.aclose()
            if media is not None:
                await media.aclose()
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(
        title="photostack",
        summary="Public HTTP API (see API.md)",
        lifespan=lifespan,
        default_response_class=JsonResponse,
    )
    app.state.node = node
    app.state.events = events
    app.state.drain = drain  # the node runner calls it on SIGTERM, before the server drains
    install_error_handlers(app)
    app.add_middleware(NodeMiddleware, node_name=settings.name, registry=node.registry)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return node.health.response()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response(node.registry)

    _add_user_routes(app, node)
    _add_follow_routes(app, node)
    add_event_routes(app, node.signer, events)
    add_photo_routes(app, node)
    add_upload_routes(app, node, media, settings.upload_max_bytes)
    return app


def _add_user_routes(app: FastAPI, node: WebNode) -> None:
    @app.post(
        "/v1/users",
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CreateUserIn.model_json_schema()}},
            }
        },
    )
    async def create_user(request: Request) -> Response:
        """Register a user; the answer carries their bearer token."""
        try:
            payload = parse_create_user(await node.read_json(request))
        except InvalidInputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from exc
        reply = await node.call(
            request, "POST", "/internal/v1/users", payload.model_dump_json().encode()
        )
        if reply.status != 201:
            return node.relay(reply)
        user = json.loads(reply.body)
        user["token"] = node.signer.issue(user["id"])
        headers = {"X-Served-By": node.served_by(reply)}
        headers.update((k, v) for k, v in reply.headers if k.lower() == "x-read-after")
        return JsonResponse(user, status_code=201, headers=headers)

    @app.get("/v1/users/by-username/{username}")
    async def get_user_by_username(request: Request, username: str) -> Response:
        if not is_valid_username(username):
            raise _not_found()
        return node.relay(
            await node.call(request, "GET", f"/internal/v1/users/by-username/{username}")
        )

    @app.get("/v1/users/{user_id}")
    async def get_user(request: Request, user_id: UserIdParam) -> Response:
        if not is_plausible_id(user_id):
            raise _not_found()
        return node.relay(await node.call(request, "GET", f"/internal/v1/users/{user_id}"))


def _add_follow_routes(app: FastAPI, node: WebNode) -> None:
    async def edge_write(request: Request, method: str, user_id: str, target_id: str) -> Response:
        actor = node.authenticate(request)
        if actor != user_id:
            raise ApiError(403, "forbidden", "you may only change your own follows")
        if method == "PUT" and target_id == user_id:
            raise ApiError(422, "self_follow", "a user cannot follow themselves")
        if not is_plausible_id(target_id):
            if method == "DELETE":
                return Response(status_code=204)  # nothing can exist there: already unfollowed
            raise _not_found()
        path = f"/internal/v1/users/{user_id}/following/{target_id}"
        return node.relay(await node.call(request, method, path))

    @app.put("/v1/users/{user_id}/following/{target_id}", status_code=204)
    async def follow(request: Request, user_id: UserIdParam, target_id: UserIdParam) -> Response:
        """Follow ``target_id`` as ``user_id`` (the token's user). Idempotent."""
        return await edge_write(request, "PUT", user_id, target_id)

    @app.delete("/v1/users/{user_id}/following/{target_id}", status_code=204)
    async def unfollow(request: Request, user_id: UserIdParam, target_id: UserIdParam) -> Response:
        """Stop following ``target_id``. Idempotent."""
        return await edge_write(request, "DELETE", user_id, target_id)

    async def edge_list(
        request: Request, which: str, user_id: str, limit: int, cursor: str | None
    ) -> Response:
        if not is_plausible_id(user_id):
            raise _not_found()
        query: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except InvalidCursorError as exc:
                raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
            query["cursor"] = cursor
        path = f"/internal/v1/users/{user_id}/{which}?{urlencode(query)}"
        return node.relay(await node.call(request, "GET", path))

    @app.get("/v1/users/{user_id}/following")
    async def list_following(
        request: Request,
        user_id: UserIdParam,
        limit: LimitParam = DEFAULT_LIMIT,
        cursor: CursorParam = None,
    ) -> Response:
        """Users that ``user_id`` follows, most recently followed first."""
        return await edge_list(request, "following", user_id, limit, cursor)

    @app.get("/v1/users/{user_id}/followers")
    async def list_followers(
        request: Request,
        user_id: UserIdParam,
        limit: LimitParam = DEFAULT_LIMIT,
        cursor: CursorParam = None,
    ) -> Response:
        """Users following ``user_id``, most recent first."""
        return await edge_list(request, "followers", user_id, limit, cursor)
