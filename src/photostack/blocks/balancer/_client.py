"""The smart client: how a web node calls app nodes without a load balancer in between.

It is the upstream core with buffered bodies; the balancing, passive health and retry rule are
the same objects the edge proxy uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from photostack.blocks.balancer._config import ClientConfig
from photostack.blocks.balancer._errors import UpstreamConnectError, UpstreamProtocolError
from photostack.blocks.balancer._health import Backend
from photostack.blocks.balancer._pool import Clock
from photostack.blocks.balancer._retry import is_idempotent, max_tries_for
from photostack.blocks.balancer._upstream import Upstream, UpstreamHooks

__all__ = ["SmartClient", "UpstreamResponse"]


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    backend: str

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive)."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default


class SmartClient:
    """A balancing HTTP/1.1 client over a set of backends, with keep-alive pools.

    Any HTTP status is returned as a response (4xx from an app node is the user's answer).
    ``request`` raises NoBackendAvailable, UpstreamTimeout, UpstreamConnectError or
    UpstreamProtocolError, all BalancerError. ``await start()`` runs the active health checks
    (when configured); membership changes go through ``upstream``.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        config: ClientConfig | None = None,
        *,
        hooks: UpstreamHooks | Sequence[UpstreamHooks] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._upstream = Upstream(backends, config, hooks=hooks, clock=clock)

    def __repr__(self) -> str:
        return f"<SmartClient {self._upstream.pool!r}>"

    @property
    def upstream(self) -> Upstream:
        """The core: pool, membership (add/drain/remove), strategy, budget."""
        return self._upstream

    async def start(self) -> None:
        """Start the active health checks, if the config has them (idempotent)."""
        await self._upstream.start()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """One request, retried on another backend when the retry rule allows.

        ``timeout_s`` (default ``ClientConfig.request_timeout_s``) bounds the whole call,
        retries and body included.
        """
        loop = asyncio.get_running_loop()
        up = self._upstream
        total_s = up.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = loop.time() + total_s
        # The head arrived but the body broke off (a backend killed between its head and body
        # writes): nothing reached the caller yet, so an idempotent request is asked again on
        # the backends that remain, within the same deadline and retry budget.
        body_retries = max_tries_for(len(up.pool), up.config.max_tries) - 1
        while True:
            response = await up.open(
                method, path, headers=headers, body=body, timeout_s=deadline - loop.time()
            )
            try:
                async with response:
                    data = await response.read_all(deadline=deadline)
            except (UpstreamConnectError, UpstreamProtocolError):
                if (
                    body_retries <= 0
                    or not is_idempotent(method, headers)
                    or loop.time() >= deadline
                    or not up.budget.try_spend()
                ):
                    raise
                body_retries -= 1
                up.hooks.on_retry(response.backend, "body")
                continue
            return UpstreamResponse(response.status, response.headers, data, response.backend)

    def snapshot(self) -> list[dict[str, object]]:
        """Per backend: name, address, state, in_flight, failures, markdowns, connections."""
        return self._upstream.snapshot()

    async def aclose(self) -> None:
        await self._upstream.aclose()
