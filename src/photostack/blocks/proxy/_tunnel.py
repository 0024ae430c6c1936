"""WebSocket upgrades through the edge: the request head goes to a backend, then bytes flow both
ways untouched until either side closes.

The client connection's transport is handed over (``set_protocol``) once httptools reports the
upgrade, so the HTTP protocol object is out of the way. Flow control is end to end: a side whose
write buffer is full pauses reading on the other side. A tunnel has no request or idle timeout
(WebSocket keepalive pings are the backend's business); it ends with either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from photostack.blocks.balancer import Backend, NoBackendAvailable
from photostack.blocks.proxy._headers import (
    error_body,
    new_request_id,
    request_id_of,
    upstream_headers,
)

if TYPE_CHECKING:
    from photostack.blocks.proxy._context import ProxyContext

__all__ = ["Tunnel", "is_websocket_upgrade", "start_tunnel"]

log = logging.getLogger(__name__)

_CONNECT_TRIES = 3


def is_websocket_upgrade(headers: Sequence[tuple[str, str]]) -> bool:
    """Whether a request asks to switch to WebSocket (the only upgrade the edge tunnels)."""
    return any(
        name.lower() == "upgrade" and value.strip().lower() == "websocket"
        for name, value in headers
    )


def encode_upgrade_head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    *,
    client_ip: str,
    proto: str,
    request_id: str,
) -> bytes:
    """The request head the backend receives: forwarding headers, plus the upgrade itself."""
    upgrade = next(v for k, v in headers if k.lower() == "upgrade")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in upstream_headers(
        headers, client_ip=client_ip, proto=proto, request_id=request_id
    ):
        if "\r" in value or "\n" in value:
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n")
    return "".join(lines).encode("latin-1")


class _BackendSide(asyncio.Protocol):
    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self._tunnel.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.backend_lost()

    def pause_writing(self) -> None:
        self._tunnel.client.pause_reading()

    def resume_writing(self) -> None:
        self._tunnel.client.resume_reading()


class Tunnel(asyncio.Protocol):
    """The client side of one tunnel (the protocol of the client's transport once upgraded)."""

    def __init__(
        self,
        ctx: ProxyContext,
        client: asyncio.Transport,
        head: bytes,
        early: bytes,
        request_id: str,
    ) -> None:
        self.ctx = ctx
        self.client = client
        self._head = head
        self._pending = [early] if early else []
        self._request_id = request_id
        self._backend: asyncio.Transport | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._backend else "connecting")
        return f"<Tunnel {state}>"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        pool = self.ctx.upstream.pool
        tried: list[str] = []
        timeout_s = self.ctx.upstream.config.connect_timeout_s
        loop = asyncio.get_running_loop()
        while len(tried) < _CONNECT_TRIES:
            try:
                backend: Backend = pool.choose(exclude=tried)
            except NoBackendAvailable:
                break
            tried.append(backend.name)
            try:
                async with asyncio.timeout(timeout_s):
                    transport, _ = await loop.create_connection(
                        lambda: _BackendSide(self), backend.host, backend.port
                    )
            except (OSError, TimeoutError):
                pool.record_failure(backend)
                continue
            pool.record_success(backend)
            if self._closed:
                transport.close()
                return
            self._backend = transport
            self._backend.write(self._head + b"".join(self._pending))
            self._pending.clear()
            self.ctx.metrics.count_response(101)
            return
        body = error_body("no_backend", "no backend available")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nX-Request-Id: {self._request_id}"
            "\r\nConnection: close\r\n\r\n"
        )
        self.ctx.metrics.count_response(503)
        self.client.write(head.encode("latin-1") + body)
        self.client.close()

    # -- the client transport's protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._backend is None:
            self._pending.append(data)
        else:
            self._backend.write(data)

    def eof_received(self) -> bool:
        if self._backend is not None and self._backend.can_write_eof():
            self._backend.write_eof()
            return True  # half-close: keep relaying the backend's answer
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._backend is not None:
            self._backend.close()
        elif self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        if self._backend is not None:
            self._backend.pause_reading()

    def resume_writing(self) -> None:
        if self._backend is not None:
            self._backend.resume_reading()

    def backend_lost(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()


def start_tunnel(
    ctx: ProxyContext,
    client: asyncio.Transport,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]],
    early: bytes,
    client_ip: str,
    proto: str,
) -> Tunnel:
    """Take over ``client`` (an upgraded connection) and tunnel it to a backend."""
    request_id = request_id_of(headers) or new_request_id()
    head = encode_upgrade_head(
        method, target, headers, client_ip=client_ip, proto=proto, request_id=request_id
    )
    tunnel = Tunnel(ctx, client, head, early, request_id)
    client.set_protocol(tunnel)
    with contextlib.suppress(RuntimeError):  # a closing transport cannot resume
        client.resume_reading()
    tunnel.start()
    return tunnel
