"""HTTP plumbing shared by the web and app nodes.

The error shape, the JSON media type, node health states, and one pure-ASGI middleware that stamps
``X-Request-Id`` / ``X-Served-By``, records Prometheus metrics and turns an unexpected exception
into a 500 in the error shape (the request's top-level boundary).
"""

from __future__ import annotations

import enum
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "JSON_MEDIA_TYPE",
    "ApiError",
    "HealthState",
    "JsonResponse",
    "NodeMiddleware",
    "error_body",
    "error_response",
    "install_error_handlers",
    "metrics_response",
]

log = logging.getLogger(__name__)

JSON_MEDIA_TYPE = "application/json; charset=utf-8"
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


class JsonResponse(JSONResponse):
    """JSON with the charset the contract names (Starlette only appends it to ``text/*``)."""

    media_type = JSON_MEDIA_TYPE


class ApiError(Exception):
    """An HTTP error in the contract's shape; raised by endpoints, rendered by a handler."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse(error_body(code, message), status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    429: "too_many_requests",
    503: "unavailable",
}


def _validation_error_response(exc: RequestValidationError) -> JsonResponse:
    errors: list[Any] = list(exc.errors())
    first: dict[str, Any] = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ())]
    if first.get("type") == "json_invalid" or len(loc) < 2:
        return error_response(400, "malformed_request", "the request could not be parsed")
    field = loc[1]
    code = "invalid_" + re.sub(r"[^a-z0-9]+", "_", field.lower()).strip("_")
    return error_response(422, code, f"{field}: {first.get('msg', 'invalid value')}")


def install_error_handlers(app: FastAPI) -> None:
    """Render ApiError, framework HTTP errors and validation errors in the contract's shape."""

    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_error_response(exc)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


class HealthState(enum.Enum):
    """A node's readiness: STARTING -> READY -> DRAINING (or STARTING -> DRAINING)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


_TRANSITIONS = {
    HealthState.STARTING: {HealthState.READY, HealthState.DRAINING},
    HealthState.READY: {HealthState.DRAINING},
    HealthState.DRAINING: set[HealthState](),
}


class Health:
    """The node's readiness state with legal transitions only."""

    def __init__(self) -> None:
        self._state = HealthState.STARTING

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._state is HealthState.READY

    def to(self, new: HealthState) -> None:
        if new is self._state:
            return
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"illegal health transition {self._state.value} -> {new.value}")
        self._state = new

    def response(self) -> JsonResponse:
        if self.is_ready:
            return JsonResponse({"status": self._state.value})
        return JsonResponse(
            {"status": self._state.value}, status_code=503, headers={"Retry-After": "1"}
        )

    def __repr__(self) -> str:
        return f"<Health {self._state.value}>"


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class NodeMiddleware:
    """Request id, served-by stamp, HTTP metrics and the 500 boundary for one node."""

    def __init__(self, app: ASGIApp, *, node_name: str, registry: CollectorRegistry) -> None:
        self.app = app
        self.node_name = node_name
        self.requests = Counter(
            "photostack_http_requests",
            "HTTP requests handled, by route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "photostack_http_request_duration_seconds",
            "HTTP request latency, by route template.",
            ["method", "route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope.get("headers", ()))
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def stamped_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("ascii")))
                if not any(k.lower() == b"x-served-by" for k, _ in headers):
                    headers.append((b"x-served-by", self.node_name.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, stamped_send)
        except Exception:  # the request's top-level boundary: log, answer 500, keep serving
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not response_started:
                response = error_response(500, "internal_error", "an unexpected error occurred")
                await response(scope, receive, stamped_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - started)


def _request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID_RE.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex
