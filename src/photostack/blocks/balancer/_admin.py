"""The membership admin endpoint: a tiny HTTP/1.1 JSON server on a Unix socket (or loopback).

A running edge, web node or sidecar serves its upstream groups here, so membership changes need
no restart. It listens on a Unix socket in the cluster's run directory: nothing on the network
can reach it, the public API path space is untouched, and no port has to be allocated.

    GET    /pools                              every pool: strategy and backends
    GET    /pools/{pool}                       one pool
    POST   /pools/{pool}/backends              {"name", "host", "port", "weight"?}: join
    DELETE /pools/{pool}/backends/{name}       drain, wait for in-flight requests, forget
    POST   /pools/{pool}/backends/{name}/drain     no new requests
    POST   /pools/{pool}/backends/{name}/restore   serve again once a probe passes
    PUT    /pools/{pool}/strategy              {"strategy": "least-connections"}
    GET    /metrics                            the balancer metrics, if a registry was given
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from photostack.blocks.balancer._health import Backend
from photostack.blocks.balancer._upstream import Upstream

__all__ = ["AdminServer", "admin_dispatch"]

log = logging.getLogger("photostack.balancer.admin")

_MAX_BODY_BYTES = 64 * 1024
_READ_TIMEOUT_S = 5.0
_REMOVE_TIMEOUT_S = 10.0
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
}

Reply = tuple[int, Any]


def _pool_view(upstream: Upstream) -> dict[str, Any]:
    return {"strategy": upstream.pool.strategy.name.value, "backends": upstream.snapshot()}


def _error(status: int, code: str, message: str) -> Reply:
    return status, {"error": {"code": code, "message": message}}


async def admin_dispatch(  # noqa: PLR0911 - one early answer per malformed input
    pools: Mapping[str, Upstream], method: str, path: str, body: bytes
) -> Reply:
    """Answer one admin request: (status, JSON-ready body). Never raises for bad input."""
    parts = [p for p in path.partition("?")[0].split("/") if p]
    if not parts or parts[0] != "pools":
        return _error(404, "not_found", f"no admin resource {path!r}")
    if len(parts) == 1:
        if method != "GET":
            return _error(405, "method_not_allowed", "GET /pools")
        return 200, {name: _pool_view(up) for name, up in pools.items()}
    upstream = pools.get(parts[1])
    if upstream is None:
        return _error(404, "unknown_pool", f"no pool {parts[1]!r} (pools: {', '.join(pools)})")
    try:
        payload: Any = json.loads(body) if body else {}
    except ValueError:
        return _error(400, "bad_json", "the body is not JSON")
    if not isinstance(payload, dict):
        return _error(400, "bad_json", "the body must be a JSON object")
    rest = parts[2:]
    if len(rest) >= 2 and rest[0] == "backends":
        return await _backend_route(upstream, parts[1], method, rest[1:])
    return _pool_route(upstream, method, rest, payload)


def _pool_route(upstream: Upstream, method: str, rest: list[str], payload: dict[str, Any]) -> Reply:
    route = (method, "/".join(rest))
    if route == ("GET", ""):
        return 200, _pool_view(upstream)
    if route == ("PUT", "strategy"):
        try:
            upstream.set_strategy(str(payload.get("strategy")))
        except ValueError as exc:
            return _error(400, "bad_strategy", str(exc))
        return 200, _pool_view(upstream)
    if route == ("POST", "backends"):
        try:
            backend = Backend(
                str(payload["name"]),
                str(payload["host"]),
                int(payload["port"]),
                float(payload.get("weight", 1.0)),
            )
            upstream.add_backend(backend)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, "bad_backend", f"cannot add backend: {exc}")
        return 201, _pool_view(upstream)
    return _error(404, "not_found", f"no admin route {method} /{'/'.join(rest)}")


async def _backend_route(upstream: Upstream, pool: str, method: str, rest: list[str]) -> Reply:
    name = rest[0]
    if name not in upstream.pool:
        return _error(404, "unknown_backend", f"no backend {name!r} in pool {pool!r}")
    action = (method, "/".join(rest[1:]))
    if action == ("DELETE", ""):
        in_time = await upstream.remove_backend(name, timeout_s=_REMOVE_TIMEOUT_S)
        return 200, {"removed": name, "drained_in_time": in_time, **_pool_view(upstream)}
    if action == ("POST", "drain"):
        upstream.drain_backend(name)
        return 200, _pool_view(upstream)
    if action == ("POST", "restore"):
        upstream.restore_backend(name)
        return 200, _pool_view(upstream)
    return _error(404, "not_found", f"no admin route {method} on backend {name!r}")


class AdminServer:
    """Serves ``admin_dispatch`` over HTTP/1.1, one request per connection."""

    def __init__(
        self, pools: Mapping[str, Upstream], *, registry: CollectorRegistry | None = None
    ) -> None:
        self._pools = pools
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._path: Path | None = None

    def __repr__(self) -> str:
        return f"<AdminServer {sorted(self._pools)} at {self.address}>"

    @property
    def address(self) -> str:
        if self._path is not None:
            return f"unix:{self._path}"
        if self._server is not None and self._server.sockets:
            host, port = self._server.sockets[0].getsockname()[:2]
            return f"http://{host}:{port}"
        return "not listening"

    async def start_unix(self, path: Path) -> None:
        """Listen on a Unix socket (replacing a stale one), readable by this user only."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        os.chmod(path, 0o600)
        self._path = path

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on a loopback port (tests, or platforms without Unix sockets); returns it."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, payload = await self._answer(reader)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            status, content_type, payload = (
                400,
                "application/json",
                b'{"error":{"code":"bad_request"}}',
            )
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode("latin-1") + payload)
            await writer.drain()
        writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        async with asyncio.timeout(_READ_TIMEOUT_S):
            request_line = (await reader.readline()).decode("latin-1").split()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(request_line) < 2 or not 0 <= length <= _MAX_BODY_BYTES:
                raise ValueError("bad request")
            body = await reader.readexactly(length) if length else b""
        method, path = request_line[0].upper(), request_line[1]
        if path == "/metrics" and method == "GET" and self._registry is not None:
            return 200, "text/plain; version=0.0.4", generate_latest(self._registry)
        status, reply = await admin_dispatch(self._pools, method, path, body)
        if status >= 400:
            log.info("admin %s %s -> %s", method, path, status)
        return status, "application/json", json.dumps(reply).encode()
