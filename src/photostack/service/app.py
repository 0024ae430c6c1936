"""The app node: domain logic for users and follows behind an internal HTTP/JSON API.

Internal API (JSON, errors in the public error shape, ``X-Served-By: <app name>`` on every
response):

- ``POST   /internal/v1/users`` ``{"username", "display_name"}`` -> 201 user | 409 username_taken
- ``GET    /internal/v1/users/{id}`` -> 200 user with counts | 404
- ``GET    /internal/v1/users/by-username/{username}`` -> 200 user with counts | 404
- ``PUT    /internal/v1/users/{id}/following/{target_id}`` -> 204 | 404 | 422 ``self_follow``
- ``DELETE /internal/v1/users/{id}/following/{target_id}`` -> 204
- ``GET    /internal/v1/users/{id}/following|followers?limit=&cursor=`` -> 200 page | 404
- photos (``_photos.py``) and internal-only user deletion and jobs (``_jobs.py``): see there
- ``GET /healthz`` (503 until every shard pool is up and its schema applied), ``GET /metrics``

The web node has authenticated and validated the request; this node checks again what it relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
from fastapi import FastAPI, Query, Request
from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response

from photostack.blocks.storage import ShardRouter

from ._caching import CachingConfig, ProductCache, cached_response
from ._codec import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    InvalidCursorError,
    InvalidInputError,
    decode_cursor,
    encode_cursor,
    parse_create_user,
)
from ._events import EventStore, add_internal_event_routes, event_store_for, trim_forever
from ._http import (
    ApiError,
    Health,
    HealthState,
    JsonResponse,
    NodeMiddleware,
    error_response,
    install_error_handlers,
    metrics_response,
)
from ._jobs import JobRunner, Jobs, add_internal_job_routes
from ._photos import PhotoStore, add_internal_photo_routes
from ._replication import Replication, ReplicationMiddleware, add_replication_handlers
from ._store import (
    EdgeKind,
    Page,
    SelfFollowError,
    UsernameTakenError,
    UserNotFoundError,
    UserStore,
)
from ._uploads_app import UploadService, add_internal_upload_routes
from .directory import (
    NO_GUARD,
    DirectoryClientConfig,
    HttpTransport,
    MapGuard,
    MapRouting,
    OwnershipGuard,
)
from .schema import GROUPS, apply_schema_on
from .settings import AppSettings

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = ["STORAGE_ERRORS", "connect_backoff_s", "create_app"]

log = logging.getLogger(__name__)

# Errors that mean "a database is unreachable or too slow right now": answered 503 + Retry-After.
STORAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.QueryCanceledError,
    asyncpg.exceptions.OperatorInterventionError,
)
_CONNECT_BACKOFF_MAX_S = 2.0
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


def connect_backoff_s(attempt: int) -> float:
    """Delay before connection attempt ``attempt`` (0-based): 0.05 s doubling, capped."""
    return float(min(_CONNECT_BACKOFF_MAX_S, 0.05 * (2**attempt)))


class AppNode:
    """One app node's runtime: shard pools, the domain store, health and metrics."""

    def __init__(self, settings: AppSettings) -> None:
        missing = [g for g in GROUPS if not settings.storage.get(g)]
        if missing:
            raise ValueError(f"settings.storage lacks shards for: {', '.join(missing)}")
        self.settings = settings
        self.registry = CollectorRegistry()
        self.health = Health()
        self.storage_errors = Counter(
            "photostack_storage_errors",
            "Requests answered 503 because a storage shard failed.",
            ["error"],
            registry=self.registry,
        )
        self._store: UserStore | None = None
        self._events: EventStore | None = None
        # cached read paths (docs/caching.md): local cache, ring over the cache nodes, bus
        self.cache = ProductCache(
            CachingConfig.from_dict(settings.caching),
            settings.cache_nodes,
            origin=settings.name,
            registry=self.registry,
        )
        self._photos: PhotoStore | None = None
        self._jobs: Jobs | None = None
        self._uploads: UploadService | None = None  # uploads, tasks, feed (docs/uploads.md)
        self.routing: MapRouting[Pool] | None = None  # set when the directory places storage
        # Read/write split, read-your-writes, CAP answers (docs/replication.md): with the map.
        self.replication = (
            Replication(settings.replication, self._open_replica, self.registry)
            if settings.directory_nodes
            else None
        )
        self._refreshing: asyncio.Task[bool] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pools: list[Pool] = []
        self._ready = asyncio.Event()

    @property
    def store(self) -> UserStore:
        """The domain store; raises ApiError 503 while the node is starting or draining."""
        if self._store is None or not self.health.is_ready:
            state = self.health.state.value
            raise ApiError(503, "app_unavailable", f"the app node is {state}", {"Retry-After": "1"})
        return self._store

    @property
    def events(self) -> EventStore:
        """The per-user event logs; 503 while starting or draining (like ``store``)."""
        if self._events is None or not self.health.is_ready:
            self.store  # noqa: B018 - raises the 503
        assert self._events is not None
        return self._events

    @property
    def photos(self) -> PhotoStore:
        """Photo metadata; 503 while starting or draining (like ``store``)."""
        if self._photos is None or not self.health.is_ready:
            self.store  # noqa: B018 - raises the 503
        assert self._photos is not None
        return self._photos

    @property
    def uploads(self) -> UploadService:
        """Uploads, tasks and the feed; 503 while starting or draining."""
        if self._uploads is None or not self.health.is_ready:
            self.store  # noqa: B018 - raises the 503
        assert self._uploads is not None
        return self._uploads

    @property
    def jobs(self) -> Jobs:
        """Cross-shard jobs and user deletion; 503 while starting or draining."""
        if self._jobs is None or not self.health.is_ready:
            self.store  # noqa: B018 - raises the 503
        assert self._jobs is not None
        return self._jobs

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        # Connect in the background so /healthz can answer 503 while the shards come up.
        task = asyncio.create_task(self._start(), name=f"{self.settings.name}-connect")
        try:
            yield
        finally:
            self.health.to(HealthState.DRAINING)
            for background in (task, *self._tasks):
                background.cancel()
            await asyncio.gather(task, *self._tasks, return_exceptions=True)
            if self.routing is not None:
                await self.routing.aclose()
            await asyncio.gather(*(self._close_pool(p) for p in self._pools))
            if self._events is not None:
                await self._events.aclose()
            if self._uploads is not None:
                await self._uploads.aclose()
            await self.cache.aclose()

    async def _connect_storage(self) -> tuple[ShardRouter[Pool], OwnershipGuard]:
        """The router: the directory's map when there are directory nodes, else static."""
        s = self.settings
        if s.directory_nodes:
            self.routing = MapRouting(
                s.directory_nodes,
                HttpTransport(),
                self._open_shard,
                DirectoryClientConfig(poll_interval_s=s.directory_poll_s),
                on_install=self.replication.install if self.replication else None,
            )
            router = await self.routing.start()
            self._tasks.append(asyncio.create_task(self.routing.poll_forever()))
            if self.replication is not None:
                await self.replication.sample_once()
                self._tasks.append(asyncio.create_task(self.replication.sample_forever()))
            return router, MapGuard(self.routing.current, self.routing.refresh)
        groups: dict[str, list[Pool]] = {}
        for group in GROUPS:
            groups[group] = list(
                await asyncio.gather(
                    *(self._open_shard(group, d.primary) for d in s.storage[group])
                )
            )
        return ShardRouter(groups), NO_GUARD

    async def _start(self) -> None:
        router, guard = await self._connect_storage()
        self._events = event_store_for(self.settings, router, guard)  # appends fenced
        reads = self.replication.router if self.replication is not None else None
        self._store = UserStore(router, self._events, reads=reads, guard=guard)
        invalidate = self.cache.invalidate  # writes outside the cached paths drop their keys
        self._photos = PhotoStore(
            router,
            static_base_url=self.settings.static_base_url,
            guard=guard,
            invalidate=invalidate,
            reads=reads,
        )
        self._jobs = Jobs(router, guard=guard, invalidate=invalidate)
        self._uploads = UploadService.for_app(self.settings, router, self._photos, self._events)
        self._uploads.start()  # connects to the queue database in the background
        await self.cache.start()  # subscribed to invalidations before serving reads
        self.health.to(HealthState.READY)
        self._ready.set()
        log.info("%s ready: %s", self.settings.name, self._store)
        if self.settings.jobs_enabled:
            runner = JobRunner(self._jobs, STORAGE_ERRORS)
            self._tasks.append(asyncio.create_task(runner.run_forever()))
        await trim_forever(self._events, self.settings.events_trim_interval_s, STORAGE_ERRORS)

    async def _open_shard(self, group: str, dsn: str) -> Pool:
        s = self.settings
        attempt = 0
        while True:
            pool: Pool | None = None
            try:
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=s.pool_min_size,
                    max_size=s.pool_max_size,
                    command_timeout=s.statement_timeout_ms / 1000 + 1.0,
                    server_settings={
                        "statement_timeout": str(s.statement_timeout_ms),
                        "application_name": f"photostack-{s.name}",
                    },
                    setup=self.replication.note_acquire(dsn) if self.replication else None,
                )
                async with pool.acquire() as conn:
                    await apply_schema_on(conn, group)  # idempotent; the cluster may have done it
            except BaseException as exc:
                if pool is not None:
                    pool.terminate()
                if not isinstance(exc, STORAGE_ERRORS):
                    raise
                delay = connect_backoff_s(attempt)
                log.warning(
                    "%s: %s shard not reachable (%r); retry in %.2fs", s.name, group, exc, delay
                )
                attempt += 1
                await asyncio.sleep(delay)
            else:
                self._pools.append(pool)
                return pool

    async def _open_replica(self, group: str, dsn: str) -> Pool:
        """A small pool to a replica (no schema: it is read-only); opened lazily by asyncpg."""
        s = self.settings
        pool = asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=s.pool_max_size,
            timeout=1.0,
            command_timeout=s.statement_timeout_ms / 1000 + 1.0,
            server_settings={
                "statement_timeout": str(s.statement_timeout_ms),
                "application_name": f"photostack-{s.name}",
            },
        )
        await pool  # min_size=0: no connection is made yet, a dead replica does not block
        self._pools.append(pool)
        return pool

    def refresh_map_soon(self) -> None:
        """A primary refused or failed: ask the directory for a newer map now (one at a time)."""
        if self.routing is None or (self._refreshing is not None and not self._refreshing.done()):
            return
        self._refreshing = asyncio.create_task(self.routing.refresh(0))
        self._refreshing.add_done_callback(lambda t: t.cancelled() or t.exception())

    @staticmethod
    async def _close_pool(pool: Pool) -> None:
        try:
            await asyncio.wait_for(pool.close(), timeout=5.0)
        except TimeoutError:
            pool.terminate()


def _page_json(page: Page) -> dict[str, Any]:
    cursor = encode_cursor(page.next_cursor) if page.next_cursor is not None else None
    return {"items": page.items, "next_cursor": cursor}


def create_app(settings: AppSettings) -> FastAPI:
    """The app node's ASGI application. Raises ValueError when a storage group is missing."""
    node = AppNode(settings)
    app = FastAPI(
        title=f"photostack app node {settings.name}",
        lifespan=node.lifespan,
        default_response_class=JsonResponse,
    )
    app.state.node = node
    install_error_handlers(app)
    app.add_middleware(NodeMiddleware, node_name=settings.name, registry=node.registry)

    async def on_storage_error(_: Request, exc: Exception) -> Response:
        node.storage_errors.labels(type(exc).__name__).inc()
        node.refresh_map_soon()  # a dead primary: a failover may have moved it
        log.warning("storage error: %r", exc)
        return error_response(
            503, "storage_unavailable", "a storage shard is unavailable", {"Retry-After": "1"}
        )

    for error in STORAGE_ERRORS:
        app.add_exception_handler(error, on_storage_error)
    add_replication_handlers(app, node.storage_errors, node.refresh_map_soon)
    if node.replication is not None:
        app.add_middleware(ReplicationMiddleware, replication=node.replication)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return node.health.response()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return metrics_response(node.registry)

    _add_user_routes(app, node)
    _add_follow_routes(app, node)
    add_internal_event_routes(app, lambda: node.events)
    # before the photo routes: its DELETE extends theirs with the cleanup task
    add_internal_upload_routes(app, lambda: node.uploads, lambda: node.events)
    add_internal_photo_routes(app, lambda: node.photos, node.cache)
    add_internal_job_routes(app, lambda: node.jobs)
    return app


def _add_user_routes(app: FastAPI, node: AppNode) -> None:
    @app.post("/internal/v1/users", status_code=201)
    async def create_user(request: Request) -> Response:
        try:
            payload = parse_create_user(json.loads(await request.body()))
        except json.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from exc
        except InvalidInputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from exc
        try:
            user = await node.store.create_user(payload.username, payload.display_name)
        except UsernameTakenError as exc:
            raise ApiError(409, "username_taken", "that username is taken") from exc
        await node.cache.after_create(user)
        return JsonResponse(user, status_code=201)

    @app.get("/internal/v1/users/by-username/{username}")
    async def get_by_username(username: str) -> Response:
        body, hit = await node.cache.user_by_username(node.store, username)
        if body is None:
            raise ApiError(404, "user_not_found", "no such user")
        return cached_response(body, hit)

    @app.get("/internal/v1/users/{user_id}")
    async def get_user(user_id: str) -> Response:
        body, hit = await node.cache.user(node.store, user_id)
        if body is None:
            raise ApiError(404, "user_not_found", "no such user")
        return cached_response(body, hit)


def _add_follow_routes(app: FastAPI, node: AppNode) -> None:
    @app.put("/internal/v1/users/{user_id}/following/{target_id}", status_code=204)
    async def follow(user_id: str, target_id: str) -> Response:
        try:
            await node.store.follow(user_id, target_id)
        except SelfFollowError as exc:
            raise ApiError(422, "self_follow", "a user cannot follow themselves") from exc
        except UserNotFoundError as exc:
            raise ApiError(404, "user_not_found", "no such user") from exc
        await node.cache.after_follow_change(node.store, user_id, target_id)
        return Response(status_code=204)

    @app.delete("/internal/v1/users/{user_id}/following/{target_id}", status_code=204)
    async def unfollow(user_id: str, target_id: str) -> Response:
        await node.store.unfollow(user_id, target_id)
        await node.cache.after_follow_change(node.store, user_id, target_id)
        return Response(status_code=204)

    async def list_edges(kind: EdgeKind, user_id: str, limit: int, cursor: str | None) -> Response:
        try:
            after = decode_cursor(cursor) if cursor is not None else None
        except InvalidCursorError as exc:
            raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from exc
        cached = None
        if after is None:  # the first page is cached (at the default size)
            cached = await node.cache.edges(node.store, kind, user_id, limit)
        if cached is not None:
            body, hit = cached
            if body is None:
                raise ApiError(404, "user_not_found", "no such user")
            return cached_response(body, hit)
        try:
            page = await node.store.list_edges(kind, user_id, limit, after)
        except UserNotFoundError as exc:
            raise ApiError(404, "user_not_found", "no such user") from exc
        return JsonResponse(_page_json(page))

    @app.get("/internal/v1/users/{user_id}/following")
    async def following(
        user_id: str, limit: LimitParam = DEFAULT_LIMIT, cursor: str | None = None
    ) -> Response:
        return await list_edges(EdgeKind.FOLLOWING, user_id, limit, cursor)

    @app.get("/internal/v1/users/{user_id}/followers")
    async def followers(
        user_id: str, limit: LimitParam = DEFAULT_LIMIT, cursor: str | None = None
    ) -> Response:
        return await list_edges(EdgeKind.FOLLOWERS, user_id, limit, cursor)
