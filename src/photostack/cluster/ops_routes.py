"""Control API routes that reach into the product through its internal APIs.

- ``POST   /v1/jobs/{name}/run`` -> an app node's ``POST /internal/v1/jobs/{name}/run``
- ``DELETE /v1/users/{id}`` -> an app node's ``DELETE /internal/v1/users/{id}`` (no public route
  deletes a user; API.md has none)
- ``GET    /v1/directory/map`` -> a directory node's ``GET /v1/map``
- ``GET    /v1/chaos/links[/{name}]``, ``POST /v1/chaos/links/{name}/toxics``,
  ``DELETE /v1/chaos/links/{name}/toxics[/{id}]`` -> the chaos node's ``/v1/links...``
  (docs/chaos.md); 404 ``chaos_disabled`` when the topology has no ``[chaos]`` links

Each tries the ready nodes of the role in turn and relays the first answer (status and body).
"""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.cluster.state import NodeState
from photostack.cluster.supervisor import Supervisor
from photostack.cluster.topology import Role

__all__ = ["ops_routes"]

_JOB_TIMEOUT_S = 300.0
_TIMEOUT_S = 10.0


class _JSON(JSONResponse):
    media_type = "application/json; charset=utf-8"


def ops_routes(supervisor: Supervisor) -> list[Route]:
    async def forward(role: Role, method: str, path: str, timeout_s: float) -> Response:
        ready = [
            n
            for n in supervisor.nodes.values()
            if n.spec.role is role and n.lifecycle.state is NodeState.READY
        ]
        errors = []
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            for node in ready:
                url = f"http://{node.spec.address}{path}"
                try:
                    answer = await client.request(method, url)
                except httpx.HTTPError as exc:
                    errors.append(f"{node.name}: {type(exc).__name__}")
                    continue
                body: Any = answer.json() if answer.content else None
                return _JSON(body, status_code=answer.status_code)
        reason = "; ".join(errors) or f"no {role.value} node is ready"
        return _JSON(
            {"error": {"code": "unavailable", "message": reason}},
            status_code=503,
        )

    async def run_job(request: Request) -> Response:
        name = request.path_params["name"]
        return await forward(Role.APP, "POST", f"/internal/v1/jobs/{name}/run", _JOB_TIMEOUT_S)

    async def delete_user(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        return await forward(Role.APP, "DELETE", f"/internal/v1/users/{user_id}", _TIMEOUT_S)

    async def directory_map(request: Request) -> Response:
        return await forward(Role.DIRECTORY, "GET", "/v1/map", _TIMEOUT_S)

    return [
        Route("/v1/jobs/{name}/run", run_job, methods=["POST"]),
        Route("/v1/users/{user_id}", delete_user, methods=["DELETE"]),
        Route("/v1/directory/map", directory_map),
        *_chaos_routes(supervisor),
    ]


def _chaos_routes(supervisor: Supervisor) -> list[Route]:
    """The chaos node's admin API under ``/v1/chaos``, relayed with bodies and status codes."""

    async def relay(request: Request) -> Response:
        nodes = [n for n in supervisor.nodes.values() if n.spec.role is Role.CHAOS]
        if not nodes:
            message = "this topology has no [chaos] links (see docs/chaos.md)"
            return _JSON({"error": {"code": "chaos_disabled", "message": message}}, 404)
        node = nodes[0]
        if node.lifecycle.state is not NodeState.READY:
            message = f"{node.name} is {node.lifecycle.state}"
            return _JSON({"error": {"code": "unavailable", "message": message}}, 503)
        path = request.url.path.removeprefix("/v1/chaos")
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
                answer = await client.request(
                    request.method,
                    f"http://{node.spec.address}/v1{path}",
                    content=await request.body(),
                    headers={"content-type": "application/json"},
                )
        except httpx.HTTPError as exc:
            message = f"{node.name}: {type(exc).__name__}"
            return _JSON({"error": {"code": "unavailable", "message": message}}, 503)
        if answer.status_code == 204:
            return Response(status_code=204)
        return _JSON(answer.json(), status_code=answer.status_code)

    return [
        Route("/v1/chaos/links", relay),
        Route("/v1/chaos/links/{name}", relay),
        Route("/v1/chaos/links/{name}/toxics", relay, methods=["POST", "DELETE"]),
        Route("/v1/chaos/links/{name}/toxics/{toxic_id}", relay, methods=["DELETE"]),
    ]
