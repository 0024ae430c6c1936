"""Fakes for code that uses the media block (no sockets, no files)."""

from __future__ import annotations

from photostack.blocks.media._client import MediaObject
from photostack.blocks.media._errors import MediaNotFound, MediaUnavailable, ObjectTooLarge
from photostack.blocks.media._keys import check_key, key_of, sniff_content_type

__all__ = ["FakeMediaClient"]


class FakeMediaClient:
    """``MediaClient``'s API over a dict. ``down = True`` makes every call raise
    MediaUnavailable, as a real client does when an origin is down; ``purged`` records purges."""

    def __init__(
        self,
        static_base_url: str = "http://127.0.0.1:8081",
        *,
        max_object_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.objects: dict[str, bytes] = {}
        self.purged: list[str] = []
        self.down = False
        self._base = static_base_url.rstrip("/")
        self._max = max_object_bytes

    def url(self, key: str) -> str:
        return f"{self._base}/media/{check_key(key)}"

    def _check_up(self) -> None:
        if self.down:
            raise MediaUnavailable("fake media origins are down", failed=("media-1",))

    async def put(self, data: bytes) -> MediaObject:
        if len(data) > self._max:
            raise ObjectTooLarge(f"{len(data)} bytes exceed {self._max}")
        self._check_up()
        key = key_of(data)
        self.objects[key] = bytes(data)
        return MediaObject(key, sniff_content_type(data), len(data), self.url(key))

    async def get(self, key: str) -> bytes:
        check_key(key)
        self._check_up()
        try:
            return self.objects[key]
        except KeyError:
            raise MediaNotFound(key) from None

    async def delete(self, key: str) -> None:
        check_key(key)
        self._check_up()
        self.objects.pop(key, None)
        self.purged.append(key)

    async def purge(self, key: str) -> bool:
        check_key(key)
        self.purged.append(key)
        return True

    async def aclose(self) -> None:
        return None
