"""The product's cached read paths: a local cache on every app node in front of the global,
ring-placed cache on the cache nodes, in front of the databases.

Per data type (``DATA_TYPES``) the topology's ``[cache]`` table chooses whether it is cached,
its TTLs, the global form (``read-through``: the cache loads on a miss; ``cache-aside``: this
module gets, loads and fills) and the write policy (``around``: a write deletes the keys it
changed; ``through``: it deletes them and loads the new value at once). Keys are
``<type>:<id>``; the ring stores them under ``c:<type>:<id>``.

Coherence: a write deletes its keys in the local cache, on the ring (owner and its successor)
and publishes them on the invalidation bus, which every app node's local cache listens to; a
second delete on the ring ``redelete_after_s`` later removes a value that a read which started
before the write may have stored meanwhile. Reads report ``hit`` when the local or the global
cache answered (``X-Cache``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response

from photostack.blocks.cache import (
    BoundedCache,
    CacheAside,
    CacheNodeAddress,
    CacheStatus,
    FailureMode,
    GlobalReadThrough,
    InvalidationBus,
    PolicyName,
    ReadThrough,
    ReadThroughConfig,
    RingCache,
    RingCacheConfig,
    Stored,
    make_policy,
    parse_failure_mode,
    parse_policy_name,
)

from ._codec import DEFAULT_LIMIT, Cursor, encode_cursor
from ._http import JSON_MEDIA_TYPE
from ._store import EdgeKind, UserNotFoundError, UserStore
from .settings import Peer

__all__ = [
    "DATA_TYPES",
    "CachingConfig",
    "GlobalForm",
    "ProductCache",
    "TypePolicy",
    "WriteMode",
    "cached_response",
    "json_bytes",
]

log = logging.getLogger(__name__)

DATA_TYPES = ("user", "username", "following", "followers", "photo")
RING_PREFIX = "c:"

Loader = Callable[[], Awaitable[bytes | None]]
Loaded = tuple[bytes | None, bool]  # (the JSON, or None: not found), answered by the global tier


class GlobalForm(StrEnum):
    READ_THROUGH = "read-through"
    CACHE_ASIDE = "cache-aside"


class WriteMode(StrEnum):
    AROUND = "around"  # invalidate: the next read loads
    THROUGH = "through"  # invalidate and load the new value now (replace)


@dataclass(frozen=True)
class TypePolicy:
    cached: bool = True
    form: GlobalForm = GlobalForm.READ_THROUGH
    write: WriteMode = WriteMode.AROUND
    ttl_s: float = 60.0  # global
    local_ttl_s: float = 5.0  # local: bounds staleness when an invalidation is lost
    stale_if_error_s: float = 30.0
    beta: float = 1.0  # XFetch (0: no early refresh)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.local_ttl_s <= 0 or self.stale_if_error_s < 0 or self.beta < 0:
            raise ValueError(f"bad cache policy {self!r}")


_DEFAULT_TYPES: dict[str, TypePolicy] = {
    "user": TypePolicy(ttl_s=60.0, local_ttl_s=5.0),
    "username": TypePolicy(form=GlobalForm.CACHE_ASIDE, ttl_s=3600.0, local_ttl_s=60.0),
    "following": TypePolicy(ttl_s=30.0, local_ttl_s=5.0),
    "followers": TypePolicy(ttl_s=30.0, local_ttl_s=5.0),
    "photo": TypePolicy(ttl_s=300.0, local_ttl_s=30.0),
}
_TYPE_KEYS = {"cached", "form", "write", "ttl_s", "local_ttl_s", "stale_if_error_s", "beta"}
_KEYS = {
    "enabled",
    "local_policy",
    "local_max_entries",
    "failure_mode",
    "node_failure_modes",
    "redelete_after_s",
    "types",
}


@dataclass(frozen=True)
class CachingConfig:
    """The app nodes' caching, from the topology's ``[cache]`` table (docs/caching.md)."""

    enabled: bool = True
    local_policy: PolicyName = PolicyName.LRU
    local_max_entries: int = 10_000
    failure_mode: FailureMode = FailureMode.REMAP
    node_failure_modes: tuple[tuple[str, FailureMode], ...] = ()
    redelete_after_s: float = 0.5
    types: Mapping[str, TypePolicy] = field(default_factory=lambda: dict(_DEFAULT_TYPES))

    def mode_of(self, node: str) -> FailureMode:
        return dict(self.node_failure_modes).get(node, self.failure_mode)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CachingConfig:
        """Raises ValueError naming the bad key."""
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_KEYS))})")
        out = cls()
        if "enabled" in raw:
            out = replace(out, enabled=_bool(raw, "enabled"))
        if "local_policy" in raw:
            out = replace(out, local_policy=parse_policy_name(str(raw["local_policy"])))
        if "local_max_entries" in raw:
            value = raw["local_max_entries"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"local_max_entries must be a positive integer, not {value!r}")
            out = replace(out, local_max_entries=value)
        if "failure_mode" in raw:
            out = replace(out, failure_mode=parse_failure_mode(str(raw["failure_mode"])))
        if "node_failure_modes" in raw:
            modes = raw["node_failure_modes"]
            if not isinstance(modes, Mapping):
                raise ValueError("node_failure_modes must be a table of node = mode")
            pairs = tuple((str(k), parse_failure_mode(str(v))) for k, v in modes.items())
            out = replace(out, node_failure_modes=pairs)
        if "redelete_after_s" in raw:
            out = replace(out, redelete_after_s=_number(raw, "redelete_after_s"))
        types = dict(out.types)
        overrides = raw.get("types", {})
        if not isinstance(overrides, Mapping):
            raise ValueError("types must be a table of data type = policy")
        for name, table in overrides.items():
            if name not in DATA_TYPES:
                raise ValueError(f"unknown data type {name!r} (known: {', '.join(DATA_TYPES)})")
            types[name] = _type_policy(types[name], table, name)
        return replace(out, types=types)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "local_policy": self.local_policy.short,
            "local_max_entries": self.local_max_entries,
            "failure_mode": self.failure_mode.value,
            "node_failure_modes": {k: v.value for k, v in self.node_failure_modes},
            "redelete_after_s": self.redelete_after_s,
            "types": {
                name: {
                    "cached": p.cached,
                    "form": p.form.value,
                    "write": p.write.value,
                    "ttl_s": p.ttl_s,
                    "local_ttl_s": p.local_ttl_s,
                    "stale_if_error_s": p.stale_if_error_s,
                    "beta": p.beta,
                }
                for name, p in self.types.items()
            },
        }


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


def _number(raw: Mapping[str, Any], key: str) -> float:
    value = raw[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a number >= 0, not {value!r}")
    return float(value)


def _type_policy(base: TypePolicy, table: object, name: str) -> TypePolicy:
    if not isinstance(table, Mapping):
        raise ValueError(f"types.{name} must be a table")
    unknown = sorted(set(table) - _TYPE_KEYS)
    if unknown:
        raise ValueError(f"types.{name}: unknown key {unknown[0]!r}")
    changes: dict[str, Any] = {}
    if "cached" in table:
        changes["cached"] = _bool(table, "cached")
    for key, kind in (("form", GlobalForm), ("write", WriteMode)):
        if key in table:
            try:
                changes[key] = kind(table[key])
            except ValueError:
                allowed = ", ".join(repr(m.value) for m in kind)
                raise ValueError(f"types.{name}.{key} must be one of {allowed}") from None
    for key in ("ttl_s", "local_ttl_s", "stale_if_error_s", "beta"):
        if key in table:
            changes[key] = _number(table, key)
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise ValueError(f"types.{name}: {exc}") from None


def json_bytes(value: Any) -> bytes:
    """JSON as the app's JsonResponse renders it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Req:
    """A local-cache key that carries how to load it (not part of its identity)."""

    key: str
    load: Callable[[], Awaitable[Loaded]] = field(compare=False, hash=False)


async def _nothing() -> Loaded:
    return None, False


class ProductCache:
    """The cached read paths of one app node. Without cache nodes only the local cache runs."""

    def __init__(
        self,
        config: CachingConfig,
        nodes: Sequence[Peer],
        *,
        origin: str,
        registry: CollectorRegistry,
        ring_config: RingCacheConfig | None = None,
    ) -> None:
        self.config = config
        self._local_cache: BoundedCache[_Req, Stored[Loaded]] = BoundedCache(
            make_policy(config.local_policy), max_entries=config.local_max_entries
        )
        self._local: dict[str, ReadThrough[_Req, Loaded]] = {}
        self._global: dict[str, GlobalReadThrough] = {}
        self._aside: dict[str, CacheAside] = {}
        self.ring: RingCache | None = None
        self.bus: InvalidationBus | None = None
        self._background: set[asyncio.Task[None]] = set()
        if nodes:
            addresses = [
                CacheNodeAddress(p.name, p.host, p.port, config.mode_of(p.name)) for p in nodes
            ]
            self.ring = RingCache(addresses, ring_config)
            self.bus = InvalidationBus(
                [(p.name, p.host, p.port) for p in nodes],
                origin=origin,
                on_keys=self._drop_local,
                on_gap=self.flush_local,
            )
        for name, policy in config.types.items():
            rt_config = ReadThroughConfig(policy.local_ttl_s, policy.beta, policy.stale_if_error_s)
            self._local[name] = ReadThrough(self._local_cache, self._load_req, rt_config)
            if self.ring is None:
                continue
            global_config = ReadThroughConfig(policy.ttl_s, policy.beta, policy.stale_if_error_s)
            self._global[name] = GlobalReadThrough(self.ring, _no_loader, global_config)
            self._aside[name] = CacheAside(self.ring, global_config)
        self.requests = Counter(
            "photostack_cache_requests",
            "Cache lookups by tier (local, global), data type, policy and result.",
            ["tier", "type", "policy", "result"],
            registry=registry,
        )

    def __repr__(self) -> str:
        return f"<ProductCache local={self._local_cache!r} ring={self.ring!r}>"

    async def start(self) -> None:
        if self.ring is not None:
            await self.ring.start()
        if self.bus is not None:
            await self.bus.start()

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for rt in self._local.values():
            await rt.aclose()
        for g in self._global.values():
            await g.aclose()
        if self.bus is not None:
            await self.bus.aclose()
        if self.ring is not None:
            await self.ring.aclose()

    # -- the generic read path -------------------------------------------------------------------

    def cached(self, data_type: str) -> bool:
        policy = self.config.types.get(data_type)
        return self.config.enabled and policy is not None and policy.cached

    async def read(self, data_type: str, key: str, load: Loader) -> tuple[bytes | None, bool]:
        """(the JSON or None when not found, whether a cache answered). ``key`` is
        ``<data_type>:<id>``; ``load`` reads the database."""
        if not self.cached(data_type):
            return await load(), False
        local = self._local[data_type]
        lookup = await local.lookup(_Req(key, lambda: self._load_global(data_type, key, load)))
        policy = self.config.local_policy.short
        self.requests.labels("local", data_type, policy, lookup.status.value).inc()
        value, global_hit = lookup.value
        return value, global_hit or lookup.status is not CacheStatus.MISS

    @staticmethod
    async def _load_req(req: _Req) -> Loaded:
        return await req.load()

    async def _load_global(self, data_type: str, key: str, load: Loader) -> Loaded:
        if self.ring is None:
            return await load(), False
        policy = self.config.types[data_type]
        ring_key = RING_PREFIX + key
        if policy.form is GlobalForm.READ_THROUGH:

            async def loader(_: str) -> bytes | None:
                return await load()

            found = await self._global[data_type].lookup(ring_key, loader)
            self.requests.labels("global", data_type, policy.form.value, found.status.value).inc()
            return found.value, found.status is not CacheStatus.MISS
        aside = self._aside[data_type]
        value = await aside.get(ring_key)
        result = CacheStatus.HIT if value is not None else CacheStatus.MISS
        self.requests.labels("global", data_type, policy.form.value, result.value).inc()
        if value is not None:
            return value, True
        started = time.monotonic()
        value = await load()
        if value is not None:
            await aside.fill(ring_key, value, time.monotonic() - started)
        return value, False

    # -- coherence -------------------------------------------------------------------------------

    async def invalidate(self, keys: Sequence[str]) -> None:
        """After a write: drop ``keys`` here, on the ring and (through the bus) everywhere."""
        keys = list(dict.fromkeys(keys))
        self._drop_local(keys)
        if self.ring is None:
            return
        ring_keys = [RING_PREFIX + k for k in keys]
        for key in keys:
            form = self._global.get(key.partition(":")[0])
            if form is not None:
                form.flights.forget(RING_PREFIX + key)
        await asyncio.gather(self.ring.delete(ring_keys), self._publish(keys))
        if self.config.redelete_after_s > 0:
            task = asyncio.create_task(self._redelete(ring_keys))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _publish(self, keys: list[str]) -> None:
        if self.bus is not None:
            await self.bus.publish(keys)

    async def _redelete(self, ring_keys: list[str]) -> None:
        await asyncio.sleep(self.config.redelete_after_s)
        if self.ring is not None:
            await self.ring.delete(ring_keys)

    def _drop_local(self, keys: list[str]) -> None:
        for key in keys:
            local = self._local.get(key.partition(":")[0])
            if local is not None:
                local.invalidate(_Req(key, _nothing))

    def flush_local(self) -> None:
        """Forget every local entry (an invalidation may have been missed)."""
        for req in list(self._local_cache):
            self._drop_local([req.key])

    # -- the product's data types ----------------------------------------------------------------

    async def user(self, store: UserStore, user_id: str) -> tuple[bytes | None, bool]:
        async def load() -> bytes | None:
            try:
                return json_bytes(await store.get_user(user_id))
            except UserNotFoundError:
                return None

        return await self.read("user", f"user:{user_id}", load)

    async def user_by_username(self, store: UserStore, username: str) -> tuple[bytes | None, bool]:
        async def load_id() -> bytes | None:
            try:
                return str((await store.get_user_by_username(username))["id"]).encode()
            except UserNotFoundError:
                return None

        user_id, id_hit = await self.read("username", f"username:{username}", load_id)
        if user_id is None:
            return None, id_hit
        body, hit = await self.user(store, user_id.decode())
        return body, hit and id_hit

    async def edges(
        self, store: UserStore, kind: EdgeKind, user_id: str, limit: int
    ) -> tuple[bytes | None, bool] | None:
        """The first page of a user's following or followers; None when it is not cached
        (another page size: the caller reads the database)."""
        if limit != DEFAULT_LIMIT:
            return None
        data_type = kind.table

        async def load() -> bytes | None:
            try:
                page = await store.list_edges(kind, user_id, limit, None)
            except UserNotFoundError:
                return None
            return json_bytes({"items": page.items, "next_cursor": _cursor(page.next_cursor)})

        return await self.read(data_type, f"{data_type}:{user_id}", load)

    async def after_follow_change(self, store: UserStore, user_id: str, target_id: str) -> None:
        """A follow or unfollow: both users' counts and both lists changed."""
        keys = [
            f"user:{user_id}",
            f"user:{target_id}",
            f"following:{user_id}",
            f"followers:{target_id}",
        ]
        await self.invalidate(keys)
        reloads: list[Awaitable[object]] = []
        for key in keys:
            data_type, _, ident = key.partition(":")
            if self.cached(data_type) and self.config.types[data_type].write is WriteMode.THROUGH:
                if data_type == "user":
                    reloads.append(self.user(store, ident))
                else:
                    reloads.append(self._reload_edges(store, EdgeKind[data_type.upper()], ident))
        await asyncio.gather(*reloads)

    async def _reload_edges(self, store: UserStore, kind: EdgeKind, user_id: str) -> None:
        await self.edges(store, kind, user_id, DEFAULT_LIMIT)

    async def after_create(self, user: Mapping[str, Any]) -> None:
        """A new user: a cached "no such username" must go."""
        await self.invalidate([f"username:{user['username']}"])


def _cursor(cursor: Cursor | None) -> str | None:
    return encode_cursor(cursor) if cursor is not None else None


async def _no_loader(key: str) -> bytes | None:
    raise LookupError(f"no loader given for {key}")  # every lookup passes its own


def cached_response(body: bytes, hit: bool) -> Response:
    """A cached read's answer: the JSON as stored, ``X-Cache: hit|miss``."""
    return Response(
        body, 200, headers={"X-Cache": "hit" if hit else "miss"}, media_type=JSON_MEDIA_TYPE
    )
