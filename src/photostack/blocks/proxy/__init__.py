"""HTTP proxy pieces: the edge reverse proxy and its header rules.

The proxy is one more user of the balancer's upstream core: same backend choice, passive
health, keep-alive pools and retry rule as the smart client. Start it with
``ProxyServer(config).start()`` / ``aclose()``, or run ``serve_proxy(config)`` until cancelled.
"""

from photostack.blocks.proxy._config import ProxyConfig
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
from photostack.blocks.proxy._server import ProxyServer, serve_proxy

__all__ = [
    "HOP_BY_HOP",
    "ProxyConfig",
    "ProxyMetrics",
    "ProxyServer",
    "downstream_headers",
    "error_body",
    "is_valid_request_id",
    "new_request_id",
    "request_id_of",
    "serve_proxy",
    "upstream_headers",
]
