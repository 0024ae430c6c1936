"""nginx as an alternative CDN edge (``[cdn] engine = "nginx"``), rendered from the topology.

The same contract as the photostack CDN (docs/media.md): ``proxy_cache`` bounded in bytes
(``max_size``) with ``proxy_cache_lock`` (one origin fetch per key for concurrent misses),
``proxy_next_upstream`` over both origins on errors, timeouts, 5xx **and 404** (a copy may be
missing on one origin), ``proxy_cache_use_stale`` + ``proxy_cache_background_update``
(stale-while-revalidate and stale-if-error from the origin's Cache-Control), ``X-Cache`` from
``$upstream_cache_status``, Range and If-None-Match answered from the cache.

Purge: open-source nginx has no purge directive, so the internal purge listener turns
``PURGE /media/{key}`` into an internal GET (``error_page`` redirects change the method to GET)
that bypasses the cache (``proxy_cache_bypass``) and stores the origin's fresh answer under the
same cache key: the new object if it still exists, else the origin's 404, which the edge keeps
one second (``proxy_cache_valid 404 1s``) before asking the origins again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from photostack.cluster.engines.base import EngineError
from photostack.cluster.engines.nginx import (
    NginxBackend,
    NginxConfig,
    NginxEngine,
)

__all__ = ["NginxCdnConfig", "NginxCdnEngine", "render_nginx_cdn_conf"]

_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "cache")
_KEY_PATTERN = "[0-9a-f]{64}"


@dataclass(frozen=True, kw_only=True)
class NginxCdnConfig:
    """One nginx CDN edge. Sizes in bytes, times in seconds."""

    name: str
    host: str
    port: int
    purge_port: int | None
    origins: tuple[tuple[str, str, int], ...]  # (name, host, port)
    prefix: Path
    log_path: Path
    cache_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = 16 * 1024 * 1024
    workers: int = 1
    origin_timeout_s: float = 10.0
    connect_timeout_s: float = 1.0
    fail_timeout_s: float = 1.0
    stop_timeout_s: float = 10.0


def _ms(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_nginx_cdn_conf(config: NginxCdnConfig, temp_root: Path, *, user: str | None) -> str:
    """The whole nginx.conf of a CDN edge (temp and cache directories under ``temp_root``)."""
    if not config.origins:
        raise EngineError("an nginx CDN needs at least one origin")
    t = temp_root
    keys_zone_mb = max(1, config.cache_bytes // (256 * 1024 * 1024)) * 10  # ~80k keys per 10m
    origin_rules = [
        "proxy_pass http://media_origins;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_cache cdn;",
        "proxy_cache_key $media_uri;",
        "proxy_cache_valid 404 1s;",  # a purged or missing object is asked for again soon
        "proxy_cache_lock on;",  # collapsed forwarding of concurrent misses
        f"proxy_cache_lock_timeout {_ms(config.origin_timeout_s)};",
        f"proxy_cache_lock_age {_ms(config.origin_timeout_s)};",
        "proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;",
        "proxy_cache_background_update on;",  # stale-while-revalidate
        "proxy_cache_revalidate on;",
        # Failover: any error, and a 404 from one origin tries the other.
        "proxy_next_upstream error timeout http_404 http_500 http_502 http_503 http_504;",
        f"proxy_next_upstream_tries {len(config.origins)};",
        f"proxy_connect_timeout {_ms(config.connect_timeout_s)};",
        f"proxy_read_timeout {_ms(config.origin_timeout_s)};",
        "proxy_hide_header X-Served-By;",
        "add_header X-Cache $upstream_cache_status always;",
    ]
    lines = [
        "# Rendered by photostack from the topology; edits are overwritten at the next start.",
        "daemon off;",
        "master_process on;",
        f"worker_processes {config.workers};",
        f"pid {config.prefix / 'nginx.pid'};",
        "error_log stderr warn;",
        *([f"user {user};"] if user is not None else []),
        "events { worker_connections 4096; }",
        "http {",
    ]
    http = [
        "server_tokens off;",
        "access_log off;",
        "default_type application/octet-stream;",
        "sendfile on;",
        "tcp_nopush on;",
        "keepalive_requests 100000;",
        f"client_body_temp_path {t / 'client_body'};",
        f"proxy_temp_path {t / 'proxy'};",
        f"fastcgi_temp_path {t / 'fastcgi'};",
        f"uwsgi_temp_path {t / 'uwsgi'};",
        f"scgi_temp_path {t / 'scgi'};",
        f"proxy_cache_path {t / 'cache'} levels=1:2 keys_zone=cdn:{keys_zone_mb}m "
        f"max_size={config.cache_bytes} inactive=7d use_temp_path=off;",
        f"proxy_max_temp_file_size {config.max_entry_bytes};",
        "upstream media_origins {",
    ]
    for _name, host, port in config.origins:
        http.append(
            f"    server {_addr(host, port)} max_fails=1 "
            f"fail_timeout={max(1, round(config.fail_timeout_s))}s;"
        )
    http += ["    keepalive 32;", "}"]
    http += [
        "server {",
        f"    listen {_addr(config.host, config.port)} backlog=1024;",
        "    location = /healthz {",
        "        default_type application/json;",
        '        return 200 \'{"status":"ok"}\';',
        "    }",
        f'    location ~ "^(?<media_uri>/media/{_KEY_PATTERN})$" {{',
        '        if ($request_method !~ "^(GET|HEAD)$") { return 405; }',
        *("        " + rule for rule in origin_rules),
        "    }",
        "    location /media/ {",
        "        default_type application/json;",
        '        return 400 \'{"error":{"code":"invalid_key","message":"a media key is 64 '
        "lowercase hex\"}}';",
        "    }",
        "    location / {",
        "        default_type application/json;",
        '        return 404 \'{"error":{"code":"not_found","message":"no such path"}}\';',
        "    }",
        "}",
    ]
    if config.purge_port is not None:
        purge_rules = [r for r in origin_rules if not r.startswith("proxy_cache_lock")]
        http += [
            "server {",
            f"    listen {_addr(config.host, config.purge_port)};",
            "    location = /healthz {",
            "        default_type application/json;",
            '        return 200 \'{"status":"ok"}\';',
            "    }",
            f'    location ~ "^/media/{_KEY_PATTERN}$" {{',
            '        if ($request_method !~ "^(PURGE|DELETE)$") { return 405; }',
            "        error_page 418 = /_purge$uri;",  # internal redirect: the method becomes GET
            "        return 418;",
            "    }",
            f'    location ~ "^/_purge(?<media_uri>/media/{_KEY_PATTERN})$" {{',
            "        internal;",
            "        proxy_cache_bypass 1;",
            *("        " + rule.replace("proxy_pass http://media_origins;",
                                       "proxy_pass http://media_origins$media_uri;")
              for rule in purge_rules),
            "    }",
            "}",
        ]  # fmt: skip
    lines += ["    " + line for line in http]
    lines.append("}")
    return "\n".join(lines) + "\n"


class NginxCdnEngine(NginxEngine):
    """The edge's nginx engine (binary, foreground process, SIGQUIT, probe) with a CDN config."""

    def __init__(self, config: NginxCdnConfig) -> None:
        super().__init__(
            NginxConfig(
                name=config.name,
                host=config.host,
                port=config.port,
                backends=tuple(NginxBackend(n, h, p) for n, h, p in config.origins),
                prefix=config.prefix,
                log_path=config.log_path,
                stop_timeout_s=config.stop_timeout_s,
            )
        )
        self.cdn_config = config

    def _ports(self) -> list[int]:
        cfg = self.cdn_config
        return [cfg.port] if cfg.purge_port is None else [cfg.port, cfg.purge_port]

    def _render(self, temp: Path, user: str | None) -> str:
        return render_nginx_cdn_conf(self.cdn_config, temp, user=user)
