"""HTTP proxy pieces: the edge reverse proxy, its features and its header rules.

The proxy is one more user of the balancer's upstream core: same backend choice, health,
keep-alive pools and retry rule as the smart client. Start it with
``ProxyServer(config).start()`` / ``aclose()``, or run ``serve_proxy(config)`` until cancelled.
Features (filter, access log, header rules, TLS, gzip, collapsed forwarding, micro-cache) are
fields of ``ProxyConfig``, off by default; ``parse_proxy_settings`` reads them from a topology's
``[edge.proxy]`` table. See docs/proxy.md.
"""

from photostack.blocks.proxy._accesslog import AccessLog, format_entry
from photostack.blocks.proxy._cache import Buffered, Flights, MicroCache, request_key
from photostack.blocks.proxy._config import (
    PROXY_SETTINGS_KEYS,
    CacheConfig,
    FilterRules,
    GzipConfig,
    HeaderRules,
    ProxyConfig,
    ProxyConfigError,
    ProxyError,
    TlsConfig,
    parse_proxy_settings,
)
from photostack.blocks.proxy._headers import (
    HOP_BY_HOP,
    downstream_headers,
    error_body,
    is_valid_request_id,
    new_request_id,
    request_id_of,
    upstream_headers,
)
from photostack.blocks.proxy._metrics import ProxyMetrics
from photostack.blocks.proxy._policy import (
    CacheDirectives,
    Refusal,
    accepts_gzip,
    apply_header_rules,
    cache_directives,
    check_filter,
    compress,
    freshness_s,
    is_compressible,
    is_shareable,
    stale_window_s,
)
from photostack.blocks.proxy._server import ProxyServer, serve_proxy
from photostack.blocks.proxy._tls import ensure_self_signed, server_context

__all__ = [
    "HOP_BY_HOP",
    "PROXY_SETTINGS_KEYS",
    "AccessLog",
    "Buffered",
    "CacheConfig",
    "CacheDirectives",
    "FilterRules",
    "Flights",
    "GzipConfig",
    "HeaderRules",
    "MicroCache",
    "ProxyConfig",
    "ProxyConfigError",
    "ProxyError",
    "ProxyMetrics",
    "ProxyServer",
    "Refusal",
    "TlsConfig",
    "accepts_gzip",
    "apply_header_rules",
    "cache_directives",
    "check_filter",
    "compress",
    "downstream_headers",
    "ensure_self_signed",
    "error_body",
    "format_entry",
    "freshness_s",
    "is_compressible",
    "is_shareable",
    "is_valid_request_id",
    "new_request_id",
    "parse_proxy_settings",
    "request_id_of",
    "request_key",
    "serve_proxy",
    "server_context",
    "stale_window_s",
    "upstream_headers",
]
