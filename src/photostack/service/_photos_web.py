"""The web node's photo endpoints (API.md "Photos"): validate, authenticate, forward to an app.

- ``GET    /v1/photos/{id}`` -> 200 PHOTO | 404 ``photo_not_found``
- ``DELETE /v1/photos/{id}`` (auth) -> 204 | 401 | 403 ``forbidden`` (not the owner) | 404
- ``GET    /v1/users/{id}/photos?limit=&cursor=`` -> newest first | 404 ``user_not_found``

``POST /v1/photos`` (uploads) arrives with the upload issue and calls
``PhotoStore.create_photo_metadata`` on the app side.
"""

from __future__ import annotations

from typing import Annotated, Protocol
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Path, Query, Request
from starlette.responses import Response

from ._appclient import AppReply
from ._codec import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    InvalidCursorError,
    decode_cursor,
    is_plausible_id,
)
from ._http import ApiError

__all__ = ["WebCalls", "add_photo_routes"]

PhotoIdParam = Annotated[str, Path(description="an opaque photo id")]
UserIdParam = Annotated[str, Path(description="an opaque user id")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size, 1-100")]
CursorParam = Annotated[str | None, Query(description="next_cursor of the previous page")]


class WebCalls(Protocol):
    """What the routes need of the web node (``web.WebNode`` has it)."""

    def authenticate(self, request: Request) -> str: ...

    async def call(
        self, request: Request, method: str, path: str, body: bytes = b""
    ) -> AppReply: ...

    def relay(self, reply: AppReply) -> Response: ...


def add_photo_routes(app: FastAPI, node: WebCalls) -> None:
    def photo_not_found() -> ApiError:
        return ApiError(404, "photo_not_found", "no such photo")

    @app.get("/v1/photos/{photo_id}")
    async def get_photo(request: Request, photo_id: PhotoIdParam) -> Response:
        """One photo's metadata (PHOTO)."""
        if not is_plausible_id(photo_id):
            raise photo_not_found()
        return node.relay(await node.call(request, "GET", f"/internal/v1/photos/{photo_id}"))

    @app.delete("/v1/photos/{photo_id}", status_code=204)
    async def delete_photo(request: Request, photo_id: PhotoIdParam) -> Response:
        """Delete one of your photos."""
        actor = node.authenticate(request)
        if not is_plausible_id(photo_id):
            raise photo_not_found()
        path = f"/internal/v1/photos/{photo_id}?actor_id={quote(actor, safe='')}"
        return node.relay(await node.call(request, "DELETE", path))

    @app.get("/v1/users/{user_id}/photos")
    async def list_photos(
        request: Request,
        user_id: UserIdParam,
        limit: LimitParam = DEFAULT_LIMIT,
        cursor: CursorParam = None,
    ) -> Response:
        """A user's photos, newest first."""
        if not is_plausible_id(user_id):
            raise ApiError(404, "user_not_found", "no such user")
        query: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except InvalidCursorError as exc:
                raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
            query["cursor"] = cursor
        path = f"/internal/v1/users/{user_id}/photos?{urlencode(query)}"
        return node.relay(await node.call(request, "GET", path))
