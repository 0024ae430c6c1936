"""A parsed request, the edge's own refusals, framing checks and response heads (pure)."""

from __future__ import annotations

import http
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from photostack.blocks.proxy._body import BodyStream

__all__ = [
    "Reject",
    "Request",
    "add_vary",
    "check_framing",
    "head_bytes",
    "status_line",
    "too_large",
    "too_many_header_bytes",
]

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_STATUS_LINES = {
    status: f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    for status, phrase in _REASONS.items()
}


class Request:
    """One parsed request. ``body`` is bytes, or a ``BodyStream`` still being read from the
    client (a large or chunked upload); ``body_length`` is its Content-Length, if it had one.

    ``raw`` is the request exactly as the client sent it, when the parser saw it arrive alone
    in one read, as HTTP/1.1, without a body, in canonical form (``Name: value`` lines): the
    encoder may then forward that block with its edits appended instead of re-serialising.
    """

    __slots__ = (
        "body",
        "body_length",
        "bytes_in",
        "headers",
        "http_1_0",
        "keep_alive",
        "method",
        "path",
        "raw",
        "started",
        "target",
    )

    def __init__(  # noqa: PLR0917 - built positionally once per request
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | BodyStream,
        keep_alive: bool,
        http_1_0: bool,
        bytes_in: int,
        started: float,
        body_length: int | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.partition("?")[0]
        self.headers = headers
        self.body = body
        self.body_length = body_length
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0
        self.bytes_in = bytes_in
        self.started = started
        self.raw = raw


class Reject(Exception):
    """Raised from a parser callback: the edge answers ``status`` itself and closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def check_framing(
    headers: list[tuple[str, str]], *, max_body_bytes: int, http_1_0: bool
) -> int | None:
    """Refuse ambiguous request framing (request smuggling, RFC 9112 §6.3). Raises Reject.

    Returns the Content-Length, if the request has one. llhttp already refuses most of this;
    the edge checks again so that no parser leniency can ever reach a backend.
    """
    lengths = 0
    length: int | None = None
    chunked = False
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            lengths += 1
            if not value.strip().isdigit() or not value.strip().isascii():
                raise Reject(400, "bad_framing", "invalid Content-Length")
            length = int(value)
            if length > max_body_bytes:
                raise too_large()
        elif len(name) == 17 and name.lower() == "transfer-encoding":
            if chunked or value.strip().lower() != "chunked":
                if value.strip().lower().endswith("chunked"):
                    raise Reject(501, "unsupported_coding", "only chunked is supported")
                raise Reject(400, "bad_framing", "invalid Transfer-Encoding")
            chunked = True
    if lengths > 1 or (lengths and chunked):
        raise Reject(400, "bad_framing", "ambiguous request framing")
    if chunked and http_1_0:
        raise Reject(400, "bad_framing", "Transfer-Encoding in an HTTP/1.0 request")
    return length


def head_bytes(
    status: int,
    headers: list[tuple[str, str]],
    *,
    keep_alive: bool,
    http_1_0: bool = False,
) -> bytes:
    """Status line and headers, encoded once (framing headers are the caller's)."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http_1_0:
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return status_line(status) + "".join(lines).encode("latin-1")


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode("latin-1")


def add_vary(headers: list[tuple[str, str]]) -> None:
    for index, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            if "accept-encoding" not in value.lower() and value.strip() != "*":
                headers[index] = (name, f"{value}, Accept-Encoding")
            return
    headers.append(("Vary", "Accept-Encoding"))


def too_many_header_bytes() -> Reject:
    return Reject(431, "headers_too_large", "request headers too large")


def too_large() -> Reject:
    return Reject(413, "body_too_large", "request body too large")
