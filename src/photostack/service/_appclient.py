"""The seam between a web node and the app tier.

``photostack.blocks.balancer.SmartClient`` satisfies :class:`AppClient` structurally; tests use
:class:`photostack.service.testing.ASGIAppClient`. When no app node can be reached an implementation
raises an exception of its own; the web node is told which ones mean "unavailable" through
``create_app(..., unavailable_errors=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["AppClient", "AppReply", "AppResponse"]


class AppReply(Protocol):
    """What :meth:`AppClient.request` returns (e.g. the balancer's ``UpstreamResponse``)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> list[tuple[str, str]]: ...

    @property
    def body(self) -> bytes: ...

    @property
    def backend(self) -> str: ...


class AppClient(Protocol):
    """Sends one HTTP request to some app node and returns its complete response."""

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> AppReply:
        """``path`` includes the query string. Raises the implementation's "unavailable" errors."""
        ...


@dataclass(frozen=True)
class AppResponse:
    """A plain :class:`AppReply`, for fakes and in-process clients."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    backend: str = ""
