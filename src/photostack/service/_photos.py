"""Photo metadata: the ``photos`` group, sharded by owner (a user's photos on one shard).

Photo ids carry their owner: ``<owner id>_<16-char time-ordered id>``. The owner id is the
photos group's sharding key, so ``GET``/``DELETE /v1/photos/{id}`` find the shard from the id
alone, with no scatter and no lookup table, through any reshard (placement stays by owner).
Every write runs in one transaction on the owner's shard behind the ownership guard
(``directory/_guard.py``): a shard that no longer owns the owner answers "wrong shard", the app
refreshes its map and retries once.

Status: ``processing -> ready | failed`` (:data:`TRANSITIONS`); ``urls.thumbnail`` is null until
ready. URLs are absolute on the static host (``AppSettings.static_base_url``).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import asyncpg
from fastapi import FastAPI, Query
from starlette.responses import Response

from photostack.blocks.storage import ShardRouter, scatter_gather

from ._caching import ProductCache, cached_response, json_bytes
from ._codec import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Cursor,
    InvalidCursorError,
    decode_cursor,
    encode_cursor,
    format_time,
    new_id,
)
from ._http import JSON_MEDIA_TYPE, ApiError, JsonResponse
from ._store import DomainError, Page, UserNotFoundError
from .directory import NO_GUARD, OwnershipGuard

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "CAPTION_MAX_CHARS",
    "FAILURE_REASON_MAX_CHARS",
    "TRANSITIONS",
    "InvalidPhotoError",
    "Invalidate",
    "PhotoForbiddenError",
    "PhotoNotFoundError",
    "PhotoStatus",
    "PhotoStore",
    "ReferencesUnknownError",
    "add_internal_photo_routes",
    "new_photo_id",
    "owner_of_photo",
]

T = TypeVar("T")
# Drops cache keys (``user:<id>``, ``photo:<id>``...) after a write: the app's ProductCache.
Invalidate = Callable[[Sequence[str]], Awaitable[None]]
CAPTION_MAX_CHARS = 2200
_LOCAL_ID_CHARS = 16


class PhotoNotFoundError(DomainError):
    pass


class PhotoForbiddenError(DomainError):
    """The actor is not the photo's owner."""


class ReferencesUnknownError(DomainError):
    """A photos shard did not answer a reference lookup (its args name the shards)."""


class InvalidPhotoError(DomainError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PhotoStatus(enum.Enum):
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


TRANSITIONS: dict[PhotoStatus, frozenset[PhotoStatus]] = {
    PhotoStatus.PROCESSING: frozenset({PhotoStatus.READY, PhotoStatus.FAILED}),
    PhotoStatus.READY: frozenset(),
    PhotoStatus.FAILED: frozenset(),
}


async def no_invalidation(keys: Sequence[str]) -> None:
    return None


def new_photo_id(owner_id: str, now_ms: int | None = None, random_bits: int | None = None) -> str:
    """``<owner id>_<time-ordered id>``: the owner (the shard key) is readable from the id."""
    return f"{owner_id}_{new_id(now_ms, random_bits)}"


def owner_of_photo(photo_id: str) -> str:
    """The owner id inside ``photo_id``. Raises PhotoNotFoundError for an id of another shape
    (no photo can have it)."""
    owner, sep, local = photo_id.rpartition("_")
    if not sep or not owner or len(local) != _LOCAL_ID_CHARS:
        raise PhotoNotFoundError(photo_id)
    return owner


_INSERT = (
    "INSERT INTO photos (id, owner_id, caption, status, content_type, size_bytes, original_key) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "RETURNING id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
    "failure_reason"
)
_GET = (
    "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
    "failure_reason FROM photos WHERE id = $1"
)
_DELETE = "DELETE FROM photos WHERE id = $1 AND owner_id = $2 RETURNING original_key, thumbnail_key"
_SET_STATUS = (
    "UPDATE photos SET status = $3, thumbnail_key = coalesce($4, thumbnail_key), "
    "failure_reason = $5, updated_at = now() WHERE id = $1 AND status = $2 "
    "RETURNING id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
    "failure_reason"
)
_LIST_FIRST = (
    "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
    "failure_reason FROM photos WHERE owner_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
)
_LIST_AFTER = (
    "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
    "failure_reason FROM photos WHERE owner_id = $1 AND (created_at, id) < ($3, $4) "
    "ORDER BY created_at DESC, id DESC LIMIT $2"
)
# A photo's cleanup (docs/uploads.md "Shared files"): which of these media keys does any photo
# on this shard still refer to? Each is served by its own index (schema photos v3).
_REFERENCED_ORIGINAL = "SELECT original_key AS key FROM photos WHERE original_key = ANY($1::text[])"
_REFERENCED_THUMBNAIL = (
    "SELECT thumbnail_key AS key FROM photos WHERE thumbnail_key = ANY($1::text[])"
)
FAILURE_REASON_MAX_CHARS = 300
_USERS = "SELECT id, username, display_name, created_at FROM users WHERE id = ANY($1::text[])"


class PhotoStore:
    """Photo metadata over the ``photos`` group; owners checked on the ``users`` group."""

    def __init__(
        self,
        router: ShardRouter[Pool],
        *,
        static_base_url: str,
        guard: OwnershipGuard = NO_GUARD,
        invalidate: Invalidate | None = None,
        reads: ShardRouter[Any] | None = None,
    ) -> None:
        self._router = router
        # Reads a caller marks ``replica=True``: a replica within the group's lag bound and past
        # the request's read-your-writes token, else the primary (docs/replication.md).
        self._reads: ShardRouter[Any] = reads if reads is not None else router
        self._base = static_base_url.rstrip("/")
        self._guard = guard
        self._invalidate = invalidate or no_invalidation

    def photo_json(self, row: asyncpg.Record) -> dict[str, Any]:
        """The PHOTO shape of API.md."""
        original, thumbnail = row["original_key"], row["thumbnail_key"]
        made: dict[str, Any] = {
            "id": row["id"],
            "owner_id": row["owner_id"],
            "caption": row["caption"],
            "created_at": format_time(row["created_at"]),
            "status": row["status"],
            "urls": {
                "original": f"{self._base}/media/{original}" if original else None,
                "thumbnail": (
                    f"{self._base}/media/{thumbnail}"
                    if thumbnail and row["status"] == PhotoStatus.READY.value
                    else None
                ),
            },
        }
        if row["status"] == PhotoStatus.FAILED.value:  # why, for the owner (API.md PHOTO)
            made["failure_reason"] = row["failure_reason"] or "processing failed"
        return made

    async def _owner_exists(self, owner_id: str) -> bool:
        pool = self._router.shard_for("users", owner_id)
        return bool(await pool.fetch(_USERS, [owner_id]))

    async def _guarded(self, owner_id: str, action: Callable[[Any], Awaitable[T]]) -> T:
        """``action(conn)`` in one transaction on the owner's shard, ownership verified first."""

        async def attempt() -> T:
            pool = self._router.shard_for("photos", owner_id)
            async with pool.acquire() as conn, conn.transaction():
                await self._guard.verify(conn, "photos", owner_id)
                return await action(conn)

        return await self._guard.retrying(attempt)

    async def create_photo_metadata(
        self,
        owner_id: str,
        caption: str,
        *,
        content_type: str | None = None,
        size_bytes: int | None = None,
        original_key: str | None = None,
        photo_id: str | None = None,
    ) -> dict[str, Any]:
        """Record a new photo (status ``processing``) and return its PHOTO object.

        For the upload path: it stores the original first, then calls this with its key.
        Raises InvalidPhotoError (caption too long, a photo id not the owner's),
        UserNotFoundError (no such owner).
        """
        if len(caption) > CAPTION_MAX_CHARS:
            raise InvalidPhotoError(
                "invalid_caption", f"caption must be at most {CAPTION_MAX_CHARS} characters"
            )
        photo_id = photo_id or new_photo_id(owner_id)
        if owner_of_photo(photo_id) != owner_id:
            raise InvalidPhotoError("invalid_photo_id", "a photo id must embed its owner's id")
        if not await self._owner_exists(owner_id):
            raise UserNotFoundError(owner_id)

        async def insert(conn: Any) -> asyncpg.Record:
            row: asyncpg.Record | None = await conn.fetchrow(
                _INSERT,
                photo_id,
                owner_id,
                caption,
                PhotoStatus.PROCESSING.value,
                content_type,
                size_bytes,
                original_key,
            )
            assert row is not None
            return row

        made = self.photo_json(await self._guarded(owner_id, insert))
        await self._invalidate([f"user:{owner_id}"])  # photos_count
        return made

    async def get_photo(self, photo_id: str, *, replica: bool = False) -> dict[str, Any]:
        """Raises PhotoNotFoundError. ``replica``: a client's read that may be served by a
        replica (never a worker's or the feed's: they act on what they read)."""
        owner_id = owner_of_photo(photo_id)
        pools = self._reads if replica else self._router
        row = await pools.shard_for("photos", owner_id).fetchrow(_GET, photo_id)
        if row is None:
            raise PhotoNotFoundError(photo_id)
        return self.photo_json(row)

    async def delete_photo(self, photo_id: str, actor_id: str) -> dict[str, str | None]:
        """Delete as ``actor_id``; returns the media keys the photo had (for the media store).

        Raises PhotoNotFoundError, PhotoForbiddenError (not the owner's).
        """
        owner_id = owner_of_photo(photo_id)

        async def delete(conn: Any) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(_GET, photo_id)
            if row is None:
                raise PhotoNotFoundError(photo_id)
            if row["owner_id"] != actor_id:
                raise PhotoForbiddenError(photo_id)
            deleted: asyncpg.Record | None = await conn.fetchrow(_DELETE, photo_id, actor_id)
            return deleted

        deleted = await self._guarded(owner_id, delete)
        if deleted is None:  # deleted concurrently
            raise PhotoNotFoundError(photo_id)
        await self._invalidate([f"user:{owner_id}", f"photo:{photo_id}"])
        return {"original": deleted["original_key"], "thumbnail": deleted["thumbnail_key"]}

    async def set_status(
        self,
        photo_id: str,
        status: PhotoStatus,
        *,
        thumbnail_key: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Move a photo along :data:`TRANSITIONS` (for the media worker); ``reason`` is kept
        on a failed photo (cut to :data:`FAILURE_REASON_MAX_CHARS`).

        Raises PhotoNotFoundError, InvalidPhotoError ``invalid_transition``.
        """
        owner_id = owner_of_photo(photo_id)
        if status is not PhotoStatus.FAILED:
            reason = None
        elif reason is not None:
            reason = reason[:FAILURE_REASON_MAX_CHARS]

        async def update(conn: Any) -> asyncpg.Record:
            row: asyncpg.Record | None = await conn.fetchrow(_GET, photo_id)
            if row is None:
                raise PhotoNotFoundError(photo_id)
            current = PhotoStatus(row["status"])
            if status not in TRANSITIONS[current]:
                raise InvalidPhotoError(
                    "invalid_transition", f"a {current.value} photo cannot become {status.value}"
                )
            updated: asyncpg.Record | None = await conn.fetchrow(
                _SET_STATUS, photo_id, current.value, status.value, thumbnail_key, reason
            )
            if updated is None:  # another worker moved it first
                raise InvalidPhotoError("invalid_transition", "the status changed concurrently")
            return updated

        updated = self.photo_json(await self._guarded(owner_id, update))
        await self._invalidate([f"photo:{photo_id}"])
        return updated

    async def referenced_keys(
        self, keys: Sequence[str], *, deadline_s: float = 10.0
    ) -> frozenset[str]:
        """Which of ``keys`` any photo on any photos shard still has as its original or its
        thumbnail (media keys are content addresses, shared by byte-identical uploads).

        Scatters over every photos shard (indexed lookups). Raises ReferencesUnknownError when
        a shard did not answer: an incomplete answer must never let a caller delete a file.
        """
        wanted = sorted(set(keys))
        if not wanted:
            return frozenset()
        shards = self._router.shards("photos")

        async def one(index: int) -> set[str]:
            pool = shards[index]
            found = {r["key"] for r in await pool.fetch(_REFERENCED_ORIGINAL, wanted)}
            found |= {r["key"] for r in await pool.fetch(_REFERENCED_THUMBNAIL, wanted)}
            return found

        calls: dict[str, Callable[[], Awaitable[set[str]]]] = {
            f"photos-{i}": (lambda i=i: one(i))  # type: ignore[misc]
            for i in range(len(shards))
        }
        gathered = await scatter_gather(calls, deadline_s=deadline_s)
        if not gathered.complete:
            raise ReferencesUnknownError(", ".join(sorted(gathered.failures)))
        return frozenset().union(*gathered.results.values())

    async def list_photos(
        self, owner_id: str, limit: int, after: Cursor | None, *, replica: bool = False
    ) -> Page:
        """One page of ``owner_id``'s photos, newest first. Raises UserNotFoundError.
        ``replica`` as for :meth:`get_photo`."""
        pool = (self._reads if replica else self._router).shard_for("photos", owner_id)
        if after is None:
            rows = await pool.fetch(_LIST_FIRST, owner_id, limit + 1)
        else:
            rows = await pool.fetch(_LIST_AFTER, owner_id, limit + 1, after.created_at, after.id)
        if not rows and not await self._owner_exists(owner_id):
            raise UserNotFoundError(owner_id)
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = Cursor(page[-1]["created_at"], page[-1]["id"])
        return Page([self.photo_json(r) for r in page], next_cursor)


def add_internal_photo_routes(
    app: FastAPI, store: Callable[[], PhotoStore], cache: ProductCache | None = None
) -> None:
    """The app node's photo endpoints (the web node has authenticated the actor):

    - ``GET    /internal/v1/photos/{id}`` -> 200 PHOTO | 404 ``photo_not_found``
    - ``DELETE /internal/v1/photos/{id}?actor_id=`` -> 204 | 403 ``forbidden`` | 404
    - ``GET    /internal/v1/users/{id}/photos?limit=&cursor=`` -> 200 page | 404 ``user_not_found``
    """
    not_found = ApiError(404, "photo_not_found", "no such photo")

    async def load(photo_id: str) -> bytes | None:
        # A replica may answer only when nothing caches the answer: a cache filled from a lagging
        # replica right after an invalidation would keep the old status for the whole TTL.
        try:
            return json_bytes(await store().get_photo(photo_id, replica=cache is None))
        except PhotoNotFoundError:
            return None

    @app.get("/internal/v1/photos/{photo_id}")
    async def get_photo(photo_id: str) -> Response:
        if cache is None:
            body = await load(photo_id)
            if body is None:
                raise not_found
            return Response(body, media_type=JSON_MEDIA_TYPE)
        # Read through the caches ([cache] "photo" policy); status changes and deletes
        # invalidate ``photo:<id>`` (PhotoStore), so a processing photo turns ready at once.
        body, hit = await cache.read("photo", f"photo:{photo_id}", lambda: load(photo_id))
        if body is None:
            raise not_found
        return cached_response(body, hit)

    @app.delete("/internal/v1/photos/{photo_id}", status_code=204)
    async def delete_photo(photo_id: str, actor_id: str = "") -> Response:
        try:
            await store().delete_photo(photo_id, actor_id)
        except PhotoNotFoundError as exc:
            raise not_found from exc
        except PhotoForbiddenError as exc:
            raise ApiError(403, "forbidden", "only the owner may delete a photo") from exc
        return Response(status_code=204)

    @app.get("/internal/v1/users/{user_id}/photos")
    async def list_photos(
        user_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Response:
        try:
            after = decode_cursor(cursor) if cursor is not None else None
        except InvalidCursorError as exc:
            raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
        try:
            page = await store().list_photos(user_id, limit, after, replica=True)
        except UserNotFoundError as exc:
            raise ApiError(404, "user_not_found", "no such user") from exc
        next_cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
        return JsonResponse({"items": page.items, "next_cursor": next_cursor})
