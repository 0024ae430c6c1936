"""Fakes and helpers for testing the web and app nodes in one process, without sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx
from starlette.types import ASGIApp

from ._appclient import AppResponse

__all__ = [
    "ASGIAppClient",
    "AppUnavailableError",
    "RecordedRequest",
    "ScriptedAppClient",
    "running",
]


class AppUnavailableError(Exception):
    """Raised by the fakes when the app tier is switched off (pass it as ``unavailable_errors``)."""


class ASGIAppClient:
    """An :class:`~photostack.service.web.AppClient` that calls an app node's ASGI app in-process.

    ``available = False`` makes every request raise AppUnavailableError, like a dead app tier.
    """

    def __init__(self, app: ASGIApp, backend: str = "app-test") -> None:
        self.available = True
        self._backend = backend
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://app.internal"
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> AppResponse:
        if not self.available:
            raise AppUnavailableError(f"{self._backend} is down")
        response = await self._client.request(
            method, path, headers=list(headers), content=body, timeout=timeout_s
        )
        return AppResponse(
            status=response.status_code,
            headers=list(response.headers.multi_items()),
            body=response.content,
            backend=self._backend,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass
class ScriptedAppClient:
    """Answers every request with ``respond(request)`` and records what it was asked."""

    respond: Callable[[RecordedRequest], AppResponse | BaseException]
    requests: list[RecordedRequest] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> AppResponse:
        recorded = RecordedRequest(method, path, tuple(headers), body)
        self.requests.append(recorded)
        answer = self.respond(recorded)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@contextlib.asynccontextmanager
async def running(app: ASGIApp, *, ready_timeout_s: float = 30.0) -> AsyncIterator[ASGIApp]:
    """Run ``app``'s lifespan around the block; for an app node, wait until it is ready.

    Raises TimeoutError when the node does not become ready in time.
    """
    router = getattr(app, "router", None)
    if router is None:
        raise TypeError("running() needs a Starlette/FastAPI application")
    async with router.lifespan_context(app):
        node = getattr(getattr(app, "state", None), "node", None)
        wait_ready = getattr(node, "wait_ready", None)
        if wait_ready is not None:
            await asyncio.wait_for(wait_ready(), ready_timeout_s)
        yield app
