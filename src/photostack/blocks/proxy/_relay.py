"""The fast path: a request answered from callbacks, with no coroutine, task or timer.

``RequestEncoder`` turns a client request into the bytes the backend receives in one pass
(hop-by-hop removal, X-Forwarded-*, X-Request-Id, header rules, framing), and ``Relay`` is the
``ExchangeSink`` of the balancer's callback ``Exchange``: the upstream connection's parser
callbacks hand it the response head and body, and it writes them to the client as they come —
a small Content-Length body with its head in one write, anything else as it arrives, pausing
the upstream while the client's socket is full.

It serves the common case only: a request whose body is in memory, with a Host header, not
answered through the micro-cache or collapsing. Everything else takes the coroutine path
(``_answer``), with the same results.
"""

from __future__ import annotations

from time import perf_counter, time
from typing import TYPE_CHECKING

from photostack.blocks.balancer import Backend, ResponseHead, encode_request
from photostack.blocks.proxy._config import HeaderRules
from photostack.blocks.proxy._headers import (
    HOP_BY_HOP,
    is_valid_request_id,
    new_request_id,
    request_id_of,
    upstream_headers,
)
from photostack.blocks.proxy._policy import apply_header_rules, header_value, is_compressible_type
from photostack.blocks.proxy._request import Request, add_vary, head_bytes, status_line
from photostack.blocks.proxy._stream import error_status

if TYPE_CHECKING:
    from photostack.blocks.balancer import NoBackendAvailable, UpstreamError
    from photostack.blocks.proxy._context import ProxyContext
    from photostack.blocks.proxy._protocol import ClientConnection

__all__ = ["Relay", "RequestEncoder", "ResponseEncoder"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_EMPTY_BODY = "Content-Length: 0\r\n"
# Client headers that never pass as they are: hop-by-hop, framing, and those the edge sets.
_SKIP = HOP_BY_HOP | {"content-length", "x-forwarded-for", "x-forwarded-proto", "x-request-id"}
_MANAGED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-request-id"})
_DOWN_SKIP = HOP_BY_HOP | {"content-length"}
_CONNECTION_OPTIONS = frozenset({"keep-alive", "close", ""})


# What a header name means to an encoder, cached by its spelling (a bounded cache: header
# names are the client's choice).
_PASS, _SKIP_IT, _FORWARDED_FOR, _REQUEST_ID, _CONNECTION, _HOST = range(6)
_MAX_CACHED_NAMES = 4096


class RequestEncoder:
    """The upstream request's bytes, as ``upstream_headers`` + rules + ``encode_request`` make
    them (same headers, same values), in one pass over the client's headers; that pass also
    finds the request id and whether a Host header is there."""

    def __init__(self, rules: HeaderRules | None) -> None:
        self._rules = rules
        add = rules.request_add if rules is not None else ()
        remove = rules.request_remove if rules is not None else frozenset()
        self._drop = remove | {name.lower() for name, _ in add}
        self._add = "".join(f"{name}: {value}\r\n" for name, value in add)
        # Rules that touch the headers the edge manages need the general (ordered) path.
        self._general = bool(self._drop & _MANAGED)
        self._classes: dict[str, int] = {}

    def _classify(self, name: str) -> int:
        lowered = name.lower()
        if lowered == "x-forwarded-for":
            kind = _FORWARDED_FOR
        elif lowered == "x-request-id":
            kind = _REQUEST_ID
        elif lowered == "connection":
            kind = _CONNECTION
        elif lowered in _SKIP or lowered in self._drop or lowered.startswith("proxy-"):
            kind = _SKIP_IT
        elif lowered == "host":
            kind = _HOST
        else:
            kind = _PASS
        if len(self._classes) < _MAX_CACHED_NAMES:
            self._classes[name] = kind
        return kind

    def encode(  # noqa: PLR0911, PLR0912 - one pass, one branch per kind of header
        self, request: Request, *, client_ip: str, proto: str
    ) -> tuple[bytes, str] | None:
        """(the request for the backend, its request id), or None without a Host header.

        ``request.body`` must be bytes.
        """
        body = request.body
        assert isinstance(body, bytes)
        if self._general:
            return self._encode_general(request, client_ip, proto, body)
        classes = self._classes
        raw = request.raw
        if raw is not None:
            # The client's own bytes (``Request.raw``) are forwarded as they are when every
            # header passes unchanged (no hop-by-hop, framing, X-Forwarded-*, X-Request-Id or
            # rule-removed one): only the edge's headers are appended. One loop, no calls.
            has_host = False
            for name, _ in request.headers:
                kind = classes.get(name)
                if kind is None:
                    kind = self._classify(name)
                if kind == _HOST:
                    has_host = True
                elif kind != _PASS:
                    break
            else:
                if not has_host:
                    return None
                new_id = new_request_id()
                length = _EMPTY_BODY if request.method in _BODY_METHODS else ""
                tail = (
                    f"X-Forwarded-For: {client_ip}\r\nX-Forwarded-Proto: {proto}\r\n"
                    f"X-Request-Id: {new_id}\r\n{self._add}{length}\r\n"
                )
                return raw[:-2] + tail.encode("latin-1"), new_id
        lines = [f"{request.method} {request.target} HTTP/1.1\r\n"]
        forwarded: str | None = None
        request_id: str | None = None
        seen_id = has_host = False
        for name, value in request.headers:
            kind = classes.get(name)
            if kind is None:
                kind = self._classify(name)
            if kind == _PASS:
                lines.append(f"{name}: {value}\r\n")
            elif kind == _HOST:
                has_host = True
                lines.append(f"{name}: {value}\r\n")
            elif kind == _FORWARDED_FOR:
                forwarded = value if forwarded is None else f"{forwarded}, {value}"
            elif kind == _REQUEST_ID:
                if not seen_id:  # the first one decides, as request_id_of does
                    seen_id = True
                    request_id = value if is_valid_request_id(value) else None
            elif kind == _CONNECTION and _names_headers(value):
                # The Connection header names other headers to drop: the general path.
                return self._encode_general(request, client_ip, proto, body)
        if not has_host:
            return None
        if request_id is None:
            request_id = new_request_id()
        if forwarded is not None:
            client_ip = f"{forwarded}, {client_ip}"
        lines.append(
            f"X-Forwarded-For: {client_ip}\r\nX-Forwarded-Proto: {proto}\r\n"
            f"X-Request-Id: {request_id}\r\n{self._add}"
        )
        if body:
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
            return "".join(lines).encode("latin-1") + body, request_id
        lines.append("Content-Length: 0\r\n\r\n" if request.method in _BODY_METHODS else "\r\n")
        return "".join(lines).encode("latin-1"), request_id

    def _encode_general(
        self, request: Request, client_ip: str, proto: str, body: bytes
    ) -> tuple[bytes, str] | None:
        if header_value(request.headers, "host") is None:
            return None
        request_id = request_id_of(request.headers) or new_request_id()
        headers = upstream_headers(
            request.headers, client_ip=client_ip, proto=proto, request_id=request_id
        )
        rules = self._rules
        if rules is not None:
            headers = apply_header_rules(headers, rules.request_add, rules.request_remove)
        data = encode_request(request.method, request.target, headers, body, default_host="")
        return data, request_id


class ResponseEncoder:
    """A small whole response's bytes, as ``downstream_headers`` + rules + ``write_whole``
    (without gzip) make them, in one pass over the backend's headers."""

    def __init__(self, rules: HeaderRules | None) -> None:
        add = rules.response_add if rules is not None else ()
        remove = rules.response_remove if rules is not None else frozenset()
        self._drop = remove | {name.lower() for name, _ in add}
        self._add = "".join(f"{name}: {value}\r\n" for name, value in add)
        self.general = "x-request-id" in self._drop  # then the ordered path
        self._classes: dict[str, int] = {}

    def _classify(self, name: str) -> int:
        lowered = name.lower()
        if lowered == "connection":
            kind = _CONNECTION
        elif lowered in _DOWN_SKIP or lowered in self._drop or lowered.startswith("proxy-"):
            kind = _SKIP_IT
        elif lowered == "x-request-id":
            kind = _REQUEST_ID
        else:
            kind = _PASS
        if len(self._classes) < _MAX_CACHED_NAMES:
            self._classes[name] = kind
        return kind

    def encode(  # noqa: PLR0917 - positional on the hot path
        self,
        status: int,
        headers: list[tuple[str, str]],
        request_id: str,
        body: bytes,
        keep_alive: bool,
        http_1_0: bool,
    ) -> bytes | None:
        """Head and body for a status with a body (not 1xx, 204, 304); None: the general path."""
        lines: list[str] = []
        has_request_id = False
        classes = self._classes
        for name, value in headers:
            kind = classes.get(name)
            if kind is None:
                kind = self._classify(name)
            if kind == _PASS:
                lines.append(f"{name}: {value}\r\n")
            elif kind == _REQUEST_ID:
                has_request_id = True
                lines.append(f"{name}: {value}\r\n")
            elif kind == _CONNECTION and _names_headers(value):
                return None
        if not has_request_id:
            lines.append(f"X-Request-Id: {request_id}\r\n")
        lines.append(
            f"{self._add}Content-Length: {len(body)}\r\n"
            + (
                "\r\n"
                if keep_alive and not http_1_0
                else "Connection: close\r\n\r\n"
                if not keep_alive
                else "Connection: keep-alive\r\n\r\n"
            )
        )
        return status_line(status) + "".join(lines).encode("latin-1") + body


def _names_headers(value: str) -> bool:
    return any(token.strip().lower() not in _CONNECTION_OPTIONS for token in value.split(","))


# How the response body goes to the client.
_PENDING, _BUFFER, _RAW, _CHUNKED = range(4)


class Relay:
    """The ``ExchangeSink`` of one client connection, reused for each of its requests."""

    __slots__ = (
        "_conn",
        "_ctx",
        "_first_byte",
        "_headers",
        "_mode",
        "_parts",
        "_sent",
        "_status",
        "backend",
        "keep_alive",
        "request",
        "request_id",
    )

    def __init__(self, conn: ClientConnection, ctx: ProxyContext) -> None:
        self._conn = conn
        self._ctx = ctx
        self._mode = _PENDING
        self._parts: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._status = 0
        self._sent = 0
        self._first_byte = 0.0
        self.backend: str | None = None
        self.keep_alive = False
        self.request: Request | None = None
        self.request_id = ""

    def __repr__(self) -> str:
        return f"<Relay mode={self._mode} backend={self.backend}>"

    def start(self, request: Request, keep_alive: bool) -> bool:
        """Send ``request`` upstream; the answer is written from the callbacks below.

        False (nothing done) for a request without a Host header: the general path adds one.
        """
        conn, ctx = self._conn, self._ctx
        encoded = ctx.encoder.encode(request, client_ip=conn.client_ip, proto=conn.proto)
        if encoded is None:
            return False
        data, request_id = encoded
        self.request = request
        self.request_id = request_id
        self.keep_alive = keep_alive
        self.backend = None
        self._mode = _PENDING
        exchange = ctx.upstream.exchange(
            self,
            request.method,
            request.target,
            headers=request.headers,
            request=data,
            body_timeout_s=ctx.config.stream_idle_timeout_s,
        )
        conn.exchange = exchange
        exchange.start(ctx.request_timeout_s)
        return True

    # -- ExchangeSink -------------------------------------------------------------------------

    def on_response_head(self, head: ResponseHead, backend: Backend) -> None:
        conn, ctx = self._conn, self._ctx
        request = self.request
        assert request is not None
        self.backend = backend.name
        self._first_byte = perf_counter()
        keep_alive = self.keep_alive = self.keep_alive and not ctx.draining
        status = head.status
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        length = head.content_length
        if not no_body and length is not None and length <= ctx.small_body_bytes:
            # The common case: wait for the small body, then one write with the head.
            self._mode = _BUFFER
            self._status = status
            self._headers = head.headers
            self._parts = []
            return
        headers = conn.response_headers(head.headers, self.request_id)
        if ctx.config.gzip is not None and is_compressible_type(
            header_value(headers, "content-type")
        ):
            add_vary(headers)
        chunked = False
        if length is not None and status not in (204, 304):
            headers.append(("Content-Length", str(length)))
        elif not no_body:
            if request.http_1_0:
                keep_alive = self.keep_alive = False  # no chunking in 1.0: the body ends at close
            else:
                chunked = True
                headers.append(("Transfer-Encoding", "chunked"))
        data = head_bytes(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
        self._status = status
        self._sent = len(data)
        self._mode = _CHUNKED if chunked else _RAW
        conn.write(data)
        ctx.metrics.count_response(status)

    def on_response_body(self, data: bytes) -> None:
        mode = self._mode
        if mode == _BUFFER:
            self._parts.append(data)
            return
        self._sent += len(data)
        if mode == _CHUNKED:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._conn.write(data)

    def on_response_end(self) -> None:
        conn = self._conn
        request = self.request
        assert request is not None
        mode = self._mode
        if mode == _BUFFER:
            parts = self._parts
            body = parts[0] if len(parts) == 1 else b"".join(parts) if parts else b""
            self._parts = []
            self._sent = self._write_whole(request, body)
        elif mode == _CHUNKED:
            conn.write(b"0\r\n\r\n")
            self._sent += 5
        log = self._ctx.access_log
        if log is not None:  # ctx.log(...), inlined
            started = request.started
            exchange = conn.exchange
            log.add(
                time(), self.request_id, conn.client_ip, request.method, request.target,
                self.backend, self._status, request.bytes_in, self._sent,
                None if exchange is None else exchange.connect_s,
                self._first_byte - started, perf_counter() - started, None,
            )  # fmt: skip
        self.request = None
        conn.finished(self.keep_alive)

    def _write_whole(self, request: Request, body: bytes) -> int:
        conn, ctx = self._conn, self._ctx
        status = self._status
        encoder = ctx.response_encoder
        if ctx.config.gzip is None and not encoder.general:
            data = encoder.encode(
                status, self._headers, self.request_id, body, self.keep_alive, request.http_1_0
            )
            if data is not None:
                conn.write(data)
                by_class = ctx.metrics.by_class
                by_class[status // 100 if status < 600 else 0] += 1
                return len(data)
        headers = conn.response_headers(self._headers, self.request_id)
        return conn.write_whole(request, status, headers, body, self.keep_alive)

    def on_response_error(self, error: NoBackendAvailable | UpstreamError) -> None:
        conn, ctx = self._conn, self._ctx
        request = self.request
        assert request is not None
        self.request = None
        mode = self._mode
        if mode == _PENDING:
            conn.write_upstream_error(error, self.keep_alive, self.request_id)
            ctx.log(
                conn, request, self.request_id, error_status(error), None, 0, None, None,
                self._connect_s(),
            )  # fmt: skip
            conn.finished(self.keep_alive)
        elif mode == _BUFFER:
            # The head is not written yet: the client gets a clean 502, then the close.
            conn.write_error(502, "bad_gateway", "backend failed", False, self.request_id)
            ctx.log(
                conn, request, self.request_id, 502, self.backend, 0, self._first_byte, None,
                self._connect_s(),
            )  # fmt: skip
            conn.finished(False)
        else:
            # Part of the response is out: all that is left is to cut the connection.
            ctx.log(
                conn, request, self.request_id, self._status, self.backend, self._sent,
                self._first_byte, None, self._connect_s(),
            )  # fmt: skip
            conn.finished(False)

    def _connect_s(self) -> float | None:
        exchange = self._conn.exchange
        return None if exchange is None else exchange.connect_s
