"""Header rules of the proxy hop: pure functions over ``(name, value)`` lists.

Hop-by-hop headers describe one connection, so they never cross the proxy in either direction
(RFC 9110 §7.6.1), including any header the ``Connection`` header names. Framing headers are
re-derived by each hop rather than copied.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence

__all__ = [
    "HOP_BY_HOP",
    "downstream_headers",
    "error_body",
    "is_valid_request_id",
    "new_request_id",
    "request_id_of",
    "upstream_headers",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_FRAMING = frozenset({"content-length"})
_MAX_REQUEST_ID_CHARS = 128


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _is_dropped(lowered: str, named: set[str]) -> bool:
    return (
        lowered in HOP_BY_HOP
        or lowered in _FRAMING
        or lowered.startswith("proxy-")
        or lowered in named
    )


def is_valid_request_id(value: str) -> bool:
    """A client-sent id is kept only if it is short printable ASCII (it lands in logs)."""
    return 0 < len(value) <= _MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()


def request_id_of(headers: Iterable[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "x-request-id":
            return value if is_valid_request_id(value) else None
    return None


# 32 hex digits like a uuid4's, without a getrandom() call per request: a random per-process
# prefix and a counter. Unique across processes (the prefix) and within one (the counter). The
# counter starts above 2**64 so that hex() always gives "0x1" and exactly 16 more digits.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count((1 << 64) + int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return _ID_PREFIX + hex(next(_ID_COUNTER))[3:]


def upstream_headers(
    headers: Sequence[tuple[str, str]], *, client_ip: str, proto: str, request_id: str
) -> list[tuple[str, str]]:
    """Client request headers as the backend should see them."""
    named = _connection_tokens(headers)
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if _is_dropped(lowered, named) or lowered in ("x-forwarded-proto", "x-request-id"):
            continue
        if lowered == "x-forwarded-for":
            forwarded_for.append(value)
            continue
        out.append((name, value))
    forwarded_for.append(client_ip)
    out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Request-Id", request_id))
    return out


def downstream_headers(
    headers: Sequence[tuple[str, str]], *, request_id: str
) -> list[tuple[str, str]]:
    """Backend response headers as the client should see them (framing is added by the caller)."""
    named = _connection_tokens(headers)
    out: list[tuple[str, str]] = []
    has_request_id = False
    for name, value in headers:
        lowered = name.lower()
        if _is_dropped(lowered, named):
            continue
        has_request_id = has_request_id or lowered == "x-request-id"
        out.append((name, value))
    if not has_request_id:
        out.append(("X-Request-Id", request_id))
    return out


def error_body(code: str, message: str) -> bytes:
    """The API's error shape: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()
