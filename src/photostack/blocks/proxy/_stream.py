"""Relaying a ``StreamedResponse`` to the client from a coroutine (the general path).

The fast path (``_relay``) does the same from callbacks; these are for requests that need a
coroutine anyway (micro-cache and collapsing, streamed uploads, requests without Host).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from photostack.blocks.balancer import (
    NoBackendAvailable,
    StreamedResponse,
    UpstreamError,
    UpstreamTimeout,
)
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._policy import header_value, is_compressible_type
from photostack.blocks.proxy._request import Request, add_vary, head_bytes

if TYPE_CHECKING:
    from photostack.blocks.proxy._protocol import ClientConnection

__all__ = ["error_status", "relay", "small_body_limit"]

# A response body up to this size is read whole and written with its head in one write.
_SMALL_BODY_BYTES = 64 * 1024


def small_body_limit(config: ProxyConfig) -> int:
    gzip = config.gzip
    return _SMALL_BODY_BYTES if gzip is None else max(gzip.max_buffer_bytes, _SMALL_BODY_BYTES)


def error_status(exc: NoBackendAvailable | UpstreamError) -> int:
    if isinstance(exc, NoBackendAvailable):
        return 503
    return 504 if isinstance(exc, UpstreamTimeout) else 502


async def relay(  # noqa: PLR0917 - the answer path's arguments
    conn: ClientConnection,
    request: Request,
    response: StreamedResponse,
    keep_alive: bool,
    request_id: str,
    first_byte: float,
) -> bool:
    """Write ``response`` to the client; returns whether the connection stays open."""
    ctx = conn.ctx
    status = response.status
    keep_alive = keep_alive and not ctx.draining  # drain may have begun meanwhile
    headers = conn.response_headers(response.headers, request_id)
    no_body = request.method == "HEAD" or status in (204, 304) or status < 200
    length = response.content_length
    if not no_body and length is not None and length <= small_body_limit(ctx.config):
        # The common case: read the small body whole, then one write with the head.
        try:
            body = await response.read_all(
                deadline=ctx.loop.time() + ctx.config.stream_idle_timeout_s
            )
        except UpstreamError:
            conn.write_error(502, "bad_gateway", "backend failed", False, request_id)
            ctx.log(
                conn, request, request_id, 502, response.backend, 0, first_byte, None,
                response.connect_s,
            )  # fmt: skip
            return False
        sent = conn.write_whole(request, status, headers, body, keep_alive)
        ctx.log(
            conn, request, request_id, status, response.backend, sent, first_byte, None,
            response.connect_s,
        )  # fmt: skip
        return keep_alive
    if ctx.config.gzip is not None and is_compressible_type(header_value(headers, "content-type")):
        add_vary(headers)
    chunked = False
    if length is not None and status not in (204, 304):
        headers.append(("Content-Length", str(length)))
    elif not no_body:
        if request.http_1_0:
            keep_alive = False  # HTTP/1.0 has no chunking: the body ends at close
        else:
            chunked = True
            headers.append(("Transfer-Encoding", "chunked"))
    head = head_bytes(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
    conn.write(head)
    ctx.metrics.count_response(status)
    sent, ok = await _pump(conn, response, chunked=chunked, sent=len(head))
    ctx.log(
        conn, request, request_id, status, response.backend, sent, first_byte, None,
        response.connect_s,
    )  # fmt: skip
    return keep_alive and ok


async def _pump(
    conn: ClientConnection, response: StreamedResponse, *, chunked: bool, sent: int
) -> tuple[int, bool]:
    """Relay the body as it arrives, pausing while the client's socket is full.

    Returns the bytes written and whether the body went through whole.
    """
    timeout_s = conn.ctx.config.stream_idle_timeout_s
    while True:
        try:
            data = await response.read_chunk(timeout_s=timeout_s)
        except UpstreamError:
            return sent, False  # head already sent: all we can do is cut the connection
        if data is None:
            break
        sent += len(data)
        if chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        if conn.write_paused:
            await conn.drain()
        if conn.is_closing:
            return sent, False
    if chunked:
        conn.write(b"0\r\n\r\n")
        sent += 5
    return sent, True
