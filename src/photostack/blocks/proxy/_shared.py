"""GET/HEAD answered through the micro-cache and collapsed forwarding.

Only bodiless GET and HEAD requests come here, and only when one of the two features is on.
A fresh cache entry answers at once (``X-Cache: HIT``). Otherwise the first request for a key
goes upstream (the leader) and identical requests arriving meanwhile wait for its outcome
(``X-Cache: COLLAPSED``) instead of sending their own. The leader's response is shared only
when it is whole in memory (a Content-Length body up to the cache's size limit) and shareable
(no Set-Cookie, no ``no-store``); otherwise, or when the leader's client goes away, followers
go upstream themselves. An upstream failure is shared too (that is the point: a struggling
backend sees one request, not five hundred), unless a stale entry may answer instead
(``stale-if-error``, ``X-Cache: STALE``).
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

from photostack.blocks.balancer import NoBackendAvailable, StreamedResponse, UpstreamError
from photostack.blocks.proxy._cache import Buffered, request_key
from photostack.blocks.proxy._policy import (
    freshness_s,
    header_value,
    is_shareable,
    stale_window_s,
)
from photostack.blocks.proxy._stream import error_status, relay

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext
    from photostack.blocks.proxy._protocol import ClientConnection, Request

__all__ = ["answer_shared"]

_DEFAULT_MAX_SHARED_BYTES = 1024 * 1024
_STALE_STATUSES = frozenset({500, 502, 503, 504})
_MAX_REJOINS = 2
Failure = NoBackendAvailable | UpstreamError


class _LeaderGone(Exception):
    """The leader's client disconnected before its upstream response was in."""


class _Exchange:
    """One request being answered through the shared path, and where to answer it."""

    __slots__ = (
        "conn",
        "connect_s",
        "ctx",
        "headers",
        "keep_alive",
        "key",
        "request",
        "request_id",
    )

    def __init__(
        self,
        conn: ClientConnection,
        ctx: ProxyContext,
        request: Request,
        *,
        headers: list[tuple[str, str]],
        request_id: str,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.ctx = ctx
        self.request = request
        self.headers = headers
        self.request_id = request_id
        self.keep_alive = keep_alive
        self.key = request_key(request.method, request.target, request.headers)
        self.connect_s: float | None = None  # set once this request used an upstream connection


async def answer_shared(  # noqa: PLR0917 - the connection's answer-path arguments
    conn: ClientConnection,
    ctx: ProxyContext,
    request: Request,
    headers: list[tuple[str, str]],
    request_id: str,
    keep_alive: bool,
) -> bool:
    ex = _Exchange(
        conn, ctx, request, headers=headers, request_id=request_id, keep_alive=keep_alive
    )
    cache = ctx.cache
    if cache is not None:
        hit = cache.fresh(ex.key)
        if hit is not None:
            return _write(ex, hit, None, "HIT")
    flights = ctx.flights
    lead = False
    if flights is not None:
        for _ in range(_MAX_REJOINS):
            flight = flights.join(ex.key)
            if flight is None:
                lead = True
                break
            try:
                shared = await asyncio.shield(flight.future)
            except _LeaderGone:
                continue
            except (NoBackendAvailable, UpstreamError) as exc:
                return _failed(ex, exc)
            finally:
                flight.followers -= 1
            if shared is None:
                break  # not shareable: go upstream on our own (without a flight)
            flights.collapsed += 1
            return _write(ex, shared, None, "COLLAPSED")
    if lead:
        return await _lead(ex)
    return await _fetch_and_answer(ex)


async def _lead(ex: _Exchange) -> bool:
    flights = ex.ctx.flights
    assert flights is not None
    try:
        outcome, first_byte = await _fetch(ex)
    except (NoBackendAvailable, UpstreamError) as exc:
        flights.crash(ex.key, exc)
        return _failed(ex, exc)
    except BaseException:
        flights.crash(ex.key, _LeaderGone())
        raise
    if isinstance(outcome, Buffered):
        flights.land(ex.key, outcome if is_shareable(outcome.headers) else None)
        return _store_and_write(ex, outcome, first_byte)
    flights.land(ex.key, None)
    return await _relay(ex, outcome, first_byte)


async def _fetch_and_answer(ex: _Exchange) -> bool:
    try:
        outcome, first_byte = await _fetch(ex)
    except (NoBackendAvailable, UpstreamError) as exc:
        return _failed(ex, exc)
    if isinstance(outcome, Buffered):
        return _store_and_write(ex, outcome, first_byte)
    return await _relay(ex, outcome, first_byte)


async def _relay(ex: _Exchange, response: StreamedResponse, first_byte: float) -> bool:
    try:
        return await relay(ex.conn, ex.request, response, ex.keep_alive, ex.request_id, first_byte)
    finally:
        response.close()


async def _fetch(ex: _Exchange) -> tuple[Buffered | StreamedResponse, float]:
    """The upstream response, read whole when it is small enough to share or store."""
    ctx, request = ex.ctx, ex.request
    loop = ctx.loop
    response = await ctx.upstream.open(request.method, request.target, headers=ex.headers)
    first_byte = perf_counter()
    ex.connect_s = response.connect_s
    limit = ctx.config.cache.max_body_bytes if ctx.config.cache else _DEFAULT_MAX_SHARED_BYTES
    length = response.content_length
    if length is None or length > limit:
        return response, first_byte  # streamed (SSE, large): relayed to this client only
    try:
        if request.method == "HEAD" or response.status in (204, 304):
            body = b""
        else:
            deadline = loop.time() + ctx.config.stream_idle_timeout_s
            body = await response.read_all(deadline=deadline)
    finally:
        response.close()
    buffered = Buffered(response.status, tuple(response.headers), body, response.backend)
    return buffered, first_byte


def _store_and_write(ex: _Exchange, response: Buffered, first_byte: float) -> bool:
    cache = ex.ctx.cache
    config = ex.ctx.config.cache
    label = None
    if cache is not None and config is not None:
        label = "MISS"
        if response.status in _STALE_STATUSES:
            stale = cache.stale(ex.key)
            if stale is not None:
                return _write(ex, stale, None, "STALE")
        credentials = any(name.lower() == "authorization" for name, _ in ex.request.headers)
        fresh_s = freshness_s(
            response.status, response.headers, config, request_has_credentials=credentials
        )
        if fresh_s > 0:
            cache.store(ex.key, response, fresh_s, stale_window_s(response.headers, config))
    return _write(ex, response, first_byte, label)


def _failed(ex: _Exchange, exc: Failure) -> bool:
    cache = ex.ctx.cache
    if cache is not None:
        stale = cache.stale(ex.key)
        if stale is not None:
            return _write(ex, stale, None, "STALE")
    ex.conn.write_upstream_error(exc, ex.keep_alive, ex.request_id)
    ex.ctx.log(ex.conn, ex.request, ex.request_id, error_status(exc), None, 0, None)
    return ex.keep_alive


def _write(ex: _Exchange, response: Buffered, first_byte: float | None, label: str | None) -> bool:
    request = ex.request
    headers = ex.conn.response_headers(list(response.headers), ex.request_id)
    if label is not None:
        headers.append(("X-Cache", label))
    head_length = None
    if request.method == "HEAD":
        value = header_value(response.headers, "content-length")
        head_length = int(value) if value is not None and value.isdigit() else None
    sent = ex.conn.write_whole(
        request, response.status, headers, response.body, ex.keep_alive, head_length=head_length
    )
    connect_s = ex.connect_s if first_byte is not None else None  # None: stored, not fetched
    ex.ctx.log(
        ex.conn, request, ex.request_id, response.status, response.backend, sent, first_byte,
        label, connect_s,
    )  # fmt: skip
    return ex.keep_alive
