"""The nginx edge's config rendered from the same settings (pure; `nginx -t` runs in component)."""

from __future__ import annotations

from pathlib import Path

import pytest

from photostack.cluster.engines.base import EngineError
from photostack.cluster.engines.nginx import (
    NGINX_STRATEGIES,
    NginxBackend,
    NginxConfig,
    render_nginx_conf,
)

TEMP = Path("/tmp/nginx-temp")


def config(**changes: object) -> NginxConfig:
    base: dict[str, object] = {
        "name": "edge-1",
        "host": "127.0.0.1",
        "port": 8080,
        "backends": (
            NginxBackend("web-1", "127.0.0.1", 8101, 2),
            NginxBackend("web-2", "::1", 8102),
        ),
        "prefix": Path("/data/nginx/edge-1"),
        "log_path": Path("/data/logs/edge-1.log"),
    }
    base.update(changes)
    return NginxConfig(**base)  # type: ignore[arg-type]


def test_defaults_proxy_with_keepalive_retries_and_passive_health() -> None:
    text = render_nginx_conf(config(), TEMP, user=None)
    assert "daemon off;" in text
    assert "worker_processes 1;" in text
    assert "user " not in text
    assert "server 127.0.0.1:8101 weight=2 max_fails=1 fail_timeout=2s;" in text
    assert "server [::1]:8102 weight=1" in text
    assert "keepalive 64;" in text
    assert "proxy_next_upstream error timeout;" in text  # never non_idempotent
    assert "non_idempotent" not in text
    assert "proxy_next_upstream_tries 2;" in text  # capped by the backend count
    assert "proxy_set_header Connection $edge_connection;" in text  # keep-alive unless upgrading
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_buffering off;" in text  # streams SSE as it comes
    assert f"proxy_temp_path {TEMP / 'proxy'};" in text
    assert "access_log off;" in text
    assert "gzip on;" not in text
    assert "proxy_cache " not in text


@pytest.mark.parametrize(("strategy", "directive"), sorted(NGINX_STRATEGIES.items()))
def test_strategies(strategy: str, directive: str) -> None:
    text = render_nginx_conf(config(strategy=strategy), TEMP, user=None)
    if directive:
        assert directive in text
    if strategy == "hash":
        assert "map $uri $edge_hash_key" in text


def test_unknown_strategy_and_no_backend_are_refused() -> None:
    with pytest.raises(EngineError, match="no 'weighted-least' strategy"):
        render_nginx_conf(config(strategy="weighted-least"), TEMP, user=None)
    with pytest.raises(EngineError, match="at least one backend"):
        render_nginx_conf(config(backends=()), TEMP, user=None)


def test_features_render() -> None:
    text = render_nginx_conf(
        config(
            access_log_path=Path("/data/logs/edge-1.access.log"),
            gzip=True,
            tls_port=8083,
            tls_cert_path=Path("/data/tls/edge.crt"),
            tls_key_path=Path("/data/tls/edge.key"),
            collapse=True,
            cache_ttl_s=2.0,
            stale_if_error_s=30.0,
            deny_methods=("TRACE",),
            deny_paths=("/admin",),
            request_headers_add=(("X-Edge", "nginx"),),
            request_headers_remove=("X-Debug",),
            response_headers_add=(("X-Frame-Options", "DENY"),),
            response_headers_remove=("Server",),
        ),
        TEMP,
        user="photostack",
    )
    assert "user photostack;" in text
    assert "log_format photostack escape=json" in text
    assert "access_log /data/logs/edge-1.access.log photostack buffer=64k flush=1s;" in text
    assert "gzip_vary on;" in text
    assert "listen 127.0.0.1:8083 ssl backlog=1024;" in text
    assert "ssl_certificate /data/tls/edge.crt;" in text
    assert "proxy_cache_lock on;" in text
    assert "proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;" in text
    assert "proxy_cache_valid" not in text  # with a cache TTL, Cache-Control decides
    assert 'if ($request_method ~ "^(TRACE)$") { return 405; }' in text
    assert 'location ^~ "/admin" {' in text
    assert 'proxy_set_header X-Edge "nginx";' in text
    assert 'proxy_set_header X-Debug "";' in text
    assert 'add_header X-Frame-Options "DENY" always;' in text
    assert "proxy_hide_header Server;" in text
    assert "proxy_buffering off;" not in text


def test_collapse_alone_keeps_entries_one_second() -> None:
    text = render_nginx_conf(config(collapse=True), TEMP, user=None)
    assert "proxy_cache_valid 200 1s;" in text
    assert "proxy_cache_lock on;" in text


def test_values_cannot_inject_directives() -> None:
    with pytest.raises(EngineError):
        render_nginx_conf(config(request_headers_add=(("X-A", "a\n}"),)), TEMP, user=None)
    with pytest.raises(EngineError):
        render_nginx_conf(config(response_headers_add=(("X-A", "$host"),)), TEMP, user=None)
    with pytest.raises(EngineError):
        render_nginx_conf(config(deny_methods=("GET|POST",)), TEMP, user=None)
