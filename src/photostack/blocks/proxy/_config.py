"""The edge proxy's tunables, one frozen object (sizes in bytes, times in seconds).

Every feature beyond plain proxying is off unless its field is set, and a feature that is off
costs the request path one ``is None`` test. ``parse_proxy_settings`` turns the JSON-ready
``[edge.proxy]`` table of a topology (or a node spec) into these objects, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from photostack.blocks.balancer import Backend, ClientConfig

__all__ = [
    "PROXY_SETTINGS_KEYS",
    "CacheConfig",
    "FilterRules",
    "GzipConfig",
    "HeaderRules",
    "ProxyConfig",
    "ProxyConfigError",
    "ProxyError",
    "TlsConfig",
    "parse_proxy_settings",
]


class ProxyError(Exception):
    """Root of the proxy block's errors."""


class ProxyConfigError(ProxyError):
    """A proxy setting is unknown or has a bad value. ``str(exc)`` is one line."""


@dataclass(frozen=True)
class FilterRules:
    """Method and path rules, checked before anything is sent upstream.

    A method outside ``allow_methods`` (when given) or in ``deny_methods`` is answered 405; a
    path under one of ``deny_paths`` (prefixes), or under none of ``allow_paths`` when given,
    is answered 403. The edge's own ``/healthz`` and ``/metrics`` are not filtered.
    """

    allow_methods: frozenset[str] = frozenset()
    deny_methods: frozenset[str] = frozenset()
    allow_paths: tuple[str, ...] = ()
    deny_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeaderRules:
    """Headers added (set, replacing any of the same name) or removed on each side."""

    request_add: tuple[tuple[str, str], ...] = ()
    request_remove: frozenset[str] = frozenset()  # lower-case names
    response_add: tuple[tuple[str, str], ...] = ()
    response_remove: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not (
            self.request_add or self.request_remove or self.response_add or self.response_remove
        )


@dataclass(frozen=True)
class TlsConfig:
    port: int
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class GzipConfig:
    min_bytes: int = 256  # smaller bodies are not worth a gzip header
    level: int = 5
    max_buffer_bytes: int = 1024 * 1024  # longer (or streamed) bodies pass uncompressed


@dataclass(frozen=True)
class CacheConfig:
    """The micro-cache: GET/HEAD responses that Cache-Control allows a shared cache to keep."""

    max_ttl_s: float = 1.0  # cap on max-age / s-maxage
    stale_if_error_s: float = 0.0  # serve a stale entry this long when the upstream fails
    max_entries: int = 1024
    max_body_bytes: int = 1024 * 1024  # larger responses are not stored


@dataclass(frozen=True)
class ProxyConfig:
    backends: tuple[Backend, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080  # 0 picks a free port; read it back from ProxyServer.port
    name: str = "edge"
    # Pools, health, retries and the request deadline (first try to response head).
    upstream: ClientConfig = field(default_factory=ClientConfig)
    # Longest silence allowed inside a streamed response body (SSE sends a comment every 15 s).
    stream_idle_timeout_s: float = 60.0
    # A client connection with no request in progress is closed after this long.
    client_timeout_s: float = 60.0
    # A request head (request line and headers) must arrive whole within this (slowloris).
    header_timeout_s: float = 10.0
    drain_timeout_s: float = 10.0  # on close: let in-flight requests finish, then cut
    max_body_bytes: int = 12 * 1024 * 1024  # 10 MiB uploads plus multipart overhead
    max_header_bytes: int = 16 * 1024  # request line plus headers
    forwarded_proto: str = "http"  # what X-Forwarded-Proto says on the plain port
    max_pipelined_requests: int = 16  # stop reading a client that queued this many
    filter: FilterRules | None = None
    headers: HeaderRules | None = None
    access_log_path: Path | None = None  # one JSON line per request; "-" is stderr
    tls: TlsConfig | None = None
    gzip: GzipConfig | None = None
    collapse: bool = False  # one upstream request for concurrent identical GET/HEAD
    cache: CacheConfig | None = None


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ProxyConfigError(f"{key} must be a list of non-empty strings, not {value!r}")
    return tuple(value)


def _header_name(key: str, name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ProxyConfigError(f"{key}: {name!r} is not a header name")
    return name


def _header_map(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ProxyConfigError(f'{key} must be a table of Name = "value", not {value!r}')
    out = []
    for name, text in value.items():
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            raise ProxyConfigError(f"{key}.{name} must be a one-line string")
        out.append((_header_name(key, str(name)), text))
    return tuple(out)


def _number(key: str, value: Any, *, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ProxyConfigError(f"{key} must be {kind}, not {value!r}")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProxyConfigError(f"{key} must be true or false, not {value!r}")
    return value


_METHOD_KEYS = ("allow_methods", "deny_methods")
_PATH_KEYS = ("allow_paths", "deny_paths")
_HEADER_KEYS = (
    "request_headers_add",
    "request_headers_remove",
    "response_headers_add",
    "response_headers_remove",
)
PROXY_SETTINGS_KEYS = frozenset(
    {
        *_METHOD_KEYS,
        *_PATH_KEYS,
        *_HEADER_KEYS,
        "access_log",
        "cache_ttl_s",
        "client_timeout_s",
        "collapse",
        "gzip",
        "gzip_min_bytes",
        "header_timeout_s",
        "max_body_bytes",
        "max_header_bytes",
        "stale_if_error_s",
        "tls",
    }
)


def parse_proxy_settings(settings: Mapping[str, Any], base: ProxyConfig) -> ProxyConfig:
    """``base`` with the features ``settings`` switch on. Raises ProxyConfigError.

    ``access_log`` is a path ("-" for stderr) or false; ``tls`` is false or a table with
    ``port``, ``cert`` and ``key`` (the cluster fills these in from ``tls = true``).
    """
    unknown = sorted(set(settings) - PROXY_SETTINGS_KEYS)
    if unknown:
        known = ", ".join(sorted(PROXY_SETTINGS_KEYS))
        raise ProxyConfigError(f"unknown proxy key {unknown[0]!r} (known: {known})")
    s = settings
    changes: dict[str, Any] = _limits(s)
    if any(k in s for k in (*_METHOD_KEYS, *_PATH_KEYS)):
        changes["filter"] = _filter_rules(s)
    if any(k in s for k in _HEADER_KEYS):
        rules = _header_rules(s)
        changes["headers"] = None if rules.is_empty else rules
    log = s.get("access_log", False)
    if log is not False:
        if not isinstance(log, str) or not log:
            raise ProxyConfigError(f"access_log must be a path, '-' or false, not {log!r}")
        changes["access_log_path"] = Path(log)
    tls = s.get("tls", False)
    if tls is not False:
        changes["tls"] = _tls(tls)
    if _flag("gzip", s.get("gzip", False)):
        min_bytes = int(_number("gzip_min_bytes", s.get("gzip_min_bytes", 256), integer=True))
        changes["gzip"] = GzipConfig(min_bytes=min_bytes)
    changes["collapse"] = _flag("collapse", s.get("collapse", base.collapse))
    ttl = _number("cache_ttl_s", s.get("cache_ttl_s", 0))
    stale = _number("stale_if_error_s", s.get("stale_if_error_s", 0))
    if ttl > 0:
        changes["cache"] = CacheConfig(max_ttl_s=ttl, stale_if_error_s=stale)
    elif stale > 0:
        raise ProxyConfigError("stale_if_error_s needs the micro-cache (cache_ttl_s > 0)")
    return dataclasses.replace(base, **changes)


def _limits(s: Mapping[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in ("max_body_bytes", "max_header_bytes"):
        if key in s:
            changes[key] = int(_number(key, s[key], integer=True))
    for key in ("header_timeout_s", "client_timeout_s"):
        if key in s:
            value = _number(key, s[key])
            if value <= 0:
                raise ProxyConfigError(f"{key} must be positive")
            changes[key] = value
    return changes


def _filter_rules(s: Mapping[str, Any]) -> FilterRules:
    for key in _PATH_KEYS:
        for path in _str_list(key, s.get(key, [])):
            if not path.startswith("/"):
                raise ProxyConfigError(f"{key}: {path!r} must start with '/'")

    def methods(key: str) -> frozenset[str]:
        return frozenset(m.upper() for m in _str_list(key, s.get(key, [])))

    return FilterRules(
        allow_methods=methods("allow_methods"),
        deny_methods=methods("deny_methods"),
        allow_paths=_str_list("allow_paths", s.get("allow_paths", [])),
        deny_paths=_str_list("deny_paths", s.get("deny_paths", [])),
    )


def _header_rules(s: Mapping[str, Any]) -> HeaderRules:
    def names(key: str) -> frozenset[str]:
        return frozenset(_header_name(key, n).lower() for n in _str_list(key, s.get(key, [])))

    return HeaderRules(
        request_add=_header_map("request_headers_add", s.get("request_headers_add", {})),
        request_remove=names("request_headers_remove"),
        response_add=_header_map("response_headers_add", s.get("response_headers_add", {})),
        response_remove=names("response_headers_remove"),
    )


def _tls(tls: Any) -> TlsConfig:
    if not isinstance(tls, Mapping) or set(tls) != {"port", "cert", "key"}:
        raise ProxyConfigError("tls must be false or a table with port, cert and key")
    return TlsConfig(
        port=int(_number("tls.port", tls["port"], integer=True)),
        cert_path=Path(str(tls["cert"])),
        key_path=Path(str(tls["key"])),
    )
