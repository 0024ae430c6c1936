"""Content addresses and content types (pure).

A key is the sha256 of the bytes as 64 lowercase hex digits; it is also the file name on an
origin, under two levels of shard directories (``ab/cd/abcd...``), so no key can name a path
outside the store. The content type is sniffed from the bytes once, when they are stored.
"""

from __future__ import annotations

import hashlib
import re

from photostack.blocks.media._errors import InvalidKey

__all__ = [
    "KEY_LENGTH",
    "OCTET_STREAM",
    "check_key",
    "is_valid_key",
    "key_of",
    "shard_parts",
    "sniff_content_type",
]

KEY_LENGTH = 64
OCTET_STREAM = "application/octet-stream"
_KEY = re.compile(r"[0-9a-f]{64}")


def key_of(data: bytes) -> str:
    """The content address of ``data``."""
    return hashlib.sha256(data).hexdigest()


def is_valid_key(text: str) -> bool:
    """True for exactly 64 lowercase hex digits (nothing else can reach the file system)."""
    return len(text) == KEY_LENGTH and _KEY.fullmatch(text) is not None


def check_key(text: str) -> str:
    """``text`` if it is a valid key. Raises InvalidKey."""
    if not is_valid_key(text):
        raise InvalidKey(f"not a media key: {text[:80]!r}")
    return text


def shard_parts(key: str) -> tuple[str, str, str]:
    """The relative path of ``key`` as (first level, second level, file name)."""
    check_key(key)
    return key[:2], key[2:4], key


def sniff_content_type(data: bytes) -> str:  # noqa: PLR0911 - one answer per signature
    """The type the bytes say they are (magic numbers), never what a file name claims.

    Images the product takes (JPEG, PNG, WebP) and a few neighbours (GIF, AVIF/HEIC, PDF);
    anything else is ``application/octet-stream``.
    """
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "image/heic"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return OCTET_STREAM
