"""The chaos proxy's HTTP admin API (what the control API forwards ``/v1/chaos/...`` to).

- ``GET    /healthz``                        200 once every link listens (or is down on purpose)
- ``GET    /metrics``                        bytes, connections, resets and toxics per link
- ``GET    /v1/links``                       ``{"links": [LINK, ...]}``
- ``GET    /v1/links/{name}``                one LINK
- ``POST   /v1/links/{name}/toxics``         ``{"type", "direction", "attributes"}`` -> 201 TOXIC
- ``DELETE /v1/links/{name}/toxics/{id}``    204
- ``DELETE /v1/links/{name}/toxics``         204: every toxic removed, the link healed

Errors have the project's shape: ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.blocks.chaos._errors import LinkNotFound, ToxicConfigError, ToxicNotFound
from photostack.blocks.chaos._proxy import ChaosProxy

__all__ = ["create_chaos_app"]


class _JSON(JSONResponse):
    media_type = "application/json; charset=utf-8"


def _error(status: int, code: str, message: str) -> Response:
    return _JSON({"error": {"code": code, "message": message}}, status_code=status)


def create_chaos_app(proxy: ChaosProxy) -> Starlette:
    """The admin app; its lifespan starts the proxy's links and closes them."""
    registry = CollectorRegistry()
    link_bytes = Gauge(
        "photostack_chaos_bytes",
        "Bytes forwarded per link and flow",
        ["link", "flow"],
        registry=registry,
    )
    link_conns = Gauge(
        "photostack_chaos_connections", "Open connections per link", ["link"], registry=registry
    )
    link_resets = Gauge(
        "photostack_chaos_resets", "Connections reset by a toxic", ["link"], registry=registry
    )
    link_toxics = Gauge(
        "photostack_chaos_toxics", "Active toxics per link", ["link"], registry=registry
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.aclose()

    async def healthz(_: Request) -> Response:
        waiting = [
            n
            for n, link in proxy.links.items()
            if not link.is_listening and not link.toxics.is_down
        ]
        if waiting:
            return _JSON({"status": "starting", "not_listening": waiting}, status_code=503)
        return _JSON({"status": "ok", "links": len(proxy.links)})

    async def metrics(_: Request) -> Response:
        for name, link in proxy.links.items():
            for flow, count in link.bytes_total.items():
                link_bytes.labels(name, flow.value).set(count)
            link_conns.labels(name).set(link.describe()["connections"])
            link_resets.labels(name).set(link.resets_total)
            link_toxics.labels(name).set(len(link.toxics))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def links(_: Request) -> Response:
        return _JSON({"links": [link.describe() for link in proxy.links.values()]})

    async def one_link(request: Request) -> Response:
        try:
            return _JSON(proxy.link(request.path_params["name"]).describe())
        except LinkNotFound as exc:
            return _error(404, "unknown_link", str(exc))

    async def add_toxic(request: Request) -> Response:
        try:
            link = proxy.link(request.path_params["name"])
            body = json.loads(await request.body() or b"null")
            toxic = await link.add_toxic(body)
        except LinkNotFound as exc:
            return _error(404, "unknown_link", str(exc))
        except ValueError as exc:  # ToxicConfigError, or JSON that does not parse
            code = "invalid_toxic" if isinstance(exc, ToxicConfigError) else "malformed_json"
            return _error(422 if code == "invalid_toxic" else 400, code, str(exc))
        return _JSON(toxic.to_json(), status_code=201)

    async def remove_toxic(request: Request) -> Response:
        try:
            link = proxy.link(request.path_params["name"])
            await link.remove_toxic(request.path_params["toxic_id"])
        except LinkNotFound as exc:
            return _error(404, "unknown_link", str(exc))
        except ToxicNotFound as exc:
            return _error(404, "unknown_toxic", str(exc))
        return Response(status_code=204)

    async def clear_toxics(request: Request) -> Response:
        try:
            await proxy.link(request.path_params["name"]).clear_toxics()
        except LinkNotFound as exc:
            return _error(404, "unknown_link", str(exc))
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            Route("/v1/links", links),
            Route("/v1/links/{name}", one_link),
            Route("/v1/links/{name}/toxics", add_toxic, methods=["POST"]),
            Route("/v1/links/{name}/toxics", clear_toxics, methods=["DELETE"]),
            Route("/v1/links/{name}/toxics/{toxic_id}", remove_toxic, methods=["DELETE"]),
        ],
        lifespan=lifespan,
    )
