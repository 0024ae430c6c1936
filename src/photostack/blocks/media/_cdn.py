"""The CDN edge: a caching reverse proxy for ``/media/{key}`` in front of the media origins.

- Cache: ``CdnCache`` in memory, bounded in bytes (LRU). A hit is answered synchronously from
  the parser callback with one prebuilt buffer (``X-Cache: HIT``, ``X-Cache-Tier: memory``);
  If-None-Match (304) and a single Range (206) are answered from the cached copy too.
- Disk tier (``DiskTier``, when ``disk_root`` is set): every stored object is also written to
  files under the node's data dir (write-through, in a thread), LRU by bytes, re-indexed at
  start. A memory miss that the disk holds is read back (``X-Cache: HIT``, ``X-Cache-Tier:
  disk``) and promoted to memory when it fits there; objects over the memory tier's per-object
  limit live on disk only.
- Misses are collapsed (``Flights``): concurrent misses for one key make one origin fetch.
- Failover: origins are tried in a per-key order; one in its failure cool-down is skipped, a
  failure or a 404 falls through to the next (a copy may be missing on one origin); 404 only
  when an origin said 404 and none had it, 502/503 when none answered. The body must hash to
  its key (content addresses), else the copy is treated as damaged and the next origin tried.
- Stale-while-revalidate: past max-age but inside the response's ``stale-while-revalidate``
  window, the cached copy is served (``X-Cache: STALE``) while one background request
  revalidates it (If-None-Match: 304 renews it, 404 drops it). On origin failure an expired
  copy is still served inside its ``stale-if-error`` window.
- Purge: ``PURGE /media/{key}`` on a second, internal listener (never the public port).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from photostack.blocks.balancer import BalancerError
from photostack.blocks.cache import PolicyName
from photostack.blocks.media._cdn_cache import CachedObject, CacheState, CdnCache
from photostack.blocks.media._cdn_disk import DiskTier, DiskTierConfig
from photostack.blocks.media._flights import Flights
from photostack.blocks.media._http import (
    Connection,
    HttpLimits,
    HttpServer,
    Request,
    error_response,
    json_response,
    response_head,
    simple_response,
)
from photostack.blocks.media._keys import is_valid_key
from photostack.blocks.media._metrics import CONTENT_TYPE, Counters
from photostack.blocks.media._origins import Fetched, Origin, OriginSet
from photostack.blocks.media._rules import parse_cache_control, select

__all__ = ["CdnConfig", "CdnServer", "FetchOutcome"]

_MEDIA = "/media/"
_JSON = "application/json; charset=utf-8"
_HEALTH = b'{"status":"ok"}'


@dataclass(frozen=True)
class CdnConfig:
    """One CDN edge. Sizes in bytes, times in seconds."""

    origins: tuple[Origin, ...]
    name: str = "cdn-1"
    host: str = "127.0.0.1"
    port: int = 0
    purge_port: int | None = 0  # internal PURGE listener (0: any free port, None: none)
    cache_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = 16 * 1024 * 1024  # larger objects skip memory (disk, or relayed)
    max_object_bytes: int = 64 * 1024 * 1024  # larger objects are refused (502)
    disk_root: Path | None = None  # the disk tier's directory; None: memory only
    disk_cache_bytes: int = 1024 * 1024 * 1024
    disk_max_entry_bytes: int = 64 * 1024 * 1024
    policy: PolicyName = PolicyName.LRU
    origin_timeout_s: float = 10.0
    origin_cooldown_s: float = 1.0
    limits: HttpLimits = field(default_factory=lambda: HttpLimits(max_body_bytes=0))


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """What the origins said: an object, or "not_found", or "failed"."""

    obj: CachedObject | None
    status: str  # "ok" | "not_modified" | "stale" | "not_found" | "failed"
    stored: bool = False
    tier: str = "origin"  # where obj came from: "origin" or "disk"


_FAILED = FetchOutcome(None, "failed")
_NOT_FOUND = FetchOutcome(None, "not_found")


class CdnServer:
    """``await start()``, ``port``, ``purge_port``, ``await aclose()``."""

    def __init__(self, config: CdnConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self._clock = clock
        self.origins = OriginSet(
            config.origins,
            timeout_s=config.origin_timeout_s,
            cooldown_s=config.origin_cooldown_s,
        )
        self.cache: CdnCache | None = None
        self.disk: DiskTier | None = None
        self.flights: Flights[FetchOutcome] = Flights()
        self.counters = Counters("photostack_cdn")
        for name, text in (
            ("requests", "Media requests by cache result (hit, miss, stale)"),
            ("origin_fetches", "Requests sent to each origin"),
            ("origin_failures", "Origin requests that failed (error, timeout, 5xx)"),
            ("purges", "Purge requests"),
        ):
            self.counters.describe(name, text)
        self._handler = _CdnHandler(self)
        self._server = HttpServer(self._handler, config.limits)
        self._purge_server: HttpServer | None = None
        self._background: set[asyncio.Task[FetchOutcome]] = set()

    def __repr__(self) -> str:
        return f"<CdnServer {self.config.name} {self.config.host}:{self.port}>"

    @property
    def port(self) -> int:
        return self._server.port or self.config.port

    @property
    def purge_port(self) -> int | None:
        if self._purge_server is not None and self._purge_server.port:
            return self._purge_server.port
        return self.config.purge_port

    def now(self) -> float:
        return self._clock() if self._clock is not None else self._server.loop.time()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        clock = self._clock or loop.time
        self.cache = CdnCache(
            cfg.cache_bytes, max_entry_bytes=cfg.max_entry_bytes, policy=cfg.policy, clock=clock
        )
        stats = self.cache.stats
        self.counters.gauge("cache_bytes", "Bytes held by the cache", lambda: stats().bytes_used)
        self.counters.gauge("cache_entries", "Objects held by the cache", lambda: stats().entries)
        self.counters.gauge("cache_evictions", "Objects evicted", lambda: stats().evictions)
        self.counters.gauge("collapsed", "Requests that waited on another's fetch",
                            lambda: self.flights.joined)  # fmt: skip
        if cfg.disk_root is not None:
            disk = DiskTier(
                DiskTierConfig(cfg.disk_root, cfg.disk_cache_bytes, cfg.disk_max_entry_bytes),
                clock=clock,
            )
            await disk.start()
            self.disk = disk
            for name, text, read in (
                ("disk_bytes", "Bytes held by the disk tier", lambda: disk.stats().bytes_used),
                ("disk_entries", "Objects held by the disk tier", lambda: disk.stats().entries),
                ("disk_evictions", "Objects evicted from disk", lambda: disk.stats().evictions),
                ("disk_writes", "Objects written to disk", lambda: disk.stats().writes),
                ("disk_errors", "Disk writes failed or damaged files dropped",
                 lambda: disk.stats().errors),
            ):  # fmt: skip
                self.counters.gauge(name, text, read)
        await self._server.start(cfg.host, cfg.port)
        if cfg.purge_port is not None:
            self._purge_server = HttpServer(_PurgeHandler(self), HttpLimits(max_body_bytes=0))
            try:
                await self._purge_server.start(cfg.host, cfg.purge_port)
            except BaseException:
                await self._server.aclose()
                raise

    async def aclose(self) -> None:
        await self._server.aclose()
        if self._purge_server is not None:
            await self._purge_server.aclose()
        self.flights.cancel_all()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.origins.aclose()
        if self.disk is not None:
            await self.disk.aclose()

    # -- cache operations --------------------------------------------------------------------

    def purge(self, key: str) -> bool:
        """Drop ``key`` from both tiers (and from a fetch in flight); True when held."""
        assert self.cache is not None
        self.counters.inc("purges")
        self.flights.mark_purged(key)
        on_disk = self.disk.purge(key) if self.disk is not None else False
        return self.cache.purge(key) or on_disk

    def fetch(self, key: str) -> asyncio.Task[FetchOutcome]:
        """The collapsed fetch of ``key`` (joining one in flight)."""
        return self.flights.run(key, lambda: self._fetch_and_store(key, None))

    def revalidate(self, key: str, stale: CachedObject) -> None:
        """Refresh a stale entry in the background, unless a fetch is in flight already."""
        if key in self.flights:
            return
        task = self.flights.run(key, lambda: self._fetch_and_store(key, stale))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_and_store(self, key: str, stale: CachedObject | None) -> FetchOutcome:
        assert self.cache is not None
        on_disk: CachedObject | None = None
        if stale is None and self.disk is not None and key in self.disk:
            on_disk = await self.disk.load(key)
            if on_disk is not None and on_disk.state(self.now()) is CacheState.FRESH:
                if self.flights.was_purged(key):
                    return FetchOutcome(on_disk, "ok", tier="disk")
                return FetchOutcome(on_disk, "ok", self.cache.store(on_disk), tier="disk")
            stale = on_disk  # past its max-age on disk: revalidate it (If-None-Match)
        outcome = await self._fetch(key, stale)
        if (
            outcome.status == "failed"
            and on_disk is not None
            and on_disk.usable_on_error(self.now())
            and not self.flights.was_purged(key)
        ):
            return FetchOutcome(on_disk, "stale", tier="disk")  # stale-if-error, from disk
        if self.flights.was_purged(key):
            return FetchOutcome(outcome.obj, outcome.status)
        if outcome.status == "not_found" and stale is not None:
            self.cache.purge(key)  # gone from the origins: stop serving it
            if self.disk is not None:
                self.disk.purge(key)
        if outcome.obj is not None and outcome.status in ("ok", "not_modified"):
            if self.disk is not None:
                self.disk.save(outcome.obj)  # write-through, in the background
            return FetchOutcome(outcome.obj, outcome.status, self.cache.store(outcome.obj))
        return outcome

    async def _fetch(self, key: str, stale: CachedObject | None) -> FetchOutcome:
        order = self.origins.order(key)
        tries = [o for o in order if self.origins.is_available(o.name)] or order
        headers: Sequence[tuple[str, str]] = ()
        if stale is not None:
            headers = (("If-None-Match", stale.etag),)
        not_found = False
        for origin in tries:
            self.counters.inc("origin_fetches", origin.name)
            try:
                fetched = await self.origins.request(
                    origin.name, "GET", _MEDIA + key, headers=headers,
                    max_body_bytes=self.config.max_object_bytes,
                )  # fmt: skip
            except (BalancerError, ValueError):
                self.counters.inc("origin_failures", origin.name)
                continue
            if fetched.status == 200:
                obj = self._object(key, fetched)
                if obj is not None:
                    return FetchOutcome(obj, "ok")
                self.counters.inc("origin_failures", origin.name)  # damaged copy
            elif fetched.status == 304 and stale is not None:
                stale.refresh(parse_cache_control(fetched.header("cache-control")), self.now())
                return FetchOutcome(stale, "not_modified")
            elif fetched.status == 404:
                not_found = True
            else:
                self.counters.inc("origin_failures", origin.name)
        return _NOT_FOUND if not_found else _FAILED

    def _object(self, key: str, fetched: Fetched) -> CachedObject | None:
        if hashlib.sha256(fetched.body).hexdigest() != key:
            return None
        cache_control = fetched.header("cache-control") or ""
        return CachedObject(
            key,
            body=fetched.body,
            content_type=fetched.header("content-type") or "application/octet-stream",
            etag=fetched.header("etag") or f'"{key}"',
            cache_control=cache_control,
            freshness=parse_cache_control(cache_control),
            now=self.now(),
        )


class _CdnHandler:
    def __init__(self, cdn: CdnServer) -> None:
        self._cdn = cdn
        self._counters = cdn.counters
        self.hits = self.misses = self.stale = 0  # plain ints on the hot path
        self.disk_hits = 0
        for tier in ("memory", "disk"):
            cdn.counters.gauge(
                f"{tier}_hit_ratio",
                f"Share of media requests answered from the {tier} tier",
                lambda tier=tier: self.hit_ratio(tier),  # type: ignore[misc]
            )

    def hit_ratio(self, tier: str) -> float:
        total = self.hits + self.disk_hits + self.misses + self.stale
        served = self.hits + self.stale if tier == "memory" else self.disk_hits
        return round(served / total, 6) if total else 0.0

    def render_metrics(self) -> bytes:
        values = self._counters.values
        for label, value in (
            ("hit", self.hits), ("disk_hit", self.disk_hits), ("miss", self.misses),
            ("stale", self.stale),
        ):  # fmt: skip
            values[("requests", label)] = value
        return self._counters.render()

    def answer_now(self, request: Request) -> bytes | None:  # noqa: PLR0911 - one per answer
        path = request.path
        if path.startswith(_MEDIA):
            method = request.method
            if method != "GET" and method != "HEAD":  # noqa: PLR1714 (hot path)
                return error_response(
                    405, "method_not_allowed", f"{method} not allowed",
                    keep_alive=request.keep_alive, headers=[("Allow", "GET, HEAD")],
                )  # fmt: skip
            key = path[7:]
            if not is_valid_key(key):
                return error_response(
                    400, "invalid_key", "a media key is 64 lowercase hex",
                    keep_alive=request.keep_alive, head_only=method == "HEAD",
                )  # fmt: skip
            cache = self._cdn.cache
            assert cache is not None
            obj = cache.get(key)
            if obj is None:
                return None
            state = obj.state(self._cdn.now())
            if state is CacheState.FRESH:
                self.hits += 1
                headers = request.headers
                if (
                    method == "GET"
                    and request.keep_alive
                    and not request.http_1_0
                    and "range" not in headers
                    and "if-none-match" not in headers
                ):
                    return obj.hit_response
                return serve(request, obj, "HIT", "memory")
            if state is CacheState.STALE:
                self.stale += 1
                self._cdn.revalidate(key, obj)
                return serve(request, obj, "STALE", "memory")
            return None  # expired: fetch again
        if path == "/healthz":
            return simple_response(200, _JSON, _HEALTH, keep_alive=request.keep_alive)
        if path == "/metrics":
            body = self.render_metrics()
            return simple_response(200, CONTENT_TYPE, body, keep_alive=request.keep_alive)
        return error_response(404, "not_found", "no such path", keep_alive=request.keep_alive)

    async def answer(self, request: Request, conn: Connection) -> bool:
        cdn = self._cdn
        key = request.path[7:]
        cache = cdn.cache
        assert cache is not None
        expired = cache.peek(key)
        outcome = await asyncio.shield(cdn.fetch(key))
        if outcome.tier == "disk":
            self.disk_hits += 1
        else:
            self.misses += 1
        if outcome.obj is not None:
            if outcome.tier != "disk":
                conn.write(serve(request, outcome.obj, "MISS"))
            else:
                label = "STALE" if outcome.status == "stale" else "HIT"
                conn.write(serve(request, outcome.obj, label, "disk"))
        elif outcome.status == "not_found":
            head_only = request.method == "HEAD"
            conn.write(
                error_response(
                    404,
                    "not_found",
                    "no such media key",
                    keep_alive=request.keep_alive,
                    head_only=head_only,
                )
            )
        elif expired is not None and expired.usable_on_error(cdn.now()):
            conn.write(serve(request, expired, "STALE", "memory"))
        else:
            conn.write(
                error_response(
                    502,
                    "bad_gateway",
                    "no media origin answered",
                    keep_alive=request.keep_alive,
                    headers=[("Retry-After", "1")],
                    head_only=request.method == "HEAD",
                )
            )
        return request.keep_alive


def serve(request: Request, obj: CachedObject, label: str, tier: str | None = None) -> bytes:
    """The answer to a GET or HEAD from a cached object: 200, 206, 304 or 416; ``tier`` (the
    cache tier that answered) goes out as ``X-Cache-Tier``."""
    chosen = select(request.method, request.headers, obj.etag, obj.size)
    headers = [("ETag", obj.etag), ("Cache-Control", obj.cache_control), ("X-Cache", label)]
    if tier is not None:
        headers.append(("X-Cache-Tier", tier))
    keep_alive, http_1_0 = request.keep_alive, request.http_1_0
    if chosen.status == 304:
        return response_head(304, headers, keep_alive=keep_alive, http_1_0=http_1_0)
    if chosen.status == 416:
        headers.append(("Content-Range", f"bytes */{obj.size}"))
        return error_response(
            416, "range_not_satisfiable", "range not satisfiable", keep_alive=keep_alive,
            http_1_0=http_1_0, headers=headers, head_only=request.method == "HEAD",
        )  # fmt: skip
    headers += [("Content-Type", obj.content_type), ("Accept-Ranges", "bytes")]
    body = obj.body
    byte_range = chosen.byte_range
    if byte_range is not None:
        headers.append(("Content-Range", byte_range.content_range(obj.size)))
        body = body[byte_range.start : byte_range.end + 1]
    headers.append(("Content-Length", str(len(body))))
    head = response_head(chosen.status, headers, keep_alive=keep_alive, http_1_0=http_1_0)
    if request.method == "HEAD":
        return head
    return head + body


class _PurgeHandler:
    """The internal listener: ``PURGE /media/{key}`` → 200 ``{"key", "purged"}``."""

    def __init__(self, cdn: CdnServer) -> None:
        self._cdn = cdn

    def answer_now(self, request: Request) -> bytes | None:
        path, keep_alive = request.path, request.keep_alive
        if path == "/healthz":
            return simple_response(200, _JSON, _HEALTH, keep_alive=keep_alive)
        if not path.startswith(_MEDIA):
            return error_response(404, "not_found", "no such path", keep_alive=keep_alive)
        key = path[7:]
        if request.method not in ("PURGE", "DELETE"):
            return error_response(
                405, "method_not_allowed", "PURGE or DELETE", keep_alive=keep_alive,
                headers=[("Allow", "PURGE, DELETE")],
            )  # fmt: skip
        if not is_valid_key(key):
            return error_response(
                400, "invalid_key", "a media key is 64 lowercase hex", keep_alive=keep_alive
            )
        purged = self._cdn.purge(key)
        return json_response(200, {"key": key, "purged": purged}, keep_alive=keep_alive)

    async def answer(self, request: Request, conn: Connection) -> bool:  # pragma: no cover
        return False  # every request is answered by answer_now
