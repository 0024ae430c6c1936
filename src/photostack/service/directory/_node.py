"""The directory node: serves the versioned shard map over HTTP (FastAPI on uvicorn).

- ``GET /v1/map`` -> 200 the current map (``ClusterMap.to_json``) | 503 before the first load
- ``GET /v1/map/version`` -> 200 ``{"version": N}`` (what clients poll; answered from memory)
- ``PUT /v1/map`` the next map -> 200 ``{"version": N}`` | 409 ``stale_version`` (a version not
  above the current one) | 422 ``invalid_map`` | 503 ``directory_storage_unavailable``
- ``GET /v1/directory-db`` -> 200 this node's view of the directory database (``_dirdb``: which
  member is primary, its generation, the members, the last failover decision) | 404 without a
  standby
- ``GET /healthz`` (200 once a map is loaded), ``GET /metrics``

Reads are served from memory, refreshed from the directory database every
``refresh_interval_s`` (the primary, or a replica when the primary is down), so a directory node
keeps answering through a database outage and two nodes converge within one interval. On its
first start a node stores ``initial_map`` when the database has no map yet (two nodes doing it at
once is safe: one advisory lock). The directory nodes fail that database over themselves
(``_dirdb``, docs/replication.md): writes go only to the member the current generation names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
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
from ._dirdb import DirdbConfig, DirectoryDatabase, FencedError, check_fence, claim_generation
from ._dirdb_policy import PeerView
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
    FencedError,
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
    # Failover of the directory database itself (``_dirdb``): the member names, in the order
    # of (primary_dsn, *replica_dsns), and the other directory nodes' ``host:port``. Without
    # member names the database is not failed over.
    members: tuple[str, ...] = ()
    peers: dict[str, str] = field(default_factory=dict)
    dirdb: dict[str, Any] | None = None  # DirdbConfig overrides

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
            members=tuple(raw.get("members", ())),
            peers=dict(raw.get("peers", {})),
            dirdb=raw.get("dirdb"),
        )


class DirectoryNode:
    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self.health = Health()
        self.registry = CollectorRegistry()
        self.map: ClusterMap | None = None
        self.source = "none"  # where the cached map was last read: primary | replica
        self._primary: Pool | None = None
        self._primary_dsn = settings.primary_dsn
        self._replicas: list[Pool] = []
        self._schema_ready = False
        self._loaded = asyncio.Event()
        # The failover coordinator (docs/replication.md); None when coordination is off.
        self.coordinator = coordinator_for(settings, lambda: self.map, self.install)
        self.dirdb = self._directory_database(settings)
        self.version_gauge = Gauge(
            "photostack_directory_map_version", "Version of the map served.", registry=self.registry
        )
        self.publishes = Counter(
            "photostack_directory_publishes",
            "PUT /v1/map answers, by result.",
            ["result"],
            registry=self.registry,
        )

    def _directory_database(self, settings: DirectorySettings) -> DirectoryDatabase | None:
        dsns = (settings.primary_dsn, *settings.replica_dsns)
        if len(settings.members) != len(dsns) or len(dsns) < 2:
            return None
        return DirectoryDatabase(
            settings.name,
            dict(zip(settings.members, dsns, strict=True)),
            settings.observers,
            fetch_view=self._peer_view,
            on_primary=self._primary_moved,
            config=DirdbConfig(**(settings.dirdb or {})),
        )

    async def _peer_view(self, node: str) -> PeerView | None:
        """Directory node ``node``'s view of the directory database (``GET /v1/directory-db``)."""
        address = self.settings.peers.get(node)
        if address is None:
            return None
        async with httpx.AsyncClient(timeout=1.0) as client:
            answer = await client.get(f"http://{address}/v1/directory-db")
        view = answer.json().get("view") if answer.status_code == 200 else None
        if view is None:
            return None
        view["sync_standbys"] = tuple(view["sync_standbys"])
        return PeerView(**view)

    async def _primary_moved(self, name: str, dsn: str, generation: int) -> None:
        """The directory database has a new primary: writes (this node's pool, the
        coordinator's lease and publishes) go there, fenced by its generation."""
        if self.coordinator is not None:
            self.coordinator.directory.retarget(dsn, (name, generation))
        if self._primary_dsn == dsn or self._primary is None:
            return
        old, self._primary = self._primary, await self._pool(dsn)
        self._primary_dsn = dsn
        old.terminate()

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
        watching = None
        if self.dirdb is not None:  # find the primary first: it may not be the topology's
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirdb.probe_once(), 5.0)
            self._primary_dsn = self.dirdb.dsn
            if self.coordinator is not None and self.dirdb.primary is not None:
                fence = (self.dirdb.primary, self.dirdb.generation)
                self.coordinator.directory.retarget(self._primary_dsn, fence)
            watching = asyncio.create_task(self.dirdb.run(), name=f"{self.settings.name}-dirdb")
        self._primary = await self._pool(self._primary_dsn)
        # reads fall back to any other member (an old primary comes back as a standby)
        others = list(self.dirdb.members.values()) if self.dirdb else []
        fallback = [d for d in others if d != self._primary_dsn] or self.settings.replica_dsns
        self._replicas = [await self._pool(d) for d in fallback]
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
            for background in (task, coordinating, watching):
                if background is not None:
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
            for pool in (self._primary, *self._replicas):
                try:
                    await asyncio.wait_for(pool.close(), 5.0)
                except TimeoutError:
                    pool.terminate()
            if self.dirdb is not None:
                await self.dirdb.aclose()

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
                    if self.dirdb is not None:  # first start: the topology's primary is gen 1
                        await claim_generation(conn, self.dirdb.primary or self.settings.members[0])
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
            if self.dirdb is None or self.dirdb.primary is None:
                await MapStore.publish(conn, proposed)
            else:  # only on the member the current generation names (the fence)
                async with conn.transaction():
                    await check_fence(conn, self.dirdb.primary, self.dirdb.generation)
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

    @app.get("/v1/directory-db")
    async def directory_db() -> Response:
        if node.dirdb is None:
            raise ApiError(404, "not_failed_over", "this directory database has no standby")
        return JsonResponse(node.dirdb.status())

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
