"""RESP2 on the server side: requests parsed by hiredis (the C parser redis-py uses), replies
encoded by the few functions below. No I/O."""

from __future__ import annotations

from collections.abc import Iterable

import hiredis

from photostack.blocks.cache._errors import CacheError

__all__ = [
    "NIL",
    "NULL3",
    "OK",
    "PONG",
    "RequestParser",
    "RespProtocolError",
    "array",
    "bulk",
    "bulk_array",
    "error",
    "integer",
    "mapping",
    "push",
    "simple",
    "verbatim",
]

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
NULL3 = b"_\r\n"  # RESP3's null
_INTEGERS = tuple(b":%d\r\n" % n for n in range(-2, 256))  # the common ones, pre-encoded


class RespProtocolError(CacheError):
    """A client sent bytes that are not a RESP request (the connection is closed after the
    error reply, as Redis does)."""


def simple(text: bytes) -> bytes:
    return b"+" + text + b"\r\n"


def error(message: str) -> bytes:
    """``-ERR ...``-style reply; ``message`` carries its own prefix (ERR, WRONGTYPE, OOM)."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def integer(value: int) -> bytes:
    if -2 <= value < 256:
        return _INTEGERS[value + 2]
    return b":%d\r\n" % value


def bulk(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulk_array(values: Iterable[bytes | None], null: bytes = NIL) -> bytes:
    """An array of bulk strings (None → ``null``)."""
    parts = [null if v is None else bulk(v) for v in values]
    return b"*%d\r\n" % len(parts) + b"".join(parts)


def push(encoded: list[bytes]) -> bytes:
    """A RESP3 push frame (pub/sub messages of a RESP3 connection)."""
    return b">%d\r\n" % len(encoded) + b"".join(encoded)


def mapping(pairs: list[tuple[bytes, bytes]], *, resp3: bool) -> bytes:
    """Encoded key/value pairs: a RESP3 map, or a flat RESP2 array."""
    body = b"".join(k + v for k, v in pairs)
    return (b"%%%d\r\n" if resp3 else b"*%d\r\n") % (len(pairs) * (1 if resp3 else 2)) + body


def verbatim(text: bytes) -> bytes:
    """A RESP3 verbatim string of format ``txt`` (what Redis answers INFO with)."""
    return b"=%d\r\ntxt:%b\r\n" % (len(text) + 4, text)


def array(encoded: list[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n" % len(encoded) + b"".join(encoded)


class RequestParser:
    """Bytes in, complete requests (lists of bytes arguments) out; one per connection."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = hiredis.Reader()

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_request(self) -> list[bytes] | None:
        """The next complete request, or None when more bytes are needed. Raises
        RespProtocolError on anything but an array of bulk strings."""
        try:
            request = self._reader.gets()
        except hiredis.ProtocolError as exc:
            raise RespProtocolError(f"Protocol error: {exc}") from exc
        if request is False:
            return None
        if type(request) is not list or not all(type(a) is bytes for a in request):
            raise RespProtocolError("Protocol error: expected an array of bulk strings")
        return request
