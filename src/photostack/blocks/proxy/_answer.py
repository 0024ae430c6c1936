"""The general (coroutine) path: requests the callback relay does not take.

That is: GET/HEAD through the micro-cache or collapsed forwarding (``_shared``), uploads
streamed while the client still sends them, and requests without a Host header (the backend's
address stands in). One task per such request; the results are the fast path's.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from photostack.blocks.balancer import NoBackendAvailable, UpstreamError
from photostack.blocks.proxy._body import BodyStream
from photostack.blocks.proxy._headers import upstream_headers
from photostack.blocks.proxy._policy import apply_header_rules
from photostack.blocks.proxy._request import Reject, Request
from photostack.blocks.proxy._shared import answer_shared
from photostack.blocks.proxy._stream import error_status, relay

if TYPE_CHECKING:
    from photostack.blocks.proxy._protocol import ClientConnection

__all__ = ["answer_general"]


async def answer_general(
    conn: ClientConnection, request: Request, request_id: str, keep_alive: bool
) -> bool:
    """Answer one request; returns whether the connection stays open."""
    ctx = conn.ctx
    headers = upstream_headers(
        request.headers, client_ip=conn.client_ip, proto=conn.proto, request_id=request_id
    )
    rules = ctx.header_rules
    if rules is not None:
        headers = apply_header_rules(headers, rules.request_add, rules.request_remove)
    body = request.body
    if ctx.shares_responses and request.method in ("GET", "HEAD") and body == b"":
        return await answer_shared(conn, ctx, request, headers, request_id, keep_alive)
    streamed = isinstance(body, BodyStream)
    try:
        response = await ctx.upstream.open(
            request.method,
            request.target,
            headers=headers,
            body=body,
            body_length=request.body_length if streamed else None,
        )
    except (NoBackendAvailable, UpstreamError) as exc:
        # An upload the client is still sending cannot be skipped: answer, then close.
        keep_alive = keep_alive and not _unfinished(body)
        conn.write_upstream_error(exc, keep_alive, request_id)
        ctx.log(conn, request, request_id, error_status(exc), None, 0, None)
        return keep_alive
    except Reject as reject:  # the streamed body broke a limit on its way (413)
        conn.write_error(reject.status, reject.code, str(reject), False, request_id)
        ctx.log(conn, request, request_id, reject.status, None, 0, None)
        return False
    first_byte = perf_counter()
    try:
        keep = await relay(conn, request, response, keep_alive, request_id, first_byte)
    finally:
        response.close()
    return keep and not _unfinished(body)


def _unfinished(body: bytes | BodyStream) -> bool:
    return isinstance(body, BodyStream) and not body.finished
