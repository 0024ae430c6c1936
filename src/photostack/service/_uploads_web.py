"""The web node's upload, feed and task endpoints (API.md "Photos, feed, tasks").

- ``POST /v1/photos`` (auth, multipart ``file`` + ``caption``) -> 202 ``{"photo","task"}`` |
  413 ``payload_too_large`` | 415 ``unsupported_media_type`` | 422 | 503 (+ Retry-After)
- ``GET  /v1/feed?limit=&cursor=`` (auth) -> ready photos of followed users, newest first
- ``GET  /v1/tasks/{id}`` (auth) -> ``{"id","kind","status","attempts","result"}`` | 404
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Protocol
from urllib.parse import urlencode

from fastapi import FastAPI, Path, Query, Request
from starlette.responses import Response

from ._appclient import AppReply
from ._codec import DEFAULT_LIMIT, MAX_LIMIT, InvalidCursorError, decode_cursor, is_plausible_id
from ._http import ApiError
from ._uploads import InvalidUpload, MediaStore, UploadParts, UploadReader, check_image, read_all

__all__ = ["add_upload_routes"]

log = logging.getLogger(__name__)


class UploadCalls(Protocol):
    def authenticate(self, request: Request) -> str: ...

    async def call(
        self, request: Request, method: str, path: str, body: bytes = b""
    ) -> AppReply: ...

    def relay(self, reply: AppReply) -> Response: ...


def _refuse(exc: InvalidUpload) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


async def read_upload(request: Request, max_file_bytes: int) -> UploadParts:
    """Stream the request body through an UploadReader. Raises ApiError 400/413/415/422."""
    try:
        reader = UploadReader(request.headers.get("content-type"), max_file_bytes)
        reader.declared_length(request.headers.get("content-length"))
        async for chunk in request.stream():
            reader.feed(chunk)
        return reader.finish()
    except InvalidUpload as exc:
        raise _refuse(exc) from exc


async def _ensure_after_commit(media: MediaStore, key: str, data: bytes) -> None:
    """The photo row now refers to ``key``: rewrite the file if a concurrent cleanup of an
    identical photo removed it between our put and our commit (docs/uploads.md "Shared
    files"). The upload is already accepted, so a failure here is logged, not answered."""
    try:
        if await media.ensure(key, data):
            log.warning("media %s was removed by a concurrent cleanup; rewritten", key)
    except OSError as exc:
        log.warning("could not re-check media %s after its upload: %r", key, exc)


def add_upload_routes(
    app: FastAPI, node: UploadCalls, media: MediaStore | None, max_file_bytes: int
) -> None:
    @app.post("/v1/photos", status_code=202)
    async def upload_photo(request: Request) -> Response:
        """Upload a photo (multipart ``file`` and ``caption``); answered once stored and queued."""
        actor = node.authenticate(request)
        if media is None:
            raise ApiError(503, "media_unavailable", "no media origin is configured")
        parts = await read_upload(request, max_file_bytes)
        try:
            assert parts.file is not None
            try:
                content_type = await asyncio.to_thread(check_image, parts.file)
            except InvalidUpload as exc:
                raise _refuse(exc) from exc
            data = await asyncio.to_thread(read_all, parts.file)
        finally:
            parts.close()
        try:
            stored = await media.put(data, content_type)
        except OSError as exc:
            log.warning("media origins refused an upload: %r", exc)
            raise ApiError(
                503, "media_unavailable", "the media origins are unavailable", {"Retry-After": "1"}
            ) from exc
        body = json.dumps(
            {
                "owner_id": actor,
                "caption": parts.caption,
                "content_type": content_type,
                "size_bytes": parts.size,
                "original_key": stored.key,
            }
        ).encode()
        reply = await node.call(request, "POST", "/internal/v1/photos", body)
        if reply.status == 202:
            await _ensure_after_commit(media, stored.key, data)
        return node.relay(reply)

    @app.get("/v1/feed")
    async def feed(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size, 1-100")] = (
            DEFAULT_LIMIT
        ),
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> Response:
        """Ready photos of the users you follow, newest first."""
        actor = node.authenticate(request)
        query: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except InvalidCursorError as exc:
                raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
            query["cursor"] = cursor
        path = f"/internal/v1/users/{actor}/feed?{urlencode(query)}"
        return node.relay(await node.call(request, "GET", path))

    @app.get("/v1/tasks/{task_id}")
    async def task_status(
        request: Request, task_id: Annotated[str, Path(description="a task id")]
    ) -> Response:
        """A queued task's status."""
        node.authenticate(request)
        if not is_plausible_id(task_id):
            raise ApiError(404, "task_not_found", "no such task")
        return node.relay(await node.call(request, "GET", f"/internal/v1/tasks/{task_id}"))
