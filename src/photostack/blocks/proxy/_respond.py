"""Writing answers to one client: the half of ``ClientConnection`` both answer paths share."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from photostack.blocks.balancer import NoBackendAvailable, UpstreamError, UpstreamTimeout
from photostack.blocks.proxy._config import ProxyConfig
from photostack.blocks.proxy._headers import downstream_headers, error_body, new_request_id
from photostack.blocks.proxy._policy import (
    accepts_gzip,
    apply_header_rules,
    compress,
    header_value,
    is_compressible,
    is_compressible_type,
)
from photostack.blocks.proxy._request import Request, add_vary, head_bytes

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext

__all__ = ["ResponseWriter"]

_JSON = "application/json; charset=utf-8"


class ResponseWriter:
    """A mixin: the client transport's writing side (set up by ``ClientConnection``)."""

    ctx: ProxyContext
    _config: ProxyConfig
    _loop: asyncio.AbstractEventLoop
    _transport: asyncio.Transport | None
    write_paused: bool
    _drain_waiter: asyncio.Future[None] | None

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and self._transport is not None:
            if self._transport.is_closing():
                return
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            await waiter

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def response_headers(
        self, headers: list[tuple[str, str]], request_id: str
    ) -> list[tuple[str, str]]:
        out = downstream_headers(headers, request_id=request_id)
        rules = self.ctx.header_rules
        if rules is not None:
            out = apply_header_rules(out, rules.response_add, rules.response_remove)
        return out

    def write_whole(
        self,
        request: Request,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        *,
        head_length: int | None = None,
    ) -> int:
        """Write a response whose body is in memory (gzipping it when allowed), in one write.

        ``headers`` are downstream headers without framing. Returns the bytes written.
        """
        gzip = self._config.gzip
        if gzip is not None and is_compressible_type(header_value(headers, "content-type")):
            add_vary(headers)
            if (
                request.method != "HEAD"
                and is_compressible(status, headers, len(body), gzip)
                and accepts_gzip(header_value(request.headers, "accept-encoding"))
            ):
                body = compress(body, gzip.level)
                headers.append(("Content-Encoding", "gzip"))
        if request.method == "HEAD":
            if head_length is not None:
                headers.append(("Content-Length", str(head_length)))
            body = b""
        elif status not in (204, 304) and status >= 200:
            headers.append(("Content-Length", str(len(body))))
        data = head_bytes(status, headers, keep_alive=keep_alive, http_1_0=request.http_1_0)
        if body:
            data += body
        if self._transport is not None:
            self._transport.write(data)
        self.ctx.metrics.count_response(status)
        return len(data)

    def _answer_health(self, keep_alive: bool) -> bool:
        if self.ctx.draining:
            self._write_simple(503, _JSON, b'{"status":"draining"}', keep_alive=False)
            return False
        self._write_simple(200, _JSON, b'{"status":"ok"}', keep_alive=keep_alive)
        return keep_alive

    def _write_simple(
        self, status: int, content_type: str, body: bytes, *, keep_alive: bool
    ) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        data = head_bytes(status, headers, keep_alive=keep_alive) + body
        if self._transport is not None:
            self._transport.write(data)
        self.ctx.metrics.count_response(status)

    def write_upstream_error(
        self, exc: NoBackendAvailable | UpstreamError, keep_alive: bool, request_id: str
    ) -> None:
        if isinstance(exc, NoBackendAvailable):
            self.write_error(
                503, "no_backend", "no backend available", keep_alive, request_id, retry=True
            )
        elif isinstance(exc, UpstreamTimeout):
            self.write_error(504, "upstream_timeout", "backend timed out", keep_alive, request_id)
        else:
            self.write_error(502, "bad_gateway", "backend failed", keep_alive, request_id)

    def write_error(
        self,
        status: int,
        code: str,
        message: str,
        keep_alive: bool,
        request_id: str | None = None,
        *,
        retry: bool = False,
    ) -> None:
        body = error_body(code, message)
        headers = [("Content-Type", _JSON), ("Content-Length", str(len(body)))]
        headers.append(("X-Request-Id", request_id or new_request_id()))
        if retry:
            headers.append(("Retry-After", "1"))
        data = head_bytes(status, headers, keep_alive=keep_alive) + body
        if self._transport is not None:
            self._transport.write(data)
        self.ctx.metrics.count_response(status)
