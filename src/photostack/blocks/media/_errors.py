"""The media block's errors: one root, ``MediaError``."""

from __future__ import annotations

__all__ = [
    "HashMismatch",
    "InvalidKey",
    "MediaError",
    "MediaNotFound",
    "MediaUnavailable",
    "ObjectTooLarge",
]


class MediaError(Exception):
    """Root of every error the media block raises."""


class InvalidKey(MediaError, ValueError):
    """A media key is not 64 lowercase hex digits (a sha256)."""


class HashMismatch(MediaError, ValueError):
    """The bytes given for a key do not hash to that key."""


class ObjectTooLarge(MediaError, ValueError):
    """An object is larger than the configured limit."""


class MediaNotFound(MediaError, KeyError):
    """No origin has the key."""


class MediaUnavailable(MediaError):
    """An origin needed for the operation did not answer; retry later (HTTP 503).

    ``failed`` names the origins that did not confirm.
    """

    def __init__(self, message: str, *, failed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.failed = failed
