"""Pure encoders and decoders of the contract: ids, timestamps, list cursors, input validation."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "CreateUserIn",
    "Cursor",
    "InvalidCursorError",
    "InvalidInputError",
    "decode_cursor",
    "encode_cursor",
    "format_time",
    "is_plausible_id",
    "is_valid_username",
    "new_id",
    "parse_create_user",
]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
USERNAME_PATTERN = r"^[a-z0-9_]{3,32}$"
DISPLAY_NAME_MAX_CHARS = 64

_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always fullmatch: "$" would accept a "\n"
_USERNAME_RE = re.compile(r"[a-z0-9_]{3,32}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_id(now_ms: int | None = None, random_bits: int | None = None) -> str:
    """A 16-char, time-ordered id: 48 bits of Unix milliseconds then 32 random bits, base32."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rnd = secrets.randbits(32) if random_bits is None else random_bits
    value = ((ms & ((1 << 48) - 1)) << 32) | (rnd & 0xFFFFFFFF)
    chars = []
    for _ in range(16):
        chars.append(_ID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_plausible_id(value: str) -> bool:
    """Ids are opaque, but anything outside this shape can never name a stored object."""
    return bool(_ID_RE.fullmatch(value))


def is_valid_username(value: str) -> bool:
    return bool(_USERNAME_RE.fullmatch(value))


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-27T23:05:00.123456Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class InvalidCursorError(ValueError):
    """A list cursor that this service did not produce."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A keyset position in a newest-first list: the last item's (created_at, id)."""

    created_at: datetime
    id: str


def encode_cursor(cursor: Cursor) -> str:
    micros = (cursor.created_at - _EPOCH) // timedelta(microseconds=1)
    raw = f"{micros}.{cursor.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """Parse a cursor from :func:`encode_cursor`. Raises InvalidCursorError."""
    if not text or len(text) > 128:
        raise InvalidCursorError("cursor is empty or too long")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True).decode(
            "ascii"
        )
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursorError("cursor is not valid base64url") from exc
    micros_text, sep, ident = raw.partition(".")
    if not sep or not micros_text.isdigit() or not _ID_RE.fullmatch(ident):
        raise InvalidCursorError("cursor is malformed")
    try:
        created_at = _EPOCH + timedelta(microseconds=int(micros_text))
    except OverflowError as exc:
        raise InvalidCursorError("cursor time is out of range") from exc
    return Cursor(created_at, ident)


class CreateUserIn(BaseModel):
    """Body of ``POST /v1/users``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    username: StrictStr = Field(pattern=USERNAME_PATTERN, description="[a-z0-9_]{3,32}")
    display_name: StrictStr | None = Field(default=None, max_length=DISPLAY_NAME_MAX_CHARS)


class InvalidInputError(ValueError):
    """A request body that fails validation: ``status`` 400 (malformed) or 422 (a field)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def parse_create_user(payload: Any) -> CreateUserIn:
    """Validate an already JSON-decoded body. Raises InvalidInputError."""
    if not isinstance(payload, dict):
        raise InvalidInputError(400, "malformed_body", "the body must be a JSON object")
    try:
        return CreateUserIn.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "body"
        if field == "username":
            message = "username must be 3-32 characters of a-z, 0-9 and _"
        elif field == "display_name":
            message = f"display_name must be a string of at most {DISPLAY_NAME_MAX_CHARS} chars"
        else:
            message = f"{field}: {first['msg']}"
        raise InvalidInputError(422, f"invalid_{field}", message) from exc
