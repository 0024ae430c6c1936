"""Reading and validating topology TOML: anything not understood is refused with a clear reason."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from photostack.blocks.balancer import SETTINGS_KEYS, BalancerConfigError, parse_settings
from photostack.blocks.cache import PolicyName, UnknownPolicyError, parse_policy_name
from photostack.cluster._topology_model import (
    CACHE_ENGINES,
    EDGE_ENGINES,
    PRODUCT_GROUPS,
    StorageGroup,
    Topology,
    TopologyError,
)

__all__ = [
    "CDN_ENGINES",
    "CHAOS_LINK_KINDS",
    "bundled_topology",
    "load_topology",
    "parse_topology",
]

_MAX_COUNT = 16
_MAX_SHARDS = 16
_MAX_REPLICAS = 4
_MAX_CACHE_BYTES = 1 << 40


def load_topology(path: Path | None = None) -> Topology:
    """Read a topology file, or the default one shipped in the package when ``path`` is None."""
    if path is None:
        text = resources.files("photostack.cluster").joinpath("topologies/default.toml").read_text()
        source = "default topology"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from exc
        source = str(path)
    return parse_topology(text, source=source)


def bundled_topology(name: str) -> Path:
    """Path of a topology shipped in the package (``default`` or ``small``)."""
    ref = resources.files("photostack.cluster").joinpath(f"topologies/{name}.toml")
    return Path(str(ref))


def parse_topology(text: str, *, source: str = "topology") -> Topology:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: not valid TOML: {exc}") from exc
    _only(
        raw,
        {"cluster", "edge", "web", "app", "cache", "storage", "directory", *_UPLOAD_TABLES}
        | {"chaos", "media", "cdn"},
        source,
    )
    uploads = _uploads(raw, source)
    directory = _table(raw, "directory", source)
    _only(directory, {"count", "replicas"}, f"{source} [directory]")
    directory_count = _int(directory, "count", 2, f"{source} [directory]", low=1, high=_MAX_COUNT)
    directory_replicas = _int(
        directory, "replicas", 1, f"{source} [directory]", low=0, high=_MAX_REPLICAS
    )
    cluster = _table(raw, "cluster", source)
    _only(cluster, {"name", "host"}, f"{source} [cluster]")
    name = _str(cluster, "name", "photostack", f"{source} [cluster]")
    host = _str(cluster, "host", "127.0.0.1", f"{source} [cluster]")

    counts: dict[str, int] = {}
    balancing: dict[str, dict[str, Any]] = {}
    for role in ("edge", "web", "app"):
        table = _table(raw, role, source)
        where = f"{source} [{role}]"
        if role == "app":
            _only(table, {"count"}, where)
        elif role == "edge":
            _only(table, {"count", "engine", "proxy", *SETTINGS_KEYS}, where)
            edge_engine, edge_proxy = _edge_proxy(table, where)
            rest = {k: v for k, v in table.items() if k not in ("engine", "proxy")}
            balancing[role] = _balancing(rest, where)
        else:
            _only(table, {"count", *SETTINGS_KEYS}, where)
            balancing[role] = _balancing(table, where)
        counts[role] = _int(table, "count", 1, where, low=1, high=_MAX_COUNT)
    cache = _table(raw, "cache", source)
    _only(
        cache,
        {"count", "engine", "policy", "maxmemory_bytes", *_CACHING_KEYS},
        f"{source} [cache]",
    )
    caching = _caching(cache, f"{source} [cache]")
    cache_count = _int(cache, "count", 1, f"{source} [cache]", low=1, high=_MAX_COUNT)
    cache_engine = _str(cache, "engine", "redis", f"{source} [cache]")
    if cache_engine not in CACHE_ENGINES:
        raise TopologyError(
            f"{source} [cache]: engine must be 'redis' or 'photostack', not {cache_engine!r}"
        )
    cache_policy, cache_maxmemory_bytes = _cache_bounds(cache, cache_engine, f"{source} [cache]")

    storage_raw = _table(raw, "storage", source)
    groups: list[StorageGroup] = []
    for group_name in PRODUCT_GROUPS:
        if group_name not in storage_raw:
            raise TopologyError(
                f"{source}: [storage.{group_name}] is missing (the product needs it)"
            )
    for group_name, value in storage_raw.items():
        where = f"{source} [storage.{group_name}]"
        if group_name not in PRODUCT_GROUPS:
            raise TopologyError(
                f"{where}: unknown storage group (known: {', '.join(PRODUCT_GROUPS)})"
            )
        if not isinstance(value, dict):
            raise TopologyError(f"{where}: must be a table")
        _only(value, {"shards", "replicas", *_REPLICATION_KEYS}, where)
        groups.append(
            StorageGroup(
                name=group_name,
                shards=_int(value, "shards", 1, where, low=1, high=_MAX_SHARDS),
                replicas=_int(value, "replicas", 1, where, low=0, high=_MAX_REPLICAS),
                **_replication(value, where),
            )
        )
    groups.sort(key=lambda g: PRODUCT_GROUPS.index(g.name))
    return Topology(
        name=name,
        host=host,
        edge_count=counts["edge"],
        web_count=counts["web"],
        app_count=counts["app"],
        cache_count=cache_count,
        cache_engine=cache_engine,
        storage=tuple(groups),
        cache_policy=cache_policy,
        cache_maxmemory_bytes=cache_maxmemory_bytes,
        edge_balancing=balancing["edge"],
        web_balancing=balancing["web"],
        edge_engine=edge_engine,
        edge_proxy=edge_proxy,
        directory_count=directory_count,
        directory_replicas=directory_replicas,
        caching=caching,
        **uploads,
        chaos_links=_chaos_links(raw, source),
        **_media_cdn(raw, source),
    )


_UPLOAD_TABLES = ("workers", "queue", "feed")


def _uploads(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``[workers]``, ``[queue]`` and ``[feed]`` (docs/uploads.md), validated."""
    workers = _table(raw, "workers", source)
    where = f"{source} [workers]"
    _only(workers, {"count", "concurrency", "visibility_timeout_s"}, where)
    visibility = workers.get("visibility_timeout_s", 30.0)
    if not isinstance(visibility, int | float) or isinstance(visibility, bool) or not (
        1 <= visibility <= 3600
    ):
        raise TopologyError(f"{where}: visibility_timeout_s must be a number in 1..3600")
    queue = _table(raw, "queue", source)
    _only(queue, {"replicas", "max_length"}, f"{source} [queue]")
    feed = _table(raw, "feed", source)
    _only(feed, {"fanout_limit"}, f"{source} [feed]")
    return {
        "worker_count": _int(workers, "count", 2, where, low=0, high=_MAX_COUNT),
        "worker_concurrency": _int(workers, "concurrency", 4, where, low=1, high=256),
        "worker_visibility_timeout_s": float(visibility),
        "queue_replicas": _int(
            queue, "replicas", 1, f"{source} [queue]", low=0, high=_MAX_REPLICAS
        ),
        "queue_max_length": _int(
            queue, "max_length", 100_000, f"{source} [queue]", low=1, high=100_000_000
        ),
        "feed_fanout_limit": _int(
            feed, "fanout_limit", 1000, f"{source} [feed]", low=0, high=100_000_000
        ),
    }


def _edge_proxy(table: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """``[edge] engine`` and the ``[edge.proxy]`` feature table, validated (docs/proxy.md)."""
    from photostack.blocks.proxy import ProxyConfig, ProxyConfigError, parse_proxy_settings
    from photostack.cluster.engines.nginx import NGINX_STRATEGIES

    engine = _str(table, "engine", "photostack", where)
    if engine not in EDGE_ENGINES:
        raise TopologyError(f"{where}: engine must be one of {', '.join(EDGE_ENGINES)}")
    proxy = table.get("proxy", {})
    if not isinstance(proxy, dict):
        raise TopologyError(f"{where}: [edge.proxy] must be a table")
    for key in ("tls", "access_log"):
        if not isinstance(proxy.get(key, False), bool):
            raise TopologyError(f"{where}: proxy.{key} must be true or false")
    # tls and access_log become a port, a certificate and a file in the data dir at `up`.
    probe = {k: v for k, v in proxy.items() if k not in ("tls", "access_log")}
    try:
        parse_proxy_settings(probe, ProxyConfig(backends=()))
    except ProxyConfigError as exc:
        raise TopologyError(f"{where} proxy: {exc}") from None
    if engine == "nginx" and proxy.get("allow_paths"):
        raise TopologyError(f"{where}: proxy.allow_paths is not rendered for nginx (deny_paths is)")
    strategy = table.get("strategy", "round-robin")
    if engine == "nginx" and strategy not in NGINX_STRATEGIES:
        known = ", ".join(sorted(NGINX_STRATEGIES))
        raise TopologyError(f"{where}: nginx has no {strategy!r} strategy (it has: {known})")
    return engine, dict(proxy)


def _balancing(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The balancing keys of a role's table, validated; active health checks on by default."""
    settings = {"checks": True, **{k: v for k, v in table.items() if k != "count"}}
    try:
        parse_settings(settings)
    except BalancerConfigError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    return settings


# [chaos] links (docs/chaos.md): which consumers reach which nodes through the chaos node.
CHAOS_LINK_KINDS = {
    "storage": "app nodes -> every product storage node (primaries and replicas)",
    "replication": "each product replica -> its primary (streaming and base backup)",
    "web-app": "web nodes -> each app node",
    "app-cache": "app nodes -> each cache node",
}


def _chaos_links(raw: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """``[chaos] links = [...]`` (kinds of CHAOS_LINK_KINDS) unless ``enabled = false``."""
    chaos = _table(raw, "chaos", source)
    where = f"{source} [chaos]"
    _only(chaos, {"enabled", "links"}, where)
    enabled = chaos.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TopologyError(f"{where}: enabled must be true or false")
    kinds = chaos.get("links", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise TopologyError(f"{where}: links must be a list of link kinds")
    for kind in kinds:
        if kind not in CHAOS_LINK_KINDS:
            known = ", ".join(CHAOS_LINK_KINDS)
            raise TopologyError(f"{where}: unknown link kind {kind!r} (known: {known})")
    return tuple(dict.fromkeys(kinds)) if enabled else ()


_CACHING_KEYS = (
    "enabled",
    "local_policy",
    "local_max_entries",
    "failure_mode",
    "node_failure_modes",
    "redelete_after_s",
    "types",
)


def _caching(cache: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The product caching keys of ``[cache]``, validated by the app's own parser."""
    from photostack.service._caching import CachingConfig

    raw = {k: v for k, v in cache.items() if k in _CACHING_KEYS}
    try:
        CachingConfig.from_dict(raw)
    except ValueError as exc:
        raise TopologyError(f"{where}: {exc}") from None
    return raw


def _cache_bounds(
    cache: Mapping[str, Any], engine: str, where: str
) -> tuple[PolicyName | None, int | None]:
    """``policy`` and ``maxmemory_bytes`` of ``[cache]``; a policy Redis lacks needs our node."""
    policy = None
    if "policy" in cache:
        try:
            policy = parse_policy_name(_str(cache, "policy", "", where))
        except UnknownPolicyError as exc:
            raise TopologyError(f"{where}: {exc}") from exc
        if engine == "redis" and not policy.redis_supports:
            raise TopologyError(
                f"{where}: policy {policy.short!r} needs engine = 'photostack' (Redis lacks it)"
            )
    memory = None
    if "maxmemory_bytes" in cache:
        memory = _int(cache, "maxmemory_bytes", 0, where, low=1, high=_MAX_CACHE_BYTES)
    return policy, memory


_REPLICATION_KEYS = ("replication", "consistency", "max_replica_lag_s")
CDN_ENGINES = ("photostack", "nginx")
_MAX_MEDIA_BYTES = 1 << 34


def _media_cdn(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``[media]`` and ``[cdn]`` (docs/media.md), validated."""
    media = _table(raw, "media", source)
    where = f"{source} [media]"
    _only(media, {"count", "max_object_bytes"}, where)
    cdn = _table(raw, "cdn", source)
    cdn_where = f"{source} [cdn]"
    _only(
        cdn,
        {"count", "engine", "cache_bytes", "max_entry_bytes", "disk_cache_bytes",
         "disk_max_entry_bytes"},
        cdn_where,
    )  # fmt: skip
    _int(cdn, "count", 1, cdn_where, low=1, high=1)  # one static host
    engine = _str(cdn, "engine", "photostack", cdn_where)
    if engine not in CDN_ENGINES:
        raise TopologyError(f"{cdn_where}: engine must be one of {', '.join(CDN_ENGINES)}")
    cache_bytes = _int(
        cdn, "cache_bytes", 256 * 1024 * 1024, cdn_where, low=1 << 20, high=_MAX_CACHE_BYTES
    )
    default_entry = min(16 * 1024 * 1024, cache_bytes)
    max_entry = _int(cdn, "max_entry_bytes", default_entry, cdn_where, low=1024, high=cache_bytes)
    disk_bytes = _int(
        cdn, "disk_cache_bytes", 1024 * 1024 * 1024, cdn_where, low=0, high=_MAX_CACHE_BYTES
    )
    disk_entry = _int(
        cdn, "disk_max_entry_bytes", min(64 * 1024 * 1024, max(disk_bytes, 1024)), cdn_where,
        low=1024, high=max(disk_bytes, 1024),
    )  # fmt: skip
    return {
        "media_count": _int(media, "count", 2, where, low=1, high=_MAX_COUNT),
        "media_max_object_bytes": _int(
            media, "max_object_bytes", 64 * 1024 * 1024, where, low=1024, high=_MAX_MEDIA_BYTES
        ),
        "cdn_engine": engine,
        "cdn_cache_bytes": cache_bytes,
        "cdn_max_entry_bytes": max_entry,
        "cdn_disk_cache_bytes": disk_bytes,
        "cdn_disk_max_entry_bytes": disk_entry,
    }


def _replication(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``replication``, ``consistency`` and ``max_replica_lag_s`` of a storage group."""
    mode = _str(value, "replication", "async", where)
    if mode not in ("async", "sync", "remote_apply"):
        raise TopologyError(f"{where}: replication must be async, sync or remote_apply")
    if mode != "async" and value.get("replicas", 1) == 0:
        raise TopologyError(f"{where}: replication = {mode!r} needs replicas >= 1")
    consistency = _str(value, "consistency", "cp", where)
    if consistency not in ("cp", "ap"):
        raise TopologyError(f"{where}: consistency must be cp or ap")
    lag = value.get("max_replica_lag_s", 0.0)
    if not isinstance(lag, int | float) or isinstance(lag, bool) or not 0 <= lag <= 3600:
        raise TopologyError(f"{where}: max_replica_lag_s must be a number in 0..3600")
    return {"replication": mode, "consistency": consistency, "max_replica_lag_s": float(lag)}


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TopologyError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: [{key}] must be a table")
    return value


def _int(
    table: Mapping[str, Any], key: str, default: int, where: str, *, low: int, high: int
) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"{where}: {key} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise TopologyError(f"{where}: {key} = {value} is outside {low}..{high}")
    return value


def _str(table: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise TopologyError(f"{where}: {key} must be a non-empty string")
    return value
