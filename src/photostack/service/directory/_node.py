"""The directory node: serves the versioned shard map over HTTP (FastAPI on uvicorn).

- ``GET /v1/map`` -> 200 the current map (``ClusterMap.to_json``) | 503 before the first load
- ``GET /v1/map/version`` -> 200 ``{"version": N}`` (what clients poll; answered from memory)
- ``PUT /v1/map`` the next map -> 200 ``{"version": N}`` | 409 ``stale_version`` (a version not
  above the current one) | 422 ``invalid_map`` | 503 ``directory_storage_unavailable``
- ``GET /healthz`` (200 once a map is loaded), ``GET /metrics``

Reads are served from memory, refreshed from the directory database every
``refresh_interval_s`` (the primary, or a replica when the primary is down), so a directory node
keeps answering through a database outage and two nodes converge within one interval. On its
first start a node stores ``initial_map`` when the database has no map yet (two nodes doing it at
once is safe: one advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.responses import Response

from photostack.service._http import (
    ApiError,
    Health,
    HealthState,
    JsonResponse,
    NodeMiddleware,
    install_error_handlers,
    metrics_response,
)

from ._coordinator_routes import add_coordinator_routes, coordinator_for
from ._errors import MapFormatError, StaleMapError
from ._map import ClusterMap, with_addresses_of
from ._mapstore import MapStore, apply_directory_schema

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = ["DirectorySettings", "create_directory_app"]

log = logging.getLogger(__name__)

_DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.QueryCanceledError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)

_SYNC_ERRORS: tuple[type[Exception], ...] = (*_DB_ERRORS, MapFormatError, asyncpg.PostgresError)


@dataclass(frozen=True)
class DirectorySettings:
    name: str
    primary_dsn: str
    replica_dsns: tuple[str, ...] = ()
    initial_map: dict[str, Any] | None = None  # ClusterMap JSON, stored when there is none
    refresh_interval_s: float = 0.5
    statement_timeout_ms: int = 2000
    # The failover coordinator (docs/replication.md): per-group replication rules, the names of
    # every directory node (the observers), CoordinatorConfig overrides; coordinate=False: off.
    replication: dict[str, Any] | None = None
    observers: tuple[str, ...] = ()
    coordinator: dict[str, Any] | None = None
    coordinate: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DirectorySettings:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            name=raw["name"],
            primary_dsn=raw["primary_dsn"],
            replica_dsns=tuple(raw.get("replica_dsns", ())),
            initial_map=raw.get("initial_map"),
            refresh_interval_s=raw.get("refresh_interval_s", 0.5),
            statement_timeout_ms=raw.get("statement_timeout_ms", 2000),
            replication=raw.get("replication"),
            observers=tuple(raw.get("observers", ())),
            coordinator=raw.get("coordinator"),
            coordinate=raw.get("coordinate", True),
        )


class DirectoryNode:
    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self.health = Health()
        self.registry = CollectorRegistry()
        self.map: ClusterMap | None = None
        self.source = "none"  # where the cached map was last read: primary | replica
        self._primary: Pool | None = None
        self._replicas: list[Pool] = []
        self._schema_ready = False
        self._loaded = asyncio.Event()
        # The failover coordinator (docs/replication.md); None when coordination is off.
        self.coordinator = coordinator_for(settings, lambda: self.map, self.install)
        self.version_gauge = Gauge(
            "photostack_directory_map_version", "Version of the map served.", registry=self.registry
        )
        self.publishes = Counter(
            "photostack_directory_publishes",
            "PUT /v1/map answers, by result.",
            ["result"],
            registry=self.registry,
        )

    async def wait_ready(self) -> None:
        await self._loaded.wait()

    def _pool(self, dsn: str) -> Any:
        timeout = self.settings.statement_timeout_ms
        return asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=2,
            timeout=timeout / 1000,
            command_timeout=timeout / 1000 + 0.5,
            server_settings={
                "statement_timeout": str(timeout),
                "application_name": f"photostack-{self.settings.name}",
            },
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self._primary = await self._pool(self.settings.primary_dsn)
        self._replicas = [await self._pool(d) for d in self.settings.replica_dsns]
        task = asyncio.create_task(self._sync_forever(), name=f"{self.settings.name}-sync")
        coordinating = (
            asyncio.create_task(self.coordinator.run(), name=f"{self.settings.name}-coordinator")
            if self.coordinator is not None
            else None
        )
        try:
            yield
        finally:
            self.health.to(HealthState.DRAINING)
            for background in (task, coordinating):
                if background is not None:
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
            for pool in (self._primary, *self._replicas):
                try:
                    await asyncio.wait_for(pool.close(), 5.0)
                except TimeoutError:
                    pool.terminate()

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except _SYNC_ERRORS as exc:
                log.warning("%s: map refresh failed: %r", self.settings.name, exc)
            await asyncio.sleep(self.settings.refresh_interval_s)

    async def sync_once(self) -> None:
        """Refresh the cached map from the primary, or else from a replica."""
        assert self._primary is not None
        try:
            async with self._primary.acquire() as conn:
                if not self._schema_ready:
                    await apply_directory_schema(conn)
                    initial = self.settings.initial_map
                    if initial is not None:
                        await self._initialise(conn, ClusterMap.from_json(initial))
                    self._schema_ready = True
                await self._refresh_from(conn, "primary")
            return
        except _DB_ERRORS:
            if not self._replicas:
                raise
        last: Exception | None = None
        for pool in self._replicas:  # primary down: read what the standby has replayed
            try:
                async with pool.acquire() as conn:
                    await self._refresh_from(conn, "replica")
                return
            except _DB_ERRORS as exc:
                last = exc
            except asyncpg.UndefinedTableError as exc:  # a standby of a brand-new primary
                last = exc
        assert last is not None
        raise last

    async def _initialise(self, conn: Any, layout_map: ClusterMap) -> None:
        """First start: store the topology's map. Later starts: keep the stored placement but
        take the layout's addresses (a restart on another port base)."""
        current = await MapStore.initialise(conn, layout_map)
        update = with_addresses_of(current, layout_map)
        if update is not None:
            with contextlib.suppress(StaleMapError):  # the other directory node did it first
                await MapStore.publish(conn, update)
                log.info("%s: addresses changed, map v%d", self.settings.name, update.version)

    async def _refresh_from(self, conn: Any, source: str) -> None:
        version = await MapStore.current_version(conn)
        if version > (self.map.version if self.map else 0):
            fresh = await MapStore.current(conn)
            if fresh is not None:
                self.install(fresh)
        self.source = source

    def install(self, new: ClusterMap) -> None:
        if self.map is not None and new.version <= self.map.version:
            return
        self.map = new
        self.version_gauge.set(new.version)
        if not self._loaded.is_set():
            self._loaded.set()
            self.health.to(HealthState.READY)
        log.info("%s serves shard map version %d", self.settings.name, new.version)

    def current(self) -> ClusterMap:
        if self.map is None:
            raise ApiError(503, "map_unavailable", "no shard map loaded yet", {"Retry-After": "1"})
        return self.map

    async def publish(self, proposed: ClusterMap) -> None:
        assert self._primary is not None
        async with self._primary.acquire() as conn:
            await MapStore.publish(conn, proposed)
        self.install(proposed)


def create_directory_app(settings: DirectorySettings) -> FastAPI:
    node = DirectoryNode(settings)
    app = FastAPI(
        title=f"photostack directory node {settings.name}",
        lifespan=node.lifespan,
        default_response_class=JsonResponse,
    )
    app.state.node = node
    install_error_handlers(app)
    app.add_middleware(NodeMiddleware, node_name=settings.name, registry=node.registry)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return node.health.response()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response(node.registry)

    @app.get("/v1/map")
    async def get_map() -> Response:
        current = node.current()
        return JsonResponse(current.to_json(), headers={"ETag": f'"{current.version}"'})

    @app.get("/v1/map/version")
    async def get_version() -> Response:
        return JsonResponse({"version": node.current().version, "source": node.source})

    add_coordinator_routes(app, lambda: node.coordinator)

    @app.put("/v1/map")
    async def put_map(request: Request) -> Response:
        try:
            proposed = ClusterMap.from_json(json.loads(await request.body()))
        except json.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from exc
        except MapFormatError as exc:
            node.publishes.labels("invalid").inc()
            raise ApiError(422, "invalid_map", str(exc)) from exc
        try:
            await node.publish(proposed)
        except StaleMapError as exc:
            node.publishes.labels("stale").inc()
            raise ApiError(409, "stale_version", str(exc)) from exc
        except _DB_ERRORS as exc:
            node.publishes.labels("unavailable").inc()
            raise ApiError(
                503,
                "directory_storage_unavailable",
                "the directory database primary is unavailable",
                {"Retry-After": "1"},
            ) from exc
        node.publishes.labels("ok").inc()
        return JsonResponse({"version": proposed.version})

    return app
