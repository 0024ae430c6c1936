"""The workers' task registry: thumbnails, feed fan-out and photo cleanup.

Run by ``python -m photostack.blocks.queue.worker ... --tasks photostack.service.tasks:registry``.
Handlers reach the app tier over its internal HTTP API (the app owns every database write and
the feed) and the media origins directly. Their collaborators come from :func:`configure`
(tests) or, in a worker process, from the JSON file named by ``PHOTOSTACK_TASKS_SETTINGS``:
``{"app_nodes": [{"name","host","port"}], "media": {...}, "app_timeout_s": 10,
"thumbnail_max_px": 320}``.

Every handler is idempotent, so a redelivered task (its worker died mid-run) repeats no
effect: the thumbnail is content-addressed, the status move tolerates "already ready", events
carry dedupe keys, the fan-out is ZADD of the same member and its tasks have idempotency keys.

Media keys are content addresses, shared by byte-identical photos: the cleanup deletes a key
only when no photo on any shard refers to it, and re-checks after deleting (docs/uploads.md
"Shared files"); the decisions are the pure :func:`decide_cleanup` and :func:`decide_restore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from photostack.blocks.queue import Json, PermanentTaskError, TaskContext, TaskRegistry

from ._appclient import AppClient
from ._uploads import MediaNotFound, MediaStore, media_store_from
from ._uploads_app import CLEANUP, FANOUT, TASK_POLICIES, THUMBNAIL

__all__ = [
    "SETTINGS_ENV",
    "CleanupDecision",
    "RestoreDecision",
    "TaskDeps",
    "configure",
    "decide_cleanup",
    "decide_restore",
    "make_thumbnail",
    "registry",
]

log = logging.getLogger(__name__)

SETTINGS_ENV = "PHOTOSTACK_TASKS_SETTINGS"
THUMBNAIL_MAX_PX = 320
_JSON = [("content-type", "application/json")]

registry = TaskRegistry()


@dataclass
class TaskDeps:
    app: AppClient
    media: MediaStore
    thumbnail_max_px: int = THUMBNAIL_MAX_PX
    app_timeout_s: float = 10.0
    aclose: Callable[[], Awaitable[None]] | None = None


_deps: TaskDeps | None = None
_lock = asyncio.Lock()


def configure(deps: TaskDeps | None) -> None:
    """Install (or, with None, forget) the handlers' collaborators."""
    global _deps  # noqa: PLW0603 - the registry is module state by the worker's contract
    _deps = deps


async def _current() -> TaskDeps:
    global _deps  # noqa: PLW0603
    if _deps is not None:
        return _deps
    async with _lock:
        if _deps is None:
            _deps = await _from_environment()
    return _deps


async def _from_environment() -> TaskDeps:
    from photostack.blocks.balancer import Backend, SmartClient, parse_settings

    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise PermanentTaskError(f"{SETTINGS_ENV} is not set: the tasks have no collaborators")
    text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    raw: dict[str, Any] = loaded.get("settings", loaded)  # a node spec file, or bare settings
    media = media_store_from(raw.get("media", {}))
    if media is None:
        raise PermanentTaskError("the tasks settings name no media store")
    config, weights = parse_settings(raw.get("balancing", {}))
    client = SmartClient(
        [
            Backend(p["name"], p["host"], p["port"], weights.get(p["name"], 1.0))
            for p in raw["app_nodes"]
        ],
        config,
    )
    await client.start()

    async def aclose() -> None:
        await client.aclose()
        await media.aclose()

    return TaskDeps(
        app=client,
        media=media,
        thumbnail_max_px=int(raw.get("thumbnail_max_px", THUMBNAIL_MAX_PX)),
        app_timeout_s=float(raw.get("app_timeout_s", 10.0)),
        aclose=aclose,
    )


def make_thumbnail(data: bytes, max_px: int) -> bytes:
    """A JPEG at most ``max_px`` on its longer side, upright (EXIF orientation applied), with
    no metadata (no EXIF, no ICC, no comments). Raises the error Pillow raises for bytes it
    cannot decode (OSError, ValueError, Image.DecompressionBombError...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as source:
            source.load()
            upright = ImageOps.exif_transpose(source)
    if upright.mode in ("RGBA", "LA", "P"):
        rgba = upright.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        upright = flat
    upright = upright.convert("RGB")
    upright.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    clean = Image.new("RGB", upright.size)  # a fresh image carries no info dict at all
    clean.paste(upright)
    out = io.BytesIO()
    clean.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


class AppCallFailed(Exception):
    """The app tier answered an unexpected status (the task retries)."""


async def _call(deps: TaskDeps, method: str, path: str, body: Json = None) -> tuple[int, Any]:
    payload = json.dumps(body).encode() if body is not None else b""
    reply = await deps.app.request(
        method, path, headers=_JSON if payload else (), body=payload, timeout_s=deps.app_timeout_s
    )
    parsed = json.loads(reply.body) if reply.body else None
    if reply.status >= 500:
        raise AppCallFailed(f"{method} {path}: {reply.status} {reply.body[:200]!r}")
    return reply.status, parsed


def _media_key(url: str | None) -> str | None:
    return url.rsplit("/media/", 1)[1] if url and "/media/" in url else None


@registry.task(THUMBNAIL, TASK_POLICIES[THUMBNAIL])
async def thumbnail(ctx: TaskContext) -> Json:
    """Original -> thumbnail on the origins -> photo ready (+ ``photo.ready``) -> fan-out task."""
    deps = await _current()
    assert isinstance(ctx.payload, dict)
    photo_id = str(ctx.payload["photo_id"])
    status, photo = await _call(deps, "GET", f"/internal/v1/photos/{photo_id}")
    if status == 404:
        return {"photo_id": photo_id, "skipped": "deleted"}
    if status != 200:
        raise AppCallFailed(f"photo {photo_id}: {status}")
    if photo["status"] == "failed":
        return {"photo_id": photo_id, "skipped": "failed"}
    thumb_key = _media_key(photo["urls"]["thumbnail"])
    thumb: bytes | None = None  # made by this run (a redelivered ready photo makes none)
    if thumb_key is None:  # not ready yet (a ready photo was redelivered: skip to the marking)
        original = _media_key(photo["urls"]["original"])
        if original is None:
            raise PermanentTaskError(f"photo {photo_id} has no original")
        data = await deps.media.get(original)
        try:
            thumb = await asyncio.to_thread(make_thumbnail, data, deps.thumbnail_max_px)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # The bytes passed the upload's header check but do not decode: no retry helps.
            reason = f"the image could not be decoded: {exc}"
            await _call(deps, "POST", f"/internal/v1/photos/{photo_id}/failed", {"reason": reason})
            raise PermanentTaskError(f"undecodable image: {exc}") from exc
        thumb_key = (await deps.media.put(thumb, "image/jpeg")).key
    status, ready = await _call(
        deps, "POST", f"/internal/v1/photos/{photo_id}/ready", {"thumbnail_key": thumb_key}
    )
    if status == 404:
        return {"photo_id": photo_id, "skipped": "deleted"}
    if status != 200:
        raise AppCallFailed(f"photo {photo_id} not marked ready: {status} {ready}")
    if thumb is not None and await deps.media.ensure(thumb_key, thumb):
        # a cleanup of an identical photo removed the shared thumbnail before our commit
        log.warning("thumbnail %s of %s was removed concurrently; rewritten", thumb_key, photo_id)
    return {
        "photo_id": photo_id,
        "thumbnail": ready["photo"]["urls"]["thumbnail"],
        "fanout_task": ready["fanout_task"],
    }


@registry.task(FANOUT, TASK_POLICIES[FANOUT])
async def feed_fanout(ctx: TaskContext) -> Json:
    """Push a ready photo into its owner's followers' timelines, a page per call."""
    deps = await _current()
    assert isinstance(ctx.payload, dict)
    photo_id = str(ctx.payload["photo_id"])
    after: str | None = None
    pages = 0
    while True:
        status, body = await _call(
            deps, "POST", "/internal/v1/feed/fanout", {"photo_id": photo_id, "after": after}
        )
        if status == 404:
            return {"photo_id": photo_id, "skipped": "deleted"}
        if status != 200:
            raise AppCallFailed(f"fan-out of {photo_id}: {status} {body}")
        pages += 1
        if body["next"] is None:
            return {"photo_id": photo_id, "mode": body["mode"], "pages": pages}
        after = body["next"]


@dataclass(frozen=True)
class CleanupDecision:
    """What a photo's cleanup does with each of its media keys."""

    delete: tuple[str, ...]  # no photo refers to it any more
    keep: tuple[str, ...]  # another photo (same bytes) still refers to it


def decide_cleanup(keys: Sequence[str], referenced: Collection[str]) -> CleanupDecision:
    """Delete the keys no photo refers to; keep the shared ones. Duplicates and empty keys
    are dropped; the order of ``keys`` is kept."""
    unique = [k for k in dict.fromkeys(keys) if k]
    return CleanupDecision(
        tuple(k for k in unique if k not in referenced),
        tuple(k for k in unique if k in referenced),
    )


@dataclass(frozen=True)
class RestoreDecision:
    """After deleting: the keys a photo committed meanwhile refers to."""

    restore: tuple[str, ...]  # rewrite from the bytes read before the delete
    lost: tuple[str, ...]  # referenced again, but nothing was read to rewrite it from


def decide_restore(
    deleted: Sequence[str], referenced_now: Collection[str], saved: Collection[str]
) -> RestoreDecision:
    """A key deleted by this cleanup that some photo refers to now (an identical upload
    committed between the check and the delete) must come back."""
    back = [k for k in deleted if k in referenced_now]
    return RestoreDecision(
        tuple(k for k in back if k in saved), tuple(k for k in back if k not in saved)
    )


async def _referenced(deps: TaskDeps, keys: Sequence[str]) -> frozenset[str]:
    """The keys some photo on some shard refers to. Raises AppCallFailed (retried) when the
    app could not ask every photos shard."""
    status, body = await _call(deps, "POST", "/internal/v1/media/references", {"keys": list(keys)})
    if status != 200:
        raise AppCallFailed(f"reference lookup: {status} {body}")
    return frozenset(str(k) for k in body["referenced"])


async def _restore(deps: TaskDeps, saved: Mapping[str, bytes], keys: Sequence[str]) -> None:
    for key in keys:
        await deps.media.ensure(key, saved[key])


@registry.task(CLEANUP, TASK_POLICIES[CLEANUP])
async def photo_cleanup(ctx: TaskContext) -> Json:
    """After a delete: the files no other photo refers to (every origin and the CDN copy),
    then the feed rows."""
    deps = await _current()
    assert isinstance(ctx.payload, dict)
    keys = [str(k) for k in ctx.payload.get("keys", [])]
    decision = decide_cleanup(keys, await _referenced(deps, keys) if keys else ())
    saved: dict[str, bytes] = {}
    restored: tuple[str, ...] = ()
    if decision.delete:
        try:
            for key in decision.delete:
                with contextlib.suppress(MediaNotFound):  # gone already: a redelivered cleanup
                    saved[key] = await deps.media.get(key)
                await deps.media.delete(key)
                await deps.media.purge(key)
            now = await _referenced(deps, decision.delete)
        except BaseException:
            # Cut short before the second check: whether an identical upload committed
            # meanwhile is unknown, so every file read goes back (shielded) and the retry
            # decides again.
            await asyncio.shield(_restore(deps, saved, list(saved)))
            raise
        verdict = decide_restore(decision.delete, now, saved)
        await _restore(deps, saved, verdict.restore)
        restored = verdict.restore
        if restored:
            log.warning("media %s referenced again during cleanup; restored", ", ".join(restored))
        if verdict.lost:
            log.error("media %s referenced again but not readable before its delete",
                      ", ".join(verdict.lost))  # fmt: skip
    status, body = await _call(
        deps,
        "POST",
        "/internal/v1/feed/remove",
        {"photo_id": ctx.payload["photo_id"], "owner_id": ctx.payload["owner_id"]},
    )
    if status != 204:
        raise AppCallFailed(f"feed removal: {status} {body}")
    return {
        "photo_id": ctx.payload["photo_id"],
        "deleted_keys": len(decision.delete) - len(restored),
        "shared_keys": list(decision.keep),
        "restored_keys": list(restored),
    }
