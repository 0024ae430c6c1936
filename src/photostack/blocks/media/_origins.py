"""The set of media origins as seen by a client or the CDN: one keep-alive pool per origin.

Each origin is its own balancer ``Upstream`` of one backend (the balancer block's pooled
HTTP/1.1 connections and passive health): an origin that just failed is ejected for a short
cool-down, so the next call skips it at once (``NoBackendAvailable``) instead of waiting for a
connect timeout. Callers choose the order (``order``) and what a status means.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from photostack.blocks.balancer import Backend, ClientConfig, HealthConfig, Upstream

__all__ = ["Fetched", "Origin", "OriginSet"]


@dataclass(frozen=True)
class Origin:
    name: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Fetched:
    origin: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class OriginSet:
    """Calls to named origins over pooled keep-alive connections.

    ``request`` raises the balancer's errors (all ``BalancerError``): NoBackendAvailable when
    the origin is in its cool-down or refused the connection, UpstreamTimeout, ... .
    """

    def __init__(
        self,
        origins: Sequence[Origin],
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 1.0,
        cooldown_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        if not origins:
            raise ValueError("at least one origin is needed")
        self.origins = tuple(origins)
        self.timeout_s = timeout_s
        config = ClientConfig(
            request_timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_tries=1,
            max_connections_per_backend=max_connections,
            health=HealthConfig(ejection_initial_s=cooldown_s, max_ejection_percent=100.0),
        )
        self._upstreams = {
            o.name: Upstream([Backend(o.name, o.host, o.port)], config) for o in self.origins
        }

    def __repr__(self) -> str:
        return f"<OriginSet {', '.join(o.name for o in self.origins)}>"

    def order(self, key: str) -> list[Origin]:
        """Every origin, starting at one chosen by ``key`` (spreads reads, stable per key)."""
        start = zlib.crc32(key.encode()) % len(self.origins)
        return [*self.origins[start:], *self.origins[:start]]

    def is_available(self, name: str) -> bool:
        """False while ``name`` sits out a cool-down after a failure."""
        rows = self._upstreams[name].snapshot()
        if not rows:
            return False
        row = rows[0]
        return row.get("state") == "up" or row.get("down_for_s") == 0.0

    async def request(
        self,
        origin: str,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        max_body_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> Fetched:
        """One request to ``origin``; the body read whole (at most ``max_body_bytes``).

        Raises BalancerError subclasses, or ValueError when the body is over the limit.
        """
        upstream = self._upstreams[origin]
        total_s = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_s
        response = await upstream.open(
            method, target, headers=headers, body=body, timeout_s=total_s
        )
        async with response:
            length = response.content_length
            if max_body_bytes is not None and length is not None and length > max_body_bytes:
                raise ValueError(f"{origin}: {length} bytes exceed {max_body_bytes}")
            data = await response.read_all(deadline=deadline)
        return Fetched(origin, response.status, response.headers, data)

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self._upstreams.values()))
