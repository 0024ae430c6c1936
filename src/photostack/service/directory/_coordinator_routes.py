"""The coordinator's HTTP face on a directory node.

- ``GET  /v1/coordinator`` -> 200 this node's view: leader or not, the leader's name and term,
  per replicated shard its primary, epoch, replication mode, CAP choice, phase, votes and replica
  lag (the leader's view is the complete one), and the last failovers
- ``POST /v1/coordinator/failover/{shard}`` -> 200 the failover record (planned switchover, run by
  the leader, whichever node is asked) | 404 ``unknown_shard`` | 409 ``failover_refused`` |
  503 ``coordinator_unavailable``
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
from fastapi import FastAPI
from starlette.responses import Response

from photostack.service._http import ApiError, JsonResponse

from ._coordinator import Coordinator, FailoverError, GroupRule
from ._coordinator_policy import CoordinatorConfig
from ._map import ClusterMap

__all__ = ["add_coordinator_routes", "coordinator_for"]


def coordinator_for(
    settings: Any,
    current_map: Callable[[], ClusterMap | None],
    install: Callable[[ClusterMap], None],
) -> Coordinator | None:
    """The node's coordinator from its DirectorySettings, or None when coordination is off."""
    if not settings.coordinate or not settings.replication:
        return None
    rules = {g: GroupRule.from_json(raw) for g, raw in settings.replication.items()}
    config = CoordinatorConfig(**(settings.coordinator or {}))
    return Coordinator(
        settings.name,
        settings.primary_dsn,
        rules=rules,
        observers=settings.observers or (settings.name,),
        current_map=current_map,
        install=install,
        config=config,
    )


def add_coordinator_routes(app: FastAPI, get: Callable[[], Coordinator | None]) -> None:
    def coordinator() -> Coordinator:
        found = get()
        if found is None:
            raise ApiError(503, "coordinator_unavailable", "this node runs no coordinator")
        return found

    @app.get("/v1/coordinator")
    async def state() -> Response:
        node = coordinator()
        body = node.state()
        body["failovers"] = []
        with contextlib.suppress(
            OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
        ):
            body["failovers"] = await node.history()
        return JsonResponse(body, headers={"Cache-Control": "no-store"})

    @app.post("/v1/coordinator/failover/{shard}")
    async def failover(shard: str) -> Response:
        node = coordinator()
        try:
            record = await node.request_failover(shard)
        except FailoverError as exc:
            status, code = (
                (404, "unknown_shard")
                if "no replicated shard" in str(exc)
                else (
                    503,
                    "coordinator_unavailable",
                )
            )
            raise ApiError(status, code, str(exc), {"Retry-After": "1"}) from exc
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ApiError(
                503, "coordinator_unavailable", "the directory database is unavailable"
            ) from exc
        if record.get("result") != "done":
            raise ApiError(409, "failover_refused", str(record.get("reason") or "refused"))
        return JsonResponse(record)
