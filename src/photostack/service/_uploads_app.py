"""The app node's half of uploads, tasks and the feed (internal API, docs/uploads.md).

- ``POST   /internal/v1/photos`` ``{"owner_id","caption","content_type","size_bytes",
  "original_key"}`` -> 202 ``{"photo","task"}`` | 503 ``queue_full`` (+ Retry-After; the
  metadata is undone) | 404 ``user_not_found`` | 422
- ``DELETE /internal/v1/photos/{id}?actor_id=`` -> 204: the photo store's delete, then a
  cleanup task (files, CDN purge, feed rows)
- ``GET    /internal/v1/tasks/{id}`` -> ``{"id","kind","status","attempts","result"}`` | 404
- ``GET    /internal/v1/users/{id}/feed?limit=&cursor=`` -> list page
- for the workers: ``POST /internal/v1/photos/{id}/ready`` ``{"thumbnail_key"}``,
  ``POST /internal/v1/photos/{id}/failed`` ``{"reason"}``, ``POST /internal/v1/feed/fanout``
  ``{"photo_id","after"}`` -> ``{"next","mode"}``, ``POST /internal/v1/feed/remove``
  ``{"photo_id","owner_id"}``, ``POST /internal/v1/media/references`` ``{"keys"}`` ->
  ``{"referenced"}`` (the keys some photo on some shard still uses) | 503 when a shard is out
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from photostack.blocks.queue import (
    PostgresQueue,
    QueueBackend,
    QueueConfig,
    QueueError,
    QueueFull,
    RetryPolicy,
    TaskNotFound,
)

from ._codec import DEFAULT_LIMIT, MAX_LIMIT, InvalidCursorError, decode_cursor, encode_cursor
from ._feed import FanoutMode, FeedConfig, FeedService, FeedStore
from ._http import ApiError, JsonResponse
from ._photos import (
    InvalidPhotoError,
    PhotoForbiddenError,
    PhotoNotFoundError,
    PhotoStatus,
    PhotoStore,
    ReferencesUnknownError,
)
from ._store import UserNotFoundError

if TYPE_CHECKING:
    from ._events import EventStore
    from .settings import AppSettings

__all__ = [
    "CLEANUP",
    "FANOUT",
    "TASK_POLICIES",
    "THUMBNAIL",
    "UploadService",
    "add_internal_upload_routes",
    "task_json",
]

log = logging.getLogger(__name__)

THUMBNAIL, FANOUT, CLEANUP = "thumbnail", "feed_fanout", "photo_cleanup"
TASK_POLICIES: Mapping[str, RetryPolicy] = {
    THUMBNAIL: RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=60.0),
    FANOUT: RetryPolicy(max_attempts=8, base_delay_s=1.0, max_delay_s=120.0),
    CLEANUP: RetryPolicy(max_attempts=8, base_delay_s=2.0, max_delay_s=300.0),
}


_MAX_REFERENCE_KEYS = 100


def task_json(info: Any) -> dict[str, Any]:
    """API.md's task object from a :class:`TaskInfo`."""
    return {
        "id": info.id,
        "kind": info.kind,
        "status": info.state.value,
        "attempts": info.attempts,
        "result": info.result,
    }


def _queue_unavailable() -> ApiError:
    return ApiError(503, "queue_unavailable", "the task queue is unavailable", {"Retry-After": "1"})


class UploadService:
    """The app node's queue producer and feed, started in the background (a queue database
    that is down delays uploads, not the node's readiness)."""

    def __init__(
        self,
        photos: PhotoStore,
        feed: FeedService | None,
        queue: QueueBackend | None,
    ) -> None:
        self.photos = photos
        self.feed_service = feed
        self._queue = queue
        self._queue_ready = False
        self._starter: asyncio.Task[None] | None = None

    @classmethod
    def for_app(
        cls, settings: AppSettings, router: Any, photos: PhotoStore, events: EventStore
    ) -> UploadService:
        feed = None
        if settings.cache_nodes:
            store = FeedStore(
                [(p.name, p.host, p.port) for p in settings.cache_nodes],
                FeedConfig(**settings.feed),
            )
            feed = FeedService(router, photos, events, store)
        queue = None
        if settings.queue_dsn:
            config = QueueConfig(
                name=settings.queue_name,
                max_length=settings.queue_max_length,
                policies=TASK_POLICIES,
            )
            queue = PostgresQueue(settings.queue_dsn, config)
        return cls(photos, feed, queue)

    def start(self) -> None:
        if self._queue is not None:
            self._starter = asyncio.create_task(self._connect(self._queue))

    async def _connect(self, queue: QueueBackend) -> None:
        delay = 0.05
        while True:
            try:
                await queue.start()
            except QueueError as exc:
                log.warning("queue not reachable (%s); retry in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            else:
                self._queue_ready = True
                return

    async def aclose(self) -> None:
        if self._starter is not None:
            self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        if self._queue is not None:
            await self._queue.aclose()
        if self.feed_service is not None:
            await self.feed_service.store.aclose()

    @property
    def queue(self) -> QueueBackend:
        if self._queue is None or not self._queue_ready:
            raise _queue_unavailable()
        return self._queue

    @property
    def feed(self) -> FeedService:
        if self.feed_service is None:
            raise ApiError(503, "feed_unavailable", "the feed needs cache nodes")
        return self.feed_service

    async def enqueue(self, kind: str, payload: dict[str, Any], key: str) -> str:
        """Raises ApiError 503 (queue full or unavailable)."""
        try:
            return await self.queue.enqueue(kind, payload, idempotency_key=key)
        except QueueFull as exc:
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            raise ApiError(
                503, "queue_full", "too much work is queued; retry later", {"Retry-After": retry}
            ) from exc
        except QueueError as exc:
            raise _queue_unavailable() from exc

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Metadata, then the thumbnail task; a refused enqueue undoes the metadata."""
        owner = body["owner_id"]
        photo = await self.photos.create_photo_metadata(
            owner,
            body.get("caption", ""),
            content_type=body.get("content_type"),
            size_bytes=body.get("size_bytes"),
            original_key=body.get("original_key"),
        )
        try:
            task_id = await self.enqueue(THUMBNAIL, {"photo_id": photo["id"]}, photo["id"])
        except BaseException:
            await asyncio.shield(self._undo(photo["id"], owner))
            raise
        return {"photo": photo, "task": {"id": task_id, "status_url": f"/v1/tasks/{task_id}"}}

    async def _undo(self, photo_id: str, owner: str) -> None:
        with contextlib.suppress(PhotoNotFoundError):
            await self.photos.delete_photo(photo_id, owner)

    async def mark_ready(self, photo_id: str, thumbnail_key: str, events: EventStore) -> Any:
        """Idempotent: a photo already ready (a redelivered task) is not moved again."""
        try:
            photo = await self.photos.set_status(
                photo_id, PhotoStatus.READY, thumbnail_key=thumbnail_key
            )
        except InvalidPhotoError:
            photo = await self.photos.get_photo(photo_id)
            if photo["status"] != PhotoStatus.READY.value:
                raise
        await events.produce(
            photo["owner_id"], "photo.ready", {"photo": photo}, dedupe_key=f"photo.ready:{photo_id}"
        )
        task_id = await self.enqueue(FANOUT, {"photo_id": photo_id}, f"fanout:{photo_id}")
        return {"photo": photo, "fanout_task": task_id}


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_body", "the body must be a JSON object")
    return body


def add_internal_upload_routes(
    app: FastAPI,
    uploads: Callable[[], UploadService],
    events: Callable[[], EventStore],
) -> None:
    """Register before ``add_internal_photo_routes``: this DELETE extends the photo store's."""
    not_found = ApiError(404, "photo_not_found", "no such photo")

    @app.post("/internal/v1/photos", status_code=202)
    async def create_photo(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body.get("owner_id"), str) or not isinstance(
            body.get("caption", ""), str
        ):
            raise ApiError(422, "invalid_field", "owner_id and caption must be strings")
        try:
            made = await uploads().create(body)
        except UserNotFoundError as exc:
            raise ApiError(404, "user_not_found", "no such user") from exc
        except InvalidPhotoError as exc:
            raise ApiError(422, exc.code, exc.message) from exc
        return JsonResponse(made, status_code=202)

    @app.delete("/internal/v1/photos/{photo_id}", status_code=204)
    async def delete_photo(photo_id: str, actor_id: str = "") -> Response:
        service = uploads()
        try:
            keys = await service.photos.delete_photo(photo_id, actor_id)
        except PhotoNotFoundError as exc:
            raise not_found from exc
        except PhotoForbiddenError as exc:
            raise ApiError(403, "forbidden", "only the owner may delete a photo") from exc
        files = [k for k in keys.values() if k]
        payload = {"photo_id": photo_id, "owner_id": actor_id, "keys": files}
        try:
            await service.enqueue(CLEANUP, payload, f"cleanup:{photo_id}")
        except ApiError as exc:  # the row is gone: readers skip it; files wait for a sweep
            log.warning("photo %s deleted, cleanup not queued: %s", photo_id, exc.message)
        return Response(status_code=204)

    @app.get("/internal/v1/tasks/{task_id}")
    async def task_status(task_id: str) -> Response:
        try:
            info = await uploads().queue.status(task_id)
        except TaskNotFound as exc:
            raise ApiError(404, "task_not_found", "no such task") from exc
        except QueueError as exc:
            raise _queue_unavailable() from exc
        return JsonResponse(task_json(info))

    @app.get("/internal/v1/users/{user_id}/feed")
    async def read_feed(
        user_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Response:
        try:
            after = decode_cursor(cursor) if cursor is not None else None
        except InvalidCursorError as exc:
            raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
        items, next_cursor = await uploads().feed.read(user_id, limit, after)
        encoded = encode_cursor(next_cursor) if next_cursor is not None else None
        return JsonResponse({"items": items, "next_cursor": encoded})

    _add_worker_routes(app, uploads, events)
    _add_reference_route(app, uploads)


def _add_worker_routes(
    app: FastAPI,
    uploads: Callable[[], UploadService],
    events: Callable[[], EventStore],
) -> None:
    """What the task handlers (service/tasks.py) call."""
    not_found = ApiError(404, "photo_not_found", "no such photo")

    @app.post("/internal/v1/photos/{photo_id}/ready")
    async def photo_ready(photo_id: str, request: Request) -> Response:
        key = (await _json_body(request)).get("thumbnail_key")
        if not isinstance(key, str) or not key:
            raise ApiError(422, "invalid_field", "thumbnail_key must be a string")
        try:
            return JsonResponse(await uploads().mark_ready(photo_id, key, events()))
        except PhotoNotFoundError as exc:
            raise not_found from exc
        except InvalidPhotoError as exc:
            raise ApiError(409, exc.code, exc.message) from exc

    @app.post("/internal/v1/photos/{photo_id}/failed")
    async def photo_failed(photo_id: str, request: Request) -> Response:
        raw = await request.body()
        reason = (await _json_body(request)).get("reason") if raw else None
        if reason is not None and not isinstance(reason, str):
            raise ApiError(422, "invalid_field", "reason must be a string")
        try:
            photo = await uploads().photos.set_status(photo_id, PhotoStatus.FAILED, reason=reason)
        except PhotoNotFoundError as exc:
            raise not_found from exc
        except InvalidPhotoError as exc:
            raise ApiError(409, exc.code, exc.message) from exc
        return JsonResponse({"photo": photo})

    @app.post("/internal/v1/feed/fanout")
    async def fanout(request: Request) -> Response:
        body = await _json_body(request)
        service = uploads()
        try:
            photo = await service.photos.get_photo(str(body.get("photo_id", "")))
        except PhotoNotFoundError as exc:
            raise not_found from exc
        if photo["status"] != PhotoStatus.READY.value:
            raise ApiError(409, "photo_not_ready", "only ready photos are fanned out")
        after = body.get("after")
        feed = service.feed
        if after is None:
            mode = await feed.begin_fanout(photo)
            if mode is FanoutMode.PULL:
                return JsonResponse({"next": None, "mode": mode.value})
            after = ""
        next_after = await feed.fanout_page(photo, str(after))
        return JsonResponse({"next": next_after, "mode": FanoutMode.PUSH.value})

    @app.post("/internal/v1/feed/remove", status_code=204)
    async def remove(request: Request) -> Response:
        body = await _json_body(request)
        await uploads().feed.remove_photo(str(body["owner_id"]), str(body["photo_id"]))
        return Response(status_code=204)


def _add_reference_route(app: FastAPI, uploads: Callable[[], UploadService]) -> None:
    """The cleanup task's question: which media keys does a photo still use?"""

    @app.post("/internal/v1/media/references")
    async def references(request: Request) -> Response:
        keys = (await _json_body(request)).get("keys")
        if (
            not isinstance(keys, list)
            or len(keys) > _MAX_REFERENCE_KEYS
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise ApiError(
                422, "invalid_field", f"keys must be 0-{_MAX_REFERENCE_KEYS} non-empty strings"
            )
        try:
            found = await uploads().photos.referenced_keys(keys)
        except ReferencesUnknownError as exc:
            raise ApiError(
                503, "references_unavailable", f"photos shard(s) did not answer: {exc}",
                {"Retry-After": "1"},
            ) from exc  # fmt: skip
        return JsonResponse({"referenced": sorted(found)})
