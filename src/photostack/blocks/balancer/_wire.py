"""The request on the wire: head encoding, and a streamed body written with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Sequence

from photostack.blocks.balancer._connection import ResponseHead, UpstreamConnection
from photostack.blocks.balancer._errors import UpstreamConnectError

__all__ = ["BodySource", "encode_head", "encode_request", "send_body", "send_body_until_answer"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Framing and connection management belong to this hop; callers cannot set them.
_MANAGED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
# A request body: bytes (retried freely), or an async source of pieces read once (retried only
# while none of it was sent).
BodySource = AsyncIterable[bytes]


def encode_head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    *,
    default_host: str,
    content_length: int | None,
    chunked: bool = False,
) -> bytes:
    """Serialize a request line and headers; the framing is ``content_length`` or ``chunked``.

    Raises ValueError on CR/LF in a header, or a colon in a name.
    """
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _MANAGED_HEADERS:
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"invalid header {name!r}")
        has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"Host: {default_host}\r\n")
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def encode_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    default_host: str,
) -> bytes:
    """Serialize one HTTP/1.1 request with a Content-Length body. Raises ValueError on CR/LF."""
    length = len(body) if body or method in _BODY_METHODS else None
    head = encode_head(method, target, headers, default_host=default_host, content_length=length)
    return head + body if body else head


async def send_body(
    conn: UpstreamConnection, body: BodySource, *, chunked: bool, length: int | None
) -> None:
    """Write a streamed body after the head, never more than the socket's buffer ahead.

    Raises UpstreamConnectError (sent) if the connection died, or when the source delivered
    another length than announced (the request is then unusable: the connection is dropped).
    """
    sent = 0
    async for piece in body:
        if not piece:
            continue
        sent += len(piece)
        if length is not None and sent > length:
            break
        conn.write_body(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
        if conn.write_paused:
            await conn.drain()
    if chunked:
        conn.write_body(b"0\r\n\r\n")
    if length is not None and sent != length:
        raise UpstreamConnectError(
            f"request body was {sent} bytes, not the announced {length}",
            backend=conn.backend.name,
            request_sent=True,
        )


async def send_body_until_answer(
    conn: UpstreamConnection, body: BodySource, *, chunked: bool, length: int | None
) -> bool:
    """``send_body``, but return as soon as the response head arrives; True if it came early.

    A backend may answer (413, 401, ...) before it has read the whole body, and then stop
    reading or close. Waiting for the body to go through first would stall or fail, and the
    answer would be lost, so the head is awaited alongside the body. When the head comes
    first, the body keeps flowing in the background (a backend may answer while it reads),
    owned by the connection: once the response is over, releasing or discarding the connection
    stops it, and a connection whose body was not sent whole is closed, not reused
    (``UpstreamConnection.stop_body``). Raises what ``send_body`` raises when no answer came,
    or what ``read_head`` raises (the connection failed) while the body waited on its source.
    """
    loop = conn.loop
    sender = loop.create_task(send_body(conn, body, chunked=chunked, length=length))
    answer = loop.create_task(conn.read_head())
    try:
        await asyncio.wait((sender, answer), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _stop(sender)
        await _stop(answer)
        raise
    if answer.done() and not answer.cancelled() and answer.exception() is None:
        if sender.done() and not sender.cancelled() and sender.exception() is None:
            return False  # the body went through whole, then the answer came: not early
        conn.adopt_body(sender)
        return True
    if sender.done():
        await _stop(answer)  # the caller reads the head again, under its deadline
        exc = sender.exception()
        if exc is not None:
            raise exc  # the body could not be sent, and no answer came
        return False
    # The connection failed while the body waited on its source: that failure it is.
    await _stop(sender)
    exc = answer.exception()
    assert exc is not None
    raise exc


async def _stop(task: asyncio.Task[None] | asyncio.Task[ResponseHead]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
