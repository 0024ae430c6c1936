"""The media origin: a content-addressed store served over HTTP/1.1.

Public (what the CDN edge fetches): ``GET``/``HEAD /media/{key}`` with a strong ETag (the key),
``Cache-Control: public, max-age=31536000, immutable``, ``Accept-Ranges: bytes``, single ranges
(206; several ranges are answered 200 whole), 416, If-None-Match → 304, and the content type
sniffed when the bytes were stored. Bodies go out with ``loop.sendfile`` (``os.sendfile`` on the
default event loop). Internal (the media client; never forwarded by the CDN): ``PUT
/media/{key}`` (the body must hash to the key, else 400; idempotent: 201 new, 200 already
there) and ``DELETE /media/{key}`` (204, idempotent). Every node answers ``/healthz`` and
``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from photostack.blocks.media._errors import HashMismatch, ObjectTooLarge
from photostack.blocks.media._http import (
    Connection,
    HttpLimits,
    HttpServer,
    Request,
    error_response,
    json_response,
    response_head,
    simple_response,
)
from photostack.blocks.media._keys import is_valid_key
from photostack.blocks.media._metrics import CONTENT_TYPE, Counters
from photostack.blocks.media._rules import (
    IMMUTABLE_CACHE_CONTROL,
    ByteRange,
    quote_etag,
    select,
)
from photostack.blocks.media._store import ContentStore, StoredObject

__all__ = ["MEDIA_PREFIX", "OriginConfig", "OriginServer"]

MEDIA_PREFIX = "/media/"
_JSON = "application/json; charset=utf-8"
_META_CACHE_ENTRIES = 16_384
# A body up to this size is read and written with its head in one write instead of sendfile.
_SMALL_BODY_BYTES = 16 * 1024


@dataclass(frozen=True)
class OriginConfig:
    """One origin: its name (X-Served-By), its store directory and its listening address."""

    name: str
    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    max_object_bytes: int = 64 * 1024 * 1024
    limits: HttpLimits = field(default_factory=HttpLimits)


class OriginServer:
    """``await start()``, ``port``, ``await aclose()``; ``store`` is the ContentStore."""

    def __init__(self, config: OriginConfig) -> None:
        self.config = config
        self.store = ContentStore(config.root, max_object_bytes=config.max_object_bytes)
        limits = config.limits
        if limits.max_body_bytes < config.max_object_bytes:
            limits = HttpLimits(
                max_body_bytes=config.max_object_bytes,
                max_header_bytes=limits.max_header_bytes,
                header_timeout_s=limits.header_timeout_s,
                idle_timeout_s=limits.idle_timeout_s,
                max_pipelined=limits.max_pipelined,
                drain_timeout_s=limits.drain_timeout_s,
            )
        self.counters = Counters("photostack_media")
        self.counters.describe("responses", "Responses by status code")
        self.counters.describe("stored", "Objects written (new keys)")
        self.counters.describe("deleted", "Objects deleted")
        self._meta: OrderedDict[str, StoredObject] = OrderedDict()
        self._handler = _OriginHandler(self)
        self._server = HttpServer(self._handler, limits)

    def __repr__(self) -> str:
        return f"<OriginServer {self.config.name} {self.config.host}:{self.port}>"

    @property
    def port(self) -> int:
        return self._server.port or self.config.port

    async def start(self) -> None:
        await asyncio.to_thread(self.store.prepare)
        await self._server.start(self.config.host, self.config.port)

    async def aclose(self) -> None:
        await self._server.aclose()

    def lookup(self, key: str) -> StoredObject | None:
        """The object's metadata (remembered; a stat and a small read the first time)."""
        meta = self._meta.get(key)
        if meta is not None:
            self._meta.move_to_end(key)
            return meta
        meta = self.store.get(key)
        if meta is not None:
            self._meta[key] = meta
            if len(self._meta) > _META_CACHE_ENTRIES:
                self._meta.popitem(last=False)
        return meta

    def forget(self, key: str) -> None:
        self._meta.pop(key, None)


class _OriginHandler:
    def __init__(self, origin: OriginServer) -> None:
        self._origin = origin
        self._name = origin.config.name
        self._counters = origin.counters

    def _count(self, status: int) -> None:
        self._counters.inc("responses", str(status))

    def _error(self, request: Request, status: int, code: str, message: str) -> bytes:
        self._count(status)
        return error_response(
            status, code, message, keep_alive=request.keep_alive, http_1_0=request.http_1_0,
            head_only=request.method == "HEAD",
        )  # fmt: skip

    def answer_now(self, request: Request) -> bytes | None:  # noqa: PLR0911, PLR0912 - one per answer
        path, method = request.path, request.method
        if not path.startswith(MEDIA_PREFIX):
            if path == "/healthz" and method in ("GET", "HEAD"):
                self._count(200)
                return simple_response(
                    200, _JSON, b'{"status":"ok"}', keep_alive=request.keep_alive,
                    http_1_0=request.http_1_0,
                )  # fmt: skip
            if path == "/metrics" and method == "GET":
                self._count(200)
                body = self._counters.render("code")
                return simple_response(200, CONTENT_TYPE, body, keep_alive=request.keep_alive)
            return self._error(request, 404, "not_found", "no such path")
        key = path[len(MEDIA_PREFIX) :]
        if not is_valid_key(key):
            return self._error(request, 400, "invalid_key", "a media key is 64 lowercase hex")
        if method in ("PUT", "DELETE"):
            return None
        if method not in ("GET", "HEAD"):
            return self._error(request, 405, "method_not_allowed", f"{method} not allowed")
        meta = self._origin.lookup(key)
        if meta is None:
            return self._error(request, 404, "not_found", "no such media key")
        etag = quote_etag(key)
        chosen = select(method, request.headers, etag, meta.size)
        headers = [("ETag", etag), ("Cache-Control", IMMUTABLE_CACHE_CONTROL)]
        headers += [("Accept-Ranges", "bytes"), ("X-Served-By", self._name)]
        if chosen.status == 304:
            self._count(304)
            return response_head(304, headers, keep_alive=request.keep_alive)
        if chosen.status == 416:
            self._count(416)
            headers.append(("Content-Range", f"bytes */{meta.size}"))
            return error_response(
                416, "range_not_satisfiable", "range not satisfiable",
                keep_alive=request.keep_alive, headers=headers, head_only=method == "HEAD",
            )  # fmt: skip
        if method == "HEAD":
            self._count(chosen.status)
            return self._head(request, meta, headers, chosen.status, chosen.byte_range)
        if meta.size <= _SMALL_BODY_BYTES:
            data = self._origin.store.read(key)
            if data is None:
                self._origin.forget(key)
                return self._error(request, 404, "not_found", "no such media key")
            start, length = 0, len(data)
            if chosen.byte_range is not None:
                start, length = chosen.byte_range.start, chosen.byte_range.length
            self._count(chosen.status)
            head = self._head(request, meta, headers, chosen.status, chosen.byte_range)
            return head + data[start : start + length]
        return None

    def _head(
        self,
        request: Request,
        meta: StoredObject,
        headers: list[tuple[str, str]],
        status: int,
        byte_range: ByteRange | None,
    ) -> bytes:
        headers = [("Content-Type", meta.content_type), *headers]
        if byte_range is not None:
            headers.append(("Content-Range", byte_range.content_range(meta.size)))
            headers.append(("Content-Length", str(byte_range.length)))
        else:
            headers.append(("Content-Length", str(meta.size)))
        return response_head(
            status, headers, keep_alive=request.keep_alive, http_1_0=request.http_1_0
        )

    async def answer(self, request: Request, conn: Connection) -> bool:
        key = request.path[len(MEDIA_PREFIX) :]
        if request.method == "PUT":
            conn.write(await self._put(request, key))
            return request.keep_alive
        if request.method == "DELETE":
            existed = await asyncio.to_thread(self._origin.store.delete, key)
            self._origin.forget(key)
            if existed:
                self._counters.inc("deleted")
            self._count(204)
            conn.write(response_head(204, [], keep_alive=request.keep_alive))
            return request.keep_alive
        return await self._send_large(request, key, conn)

    async def _put(self, request: Request, key: str) -> bytes:
        try:
            meta, created = await asyncio.to_thread(self._origin.store.put, key, request.body)
        except HashMismatch:
            return self._error(request, 400, "hash_mismatch", "the body does not hash to the key")
        except ObjectTooLarge as exc:
            return self._error(request, 413, "body_too_large", str(exc))
        except OSError as exc:
            return self._error(request, 507, "insufficient_storage", exc.strerror or str(exc))
        if created:
            self._counters.inc("stored")
        status = 201 if created else 200
        self._count(status)
        payload = {"key": key, "size": meta.size, "content_type": meta.content_type}
        return json_response(status, payload, keep_alive=request.keep_alive)

    async def _send_large(self, request: Request, key: str, conn: Connection) -> bool:
        meta = self._origin.lookup(key)
        if meta is None:
            conn.write(self._error(request, 404, "not_found", "no such media key"))
            return request.keep_alive
        etag = quote_etag(key)
        chosen = select(request.method, request.headers, etag, meta.size)
        headers = [("ETag", etag), ("Cache-Control", IMMUTABLE_CACHE_CONTROL)]
        headers += [("Accept-Ranges", "bytes"), ("X-Served-By", self._name)]
        start, length = 0, meta.size
        if chosen.byte_range is not None:
            start, length = chosen.byte_range.start, chosen.byte_range.length
        try:
            file = meta.path.open("rb")
        except FileNotFoundError:
            self._origin.forget(key)
            conn.write(self._error(request, 404, "not_found", "no such media key"))
            return request.keep_alive
        with file:
            self._count(chosen.status)
            conn.write(self._head(request, meta, headers, chosen.status, chosen.byte_range))
            try:
                await conn.sendfile(file, start, length)
            except (ConnectionError, RuntimeError):
                return False
        return request.keep_alive
