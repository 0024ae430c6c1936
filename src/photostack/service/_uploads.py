"""Uploads (API.md "Photos"): the bytes' checks, the media seam, and the web/app halves.

Request path of ``POST /v1/photos`` (docs/uploads.md):

1. web node: stream the multipart body through :class:`UploadReader` (the file part spooled
   to a temp file, counted, refused past ``upload_max_bytes`` -> 413 before the rest is read),
   check the type by content (:func:`sniff_image_type` magic bytes, then Pillow opens and
   verifies it) -> 415, then store the original on every media origin (:class:`MediaStore`);
2. app node (``POST /internal/v1/photos``): write the metadata (``create_photo_metadata``,
   status ``processing``), enqueue the thumbnail task (idempotency key = photo id) and answer
   202 at once. A full queue undoes the metadata and answers 503 + Retry-After.

Pure parts (sniffing, the multipart reader) are unit-tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header

from photostack.blocks.media import InvalidKey, MediaClient, MediaUnavailable, Origin
from photostack.blocks.media import MediaNotFound as BlockMediaNotFound

__all__ = [
    "CAPTION_MAX_CHARS",
    "IMAGE_TYPES",
    "DirMediaStore",
    "InvalidUpload",
    "MediaObject",
    "MediaStore",
    "MemoryMediaStore",
    "UploadParts",
    "UploadReader",
    "check_image",
    "media_key",
    "media_store_from",
    "sniff_image_type",
]

CAPTION_MAX_CHARS = 2200
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # headers, caption and boundaries on top of the file
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb bound: larger images are refused (413)
_SPOOL_IN_MEMORY_BYTES = 256 * 1024
IMAGE_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


class InvalidUpload(Exception):
    """An upload refused for its content: ``status`` 400/413/415/422 and a contract code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def too_large(limit: int) -> InvalidUpload:
    return InvalidUpload(413, "payload_too_large", f"the file exceeds {limit} bytes")


def sniff_image_type(head: bytes) -> str | None:
    """The media type the first bytes announce (JPEG, PNG, WebP), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image(file: IO[bytes]) -> str:
    """The file's media type when its magic bytes and Pillow agree it is a JPEG/PNG/WebP.

    Reads the header only (``verify``), not the pixels. Raises InvalidUpload 415 (not an image
    of those types) or 413 (more pixels than MAX_IMAGE_PIXELS).
    """
    file.seek(0)
    sniffed = sniff_image_type(file.read(16))
    if sniffed is None:
        raise InvalidUpload(415, "unsupported_media_type", "send a JPEG, PNG or WebP image")
    file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                kind = IMAGE_TYPES.get(image.format or "")
                width, height = image.size
                image.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidUpload(413, "image_too_large", "the image has too many pixels") from exc
    except Exception as exc:
        raise InvalidUpload(
            415, "unsupported_media_type", "the file is not a readable JPEG, PNG or WebP image"
        ) from exc
    finally:
        file.seek(0)
    if kind != sniffed:
        raise InvalidUpload(415, "unsupported_media_type", "the image type does not match")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidUpload(413, "image_too_large", "the image has too many pixels")
    return kind


@dataclass
class UploadParts:
    file: IO[bytes] | None
    size: int
    filename: str | None
    caption: str

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class UploadReader:
    """A streaming ``multipart/form-data`` reader for ``file`` + ``caption``.

    Feed it the body chunk by chunk; it spools the file part to a temp file and raises
    InvalidUpload 413 as soon as the file passes ``max_file_bytes`` or the whole body passes
    ``max_file_bytes + MULTIPART_OVERHEAD_BYTES`` — nothing past the limit is kept.
    """

    def __init__(self, content_type: str | None, max_file_bytes: int) -> None:
        mime, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if mime != b"multipart/form-data" or not boundary:
            raise InvalidUpload(415, "unsupported_media_type", "send multipart/form-data")
        self.max_file_bytes = max_file_bytes
        self.max_body_bytes = max_file_bytes + MULTIPART_OVERHEAD_BYTES
        self._body = 0
        self._file: IO[bytes] | None = None
        self._size = 0
        self._filename: str | None = None
        self._caption = bytearray()
        self._field: str | None = None
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._done = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_end": self._end,
            },
        )

    def declared_length(self, value: str | None) -> None:
        """Refuse at once a body whose Content-Length is already past the limit."""
        if value and value.isdigit() and int(value) > self.max_body_bytes:
            raise too_large(self.max_file_bytes)

    def _part_begin(self) -> None:
        self._field, self._disposition = None, b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._field = name
        if name == "file":
            if self._file is not None:
                raise InvalidUpload(422, "invalid_file", "send exactly one file")
            self._file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115
            raw = options.get(b"filename")
            self._filename = raw.decode("utf-8", "replace") if raw is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field == "file" and self._file is not None:
            self._size += end - start
            if self._size > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            self._file.write(data[start:end])
        elif self._field == "caption":
            self._caption.extend(data[start:end])
            if len(self._caption) > CAPTION_MAX_CHARS * 4:
                raise _caption_too_long()

    def _end(self) -> None:
        self._done = True

    def feed(self, chunk: bytes) -> None:
        self._body += len(chunk)
        if self._body > self.max_body_bytes:
            raise too_large(self.max_file_bytes)
        try:
            self._parser.write(chunk)
        except InvalidUpload:
            self.discard()
            raise
        except Exception as exc:
            self.discard()
            raise InvalidUpload(400, "malformed_upload", "the multipart body is malformed") from exc

    def finish(self) -> UploadParts:
        """The parts once the body ended. Raises InvalidUpload 400 / 422."""
        if not self._done:
            self.discard()
            raise InvalidUpload(400, "malformed_upload", "the multipart body is incomplete")
        try:
            caption = self._caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.discard()
            raise InvalidUpload(422, "invalid_caption", "caption must be UTF-8 text") from exc
        if len(caption) > CAPTION_MAX_CHARS:
            self.discard()
            raise _caption_too_long()
        if self._file is None or self._size == 0:
            self.discard()
            raise InvalidUpload(422, "missing_file", "send the image as the multipart part 'file'")
        self._file.seek(0)
        return UploadParts(self._file, self._size, self._filename, caption)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _caption_too_long() -> InvalidUpload:
    return InvalidUpload(
        422, "invalid_caption", f"caption must be at most {CAPTION_MAX_CHARS} characters"
    )


# -- media ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaObject:
    key: str
    content_type: str
    size: int
    url: str


class MediaStore(Protocol):
    """The media origins as the upload path and the workers need them: content-addressed
    ``put`` (on every origin before it returns), ``get``, ``delete``, a CDN ``purge``, and
    ``ensure`` (rewrite ``key`` wherever it is missing; True when a copy had to be written),
    which closes the race between a photo's cleanup and an identical upload (docs/uploads.md
    "Shared files")."""

    async def put(self, data: bytes, content_type: str) -> MediaObject: ...

    async def get(self, key: str) -> bytes: ...

    async def ensure(self, key: str, data: bytes) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def purge(self, key: str) -> None: ...

    async def aclose(self) -> None: ...


class MediaNotFound(Exception):
    """No origin has the key."""


def media_key(data: bytes, content_type: str) -> str:
    """Content-addressed key: sha256 of the bytes plus the type's extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{_EXTENSIONS.get(content_type, 'bin')}"


def _safe_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise MediaNotFound(key)
    return key


def _check_content(key: str, data: bytes) -> None:
    """Raises ValueError unless ``data`` is the content ``key`` addresses (its sha256)."""
    if key.split(".", 1)[0] != hashlib.sha256(data).hexdigest():
        raise ValueError(f"the bytes do not hash to {key}")


class MemoryMediaStore:
    """An in-process MediaStore for tests: ``fail_puts`` / ``fail_gets`` inject outages."""

    def __init__(self, base_url: str = "http://static.test") -> None:
        self.objects: dict[str, bytes] = {}
        self.purged: list[str] = []
        self.fail_puts = 0
        self.fail_gets = 0
        self._base = base_url.rstrip("/")

    async def put(self, data: bytes, content_type: str) -> MediaObject:
        if self.fail_puts:
            self.fail_puts -= 1
            raise OSError("media origin unavailable (injected)")
        key = media_key(data, content_type)
        self.objects[key] = data
        return MediaObject(key, content_type, len(data), f"{self._base}/media/{key}")

    async def get(self, key: str) -> bytes:
        if self.fail_gets:
            self.fail_gets -= 1
            raise OSError("media origin unavailable (injected)")
        try:
            return self.objects[key]
        except KeyError:
            raise MediaNotFound(key) from None

    async def ensure(self, key: str, data: bytes) -> bool:
        _check_content(key, data)
        if key in self.objects:
            return False
        self.objects[key] = data
        return True

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def purge(self, key: str) -> None:
        self.purged.append(key)

    async def aclose(self) -> None:
        return None


class DirMediaStore:
    """Origins as directories on this host (one per origin): every ``put`` writes the file to
    each of them (temp file + fsync + rename) before returning. The seam's file-backed engine
    until the HTTP origin client (blocks/media) takes its place; ``purge`` is a no-op here."""

    def __init__(self, roots: Sequence[Path], base_url: str) -> None:
        if not roots:
            raise ValueError("DirMediaStore needs at least one origin directory")
        self.roots = tuple(roots)
        self._base = base_url.rstrip("/")
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)

    def _write(self, root: Path, key: str, data: bytes) -> bool:
        target = root / key
        if target.exists() and target.stat().st_size == len(data):
            return False  # content-addressed: the same key is the same bytes
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".up-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    async def put(self, data: bytes, content_type: str) -> MediaObject:
        key = media_key(data, content_type)
        await asyncio.gather(*(asyncio.to_thread(self._write, r, key, data) for r in self.roots))
        return MediaObject(key, content_type, len(data), f"{self._base}/media/{key}")

    async def ensure(self, key: str, data: bytes) -> bool:
        name = _safe_key(key)
        _check_content(name, data)
        wrote = await asyncio.gather(
            *(asyncio.to_thread(self._write, r, name, data) for r in self.roots)
        )
        return any(wrote)

    async def get(self, key: str) -> bytes:
        name = _safe_key(key)
        for root in self.roots:
            with contextlib.suppress(FileNotFoundError):
                return await asyncio.to_thread((root / name).read_bytes)
        raise MediaNotFound(key)

    async def delete(self, key: str) -> None:
        name = _safe_key(key)
        for root in self.roots:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread((root / name).unlink)

    async def purge(self, key: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


class OriginMediaStore:
    """The HTTP media origins behind the CDN (blocks/media ``MediaClient``, docs/media.md).

    ``put`` returns only once every origin has the bytes; an origin that is down or refuses
    surfaces as ``OSError`` (the upload answers 503), a key no origin has as ``MediaNotFound``.
    Keys are the sha256 hex of the bytes, as the origins and the CDN address them.
    """

    def __init__(self, client: MediaClient) -> None:
        self._client = client

    async def put(self, data: bytes, content_type: str) -> MediaObject:
        try:
            stored = await self._client.put(data)
        except MediaUnavailable as exc:
            raise OSError(f"media origins unavailable: {exc}") from exc
        return MediaObject(stored.key, content_type, stored.size, stored.url)

    async def get(self, key: str) -> bytes:
        try:
            return await self._client.get(key)
        except (BlockMediaNotFound, InvalidKey) as exc:
            raise MediaNotFound(key) from exc
        except MediaUnavailable as exc:
            raise OSError(f"media origins unavailable: {exc}") from exc

    async def ensure(self, key: str, data: bytes) -> bool:
        """HEAD on every origin; a PUT to all of them when any lacks the key (or is down, in
        which case the PUT raises OSError as ``put`` does)."""
        _check_content(key, data)
        try:
            held = await self._client.head(key)
        except InvalidKey as exc:
            raise ValueError(f"not a media key: {key!r}") from exc
        if all(kind is not None for kind in held.values()):
            return False
        try:
            await self._client.put(data)
        except MediaUnavailable as exc:
            raise OSError(f"media origins unavailable: {exc}") from exc
        return True

    async def delete(self, key: str) -> None:
        """Both origins, then the CDN copy (the client purges after deleting)."""
        try:
            await self._client.delete(key)
        except InvalidKey:
            return  # never stored under this scheme: nothing to remove
        except MediaUnavailable as exc:
            raise OSError(f"media origins unavailable: {exc}") from exc

    async def purge(self, key: str) -> None:
        with contextlib.suppress(InvalidKey):
            await self._client.purge(key)

    async def aclose(self) -> None:
        await self._client.aclose()


def media_store_from(config: dict[str, Any]) -> MediaStore | None:
    """The MediaStore a node's settings describe; None when there is none (uploads answer 503).

    ``{"engine": "origins", "origins": [{"name", "host", "port"}], "purge": {...} | None,
    "base_url": ...}`` is the cluster's (HTTP origins + CDN purge); ``{"engine": "dir",
    "roots": [...], "base_url": ...}`` keeps files in local directories (tests, one host).
    """
    engine = config.get("engine")
    if not engine:
        return None
    if engine == "dir":
        return DirMediaStore([Path(r) for r in config["roots"]], str(config["base_url"]))
    if engine == "origins":
        purge = config.get("purge")
        client = MediaClient(
            [Origin(o["name"], o["host"], int(o["port"])) for o in config["origins"]],
            static_base_url=str(config["base_url"]),
            purge=(str(purge["host"]), int(purge["port"])) if purge else None,
        )
        return OriginMediaStore(client)
    raise ValueError(f"unknown media engine {engine!r}")


def read_all(file: IO[bytes]) -> bytes:
    file.seek(0)
    data = file.read()
    file.seek(0)
    return data


def image_from(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
