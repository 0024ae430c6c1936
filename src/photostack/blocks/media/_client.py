"""The media client: what the app and the workers call to store, read and delete media.

Writes go to **every** origin before ``put`` returns: the upload is acknowledged only once both
copies are durable (fsynced and renamed on each origin). If an origin is down or fails, ``put``
raises ``MediaUnavailable`` (the API answers 503 with Retry-After) instead of acknowledging a
single copy: an acknowledged photo must survive the loss of either origin, and a "write one,
repair later" debt would need a durable repair log and a repairer that this block does not
have. A copy that did land on the healthy origin is harmless: the key is the hash of the bytes,
so the client's retry (or any later upload of the same bytes) writes the same file again
(PUT is idempotent), and an orphan costs only disk.

Reads (``get``) try the origins in a per-key order and fall through on a failure or a 404 (a
copy may be missing). ``delete`` removes the key from every origin, then purges it from the CDN
edge; it raises ``MediaUnavailable`` if an origin could not confirm (the caller retries).
Keys are content addresses: two uploads of the same bytes share one key, so the caller must
delete a key only when no photo refers to it any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from photostack.blocks.balancer import Backend, BalancerError, ClientConfig, SmartClient
from photostack.blocks.media._errors import (
    HashMismatch,
    MediaNotFound,
    MediaUnavailable,
    ObjectTooLarge,
)
from photostack.blocks.media._keys import check_key, key_of, sniff_content_type
from photostack.blocks.media._origins import Fetched, Origin, OriginSet

__all__ = ["MediaClient", "MediaObject"]

_MEDIA = "/media/"


@dataclass(frozen=True)
class MediaObject:
    """A stored object: its key, sniffed type, size, and absolute URL on the static host."""

    key: str
    content_type: str
    size: int
    url: str


class MediaClient:
    """Put, get and delete media on every origin; purge the CDN edge.

    ``static_base_url`` is the CDN's public base (``http://127.0.0.1:8081``); ``purge`` is the
    CDN's internal purge address (host, port), or None when there is no CDN to purge.
    """

    def __init__(
        self,
        origins: Sequence[Origin],
        *,
        static_base_url: str,
        purge: tuple[str, int] | None = None,
        timeout_s: float = 10.0,
        max_object_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._origins = OriginSet(origins, timeout_s=timeout_s)
        self._base = static_base_url.rstrip("/")
        self._max = max_object_bytes
        self._purger: SmartClient | None = None
        if purge is not None:
            self._purger = SmartClient(
                [Backend("cdn-purge", purge[0], purge[1])],
                ClientConfig(request_timeout_s=timeout_s, max_tries=1),
            )

    def __repr__(self) -> str:
        return f"<MediaClient {self._origins!r} {self._base}>"

    @property
    def origins(self) -> tuple[Origin, ...]:
        return self._origins.origins

    def url(self, key: str) -> str:
        """The public URL of ``key`` on the static host. Raises InvalidKey."""
        return f"{self._base}{_MEDIA}{check_key(key)}"

    async def put(self, data: bytes) -> MediaObject:
        """Store ``data`` on every origin; returns once all have it durably.

        Raises ObjectTooLarge, MediaUnavailable (an origin is down or failed: nothing is
        acknowledged; retrying is safe).
        """
        if len(data) > self._max:
            raise ObjectTooLarge(f"{len(data)} bytes exceed {self._max}")
        key = key_of(data)
        results = await asyncio.gather(
            *(self._put_one(o.name, key, data) for o in self._origins.origins),
            return_exceptions=True,
        )
        failed: list[str] = []
        for origin, result in zip(self._origins.origins, results, strict=True):
            if isinstance(result, HashMismatch | ObjectTooLarge):
                raise result
            if isinstance(result, BaseException):
                failed.append(origin.name)
        if failed:
            names = ", ".join(failed)
            raise MediaUnavailable(
                f"media origin(s) {names} did not store the object", failed=tuple(failed)
            )
        return MediaObject(key, sniff_content_type(data), len(data), self.url(key))

    async def _put_one(self, origin: str, key: str, data: bytes) -> None:
        try:
            fetched = await self._origins.request(
                origin, "PUT", _MEDIA + key, body=data,
                headers=(("Content-Type", "application/octet-stream"),),
            )  # fmt: skip
        except BalancerError as exc:
            raise MediaUnavailable(f"{origin}: {exc}", failed=(origin,)) from exc
        if fetched.status == 400:
            raise HashMismatch(f"{origin} refused the body for {key}")
        if fetched.status == 413:
            raise ObjectTooLarge(f"{origin}: object too large")
        if fetched.status not in (200, 201):
            raise MediaUnavailable(f"{origin} answered {fetched.status}", failed=(origin,))

    async def get(self, key: str) -> bytes:
        """The object's bytes from the first origin that has it.

        Raises InvalidKey, MediaNotFound (every origin that answered said 404),
        MediaUnavailable (no origin answered).
        """
        check_key(key)
        answered = False
        for origin in self._origins.order(key):
            try:
                fetched = await self._origins.request(
                    origin.name, "GET", _MEDIA + key, max_body_bytes=self._max
                )
            except (BalancerError, ValueError):
                continue
            if fetched.status == 200:
                if key_of(fetched.body) == key:
                    return fetched.body
                continue  # a damaged copy: try the other origin
            if fetched.status == 404:
                answered = True
        if answered:
            raise MediaNotFound(key)
        raise MediaUnavailable(f"no media origin answered for {key}")

    async def head(self, key: str) -> dict[str, str | None]:
        """Which origins hold ``key``: origin name → content type (None: absent or down)."""
        check_key(key)
        out: dict[str, str | None] = {}
        for origin in self._origins.origins:
            try:
                fetched: Fetched = await self._origins.request(origin.name, "HEAD", _MEDIA + key)
            except BalancerError:
                out[origin.name] = None
                continue
            out[origin.name] = fetched.header("content-type") if fetched.status == 200 else None
        return out

    async def delete(self, key: str) -> None:
        """Remove ``key`` from every origin, then purge it from the CDN edge.

        Raises InvalidKey, MediaUnavailable (an origin or the CDN did not confirm; the call is
        idempotent, so retry it).
        """
        check_key(key)
        results = await asyncio.gather(
            *(self._delete_one(o.name, key) for o in self._origins.origins),
            return_exceptions=True,
        )
        failed = [
            o.name
            for o, r in zip(self._origins.origins, results, strict=True)
            if isinstance(r, BaseException)
        ]
        purged = await self.purge(key)
        if failed:
            raise MediaUnavailable(
                f"media origin(s) {', '.join(failed)} did not delete {key}", failed=tuple(failed)
            )
        if not purged:
            raise MediaUnavailable(f"the CDN edge did not purge {key}", failed=("cdn",))

    async def _delete_one(self, origin: str, key: str) -> None:
        try:
            fetched = await self._origins.request(origin, "DELETE", _MEDIA + key)
        except BalancerError as exc:
            raise MediaUnavailable(str(exc), failed=(origin,)) from exc
        if fetched.status not in (200, 204, 404):
            raise MediaUnavailable(f"{origin} answered {fetched.status}", failed=(origin,))

    async def purge(self, key: str) -> bool:
        """Drop ``key`` from the CDN edge's cache (True when the edge confirmed, or no edge)."""
        check_key(key)
        if self._purger is None:
            return True
        try:
            response = await self._purger.request("PURGE", _MEDIA + key)
        except BalancerError:
            return False
        return response.status == 200

    async def aclose(self) -> None:
        await self._origins.aclose()
        if self._purger is not None:
            await self._purger.aclose()
