"""The engines of the non-storage roles in a plan: edge (photostack or nginx), caches, chaos,
media origins and CDN, workers, and the settings file of every Python node."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

from photostack.blocks.cache import PolicyName
from photostack.cluster._plan_storage import QUEUE_NAME, queue_dsn
from photostack.cluster.datadir import DataDir
from photostack.cluster.engines import CacheNodeConfig, CacheNodeEngine, RedisConfig, RedisEngine
from photostack.cluster.engines.base import Engine, ProcessSpec
from photostack.cluster.nodes import NodeProcessConfig, PhotostackNodeEngine
from photostack.cluster.topology import Layout, NodeSpec, Role
from photostack.service.settings import AppSettings, Peer, WebSettings


def _edge_proxy_settings(lay: Layout, node: NodeSpec, data: DataDir) -> dict[str, object]:
    """``[edge.proxy]`` with ``tls`` and ``access_log`` turned into paths (docs/proxy.md).

    TLS listens on edge-1 only, on ``port base + TLS_PORT_OFFSET``; the certificate is made at
    the first ``up`` under ``DATA/tls`` and reused after.
    """
    proxy: dict[str, object] = dict(lay.topology.edge_proxy)
    if proxy.pop("access_log", False):
        proxy["access_log"] = str(data.logs / f"{node.name}.access.log")
    if proxy.pop("tls", False) and node.port == lay.api_port:
        cert, key = _edge_certificate(lay, data)
        proxy["tls"] = {"port": lay.tls_port, "cert": str(cert), "key": str(key)}
    return proxy


def _edge_certificate(lay: Layout, data: DataDir) -> tuple[Path, Path]:
    from photostack.blocks.proxy import ensure_self_signed

    cert, key = data.root / "tls" / "edge.crt", data.root / "tls" / "edge.key"
    ensure_self_signed(cert, key, hosts=(lay.topology.host,))
    return cert, key


def _nginx_edge(lay: Layout, node: NodeSpec, data: DataDir, webs: list[Peer]) -> Engine:
    """The same edge, rendered as an nginx config (``[edge] engine = "nginx"``)."""
    from photostack.blocks.balancer import parse_settings
    from photostack.cluster.engines.nginx import NginxBackend, NginxConfig, NginxEngine

    upstream, weights = parse_settings(lay.topology.edge_balancing)
    proxy = _edge_proxy_settings(lay, node, data)
    tls = proxy.get("tls")
    tls_paths = tls if isinstance(tls, dict) else {}
    health = upstream.health

    def strings(key: str) -> tuple[str, ...]:
        value = proxy.get(key, [])
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        value = proxy.get(key, {})
        return tuple((str(k), str(v)) for k, v in value.items()) if isinstance(value, dict) else ()

    def number(key: str, default: float) -> float:
        value = proxy.get(key, default)
        return float(value) if isinstance(value, int | float) else default

    return NginxEngine(
        NginxConfig(
            name=node.name,
            host=node.host,
            port=node.port,
            backends=tuple(
                NginxBackend(w.name, w.host, w.port, max(1, round(weights.get(w.name, 1.0))))
                for w in webs
            ),
            prefix=data.root / "nginx" / node.name,
            log_path=data.log_path(node.name),
            strategy=upstream.strategy.value,
            hash_key=upstream.hash_key,
            max_fails=health.eject_after_failures,
            fail_timeout_s=health.ejection_initial_s,
            max_tries=upstream.max_tries,
            connect_timeout_s=upstream.connect_timeout_s,
            request_timeout_s=upstream.request_timeout_s,
            header_timeout_s=number("header_timeout_s", 10.0),
            client_timeout_s=number("client_timeout_s", 60.0),
            max_body_bytes=int(number("max_body_bytes", 12 * 1024 * 1024)),
            max_header_bytes=int(number("max_header_bytes", 16 * 1024)),
            allow_methods=strings("allow_methods"),
            deny_methods=strings("deny_methods"),
            deny_paths=strings("deny_paths"),
            request_headers_add=pairs("request_headers_add"),
            request_headers_remove=strings("request_headers_remove"),
            response_headers_add=pairs("response_headers_add"),
            response_headers_remove=strings("response_headers_remove"),
            access_log_path=Path(str(proxy["access_log"])) if "access_log" in proxy else None,
            gzip=proxy.get("gzip") is True,
            gzip_min_bytes=int(number("gzip_min_bytes", 256)),
            tls_port=int(tls_paths["port"]) if tls_paths else None,
            tls_cert_path=Path(str(tls_paths["cert"])) if tls_paths else None,
            tls_key_path=Path(str(tls_paths["key"])) if tls_paths else None,
            collapse=proxy.get("collapse") is True,
            cache_ttl_s=number("cache_ttl_s", 0.0),
            stale_if_error_s=number("stale_if_error_s", 0.0),
        )
    )


def admin_socket_path(run_dir: Path, name: str) -> Path:
    """Where node ``name`` serves its balancer admin endpoint (a Unix socket).

    Socket paths are limited to about 100 bytes; a deep data dir falls back to a short path in
    the temp dir, named after the full one so two clusters never share it.
    """
    path = run_dir.resolve() / f"{name}.admin.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"photostack-{digest}.sock"


_MAX_SOCKET_PATH = 100


def _cache_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """Redis (the default) or the photostack cache node, as ``[cache] engine`` says."""
    topo = lay.topology
    if topo.cache_engine == "photostack":
        return CacheNodeEngine(
            CacheNodeConfig(
                name=node.name,
                host=node.host,
                port=node.port,
                log_path=data.log_path(node.name),
                cwd=data.redis_dir(node.name),
                maxmemory_bytes=topo.cache_maxmemory_bytes or 0,
                policy=topo.cache_policy or PolicyName.LRU,
            )
        )
    return RedisEngine(
        RedisConfig(
            name=node.name,
            host=node.host,
            port=node.port,
            data_dir=data.redis_dir(node.name),
            log_path=data.log_path(node.name),
            maxmemory_bytes=topo.cache_maxmemory_bytes,
            maxmemory_policy=topo.cache_policy.value if topo.cache_policy else None,
        )
    )


def _via(lay: Layout, role: Role, kind: str) -> list[Peer]:
    """A role's nodes as their consumers over ``kind`` links reach them ([chaos])."""
    return [Peer(n.name, *lay.reach(n, kind)) for n in lay.by_role(role)]


def _chaos_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """The chaos node: one process listening on every [chaos] link (docs/chaos.md)."""
    links = [
        {
            "name": link.name,
            "listen_host": node.host,
            "listen_port": link.port,
            "upstream_host": lay.node(link.upstream).host,
            "upstream_port": lay.node(link.upstream).port,
        }
        for link in lay.links
    ]
    return PhotostackNodeEngine(_node_config(node, data, {"links": links}))


def _media_settings(lay: Layout) -> dict[str, object]:
    """Where uploads and workers store media: the HTTP origins (every put on each) and the
    CDN's purge listener (blocks/media MediaClient via service/_uploads.OriginMediaStore)."""
    base = f"http://{lay.topology.host}:{lay.static_port}"
    origins = [vars(Peer(n.name, n.host, n.port)) for n in lay.by_role(Role.MEDIA)]
    purge = _cdn_purge_peer(lay)
    return {
        "engine": "origins", "base_url": base,
        "origins": origins, "purge": vars(purge) if purge else None,
    }  # fmt: skip


def _cdn_purge_peer(lay: Layout) -> Peer | None:
    cdn = lay.by_role(Role.CDN)
    if not cdn or cdn[0].admin_port is None:
        return None
    return Peer(f"{cdn[0].name}-purge", cdn[0].host, cdn[0].admin_port)


def _media_engine(lay: Layout, node: NodeSpec, data: DataDir) -> Engine:
    """A media origin, or the CDN edge (photostack, or nginx from ``[cdn] engine``)."""
    topo = lay.topology
    origins = [vars(Peer(n.name, n.host, n.port)) for n in lay.by_role(Role.MEDIA)]
    if node.role is Role.CDN and topo.cdn_engine == "nginx":
        from photostack.cluster.engines.nginx_cdn import NginxCdnConfig, NginxCdnEngine

        return NginxCdnEngine(
            NginxCdnConfig(
                name=node.name,
                host=node.host,
                port=node.port,
                purge_port=node.admin_port,
                origins=tuple((str(o["name"]), str(o["host"]), int(o["port"])) for o in origins),
                prefix=data.root / "nginx" / node.name,
                log_path=data.log_path(node.name),
                cache_bytes=topo.cdn_cache_bytes,
                max_entry_bytes=topo.cdn_max_entry_bytes,
            )
        )
    settings: dict[str, object]
    if node.role is Role.MEDIA:
        settings = {
            "root": str(data.root / "media" / node.name),
            "max_object_bytes": topo.media_max_object_bytes,
        }
    else:
        settings = {
            "origins": origins,
            "purge_port": node.admin_port,
            "cache_bytes": topo.cdn_cache_bytes,
            "max_entry_bytes": topo.cdn_max_entry_bytes,
            "max_object_bytes": topo.media_max_object_bytes,
            "disk_root": str(data.root / "cdn" / node.name) if topo.cdn_disk_cache_bytes else None,
            "disk_cache_bytes": topo.cdn_disk_cache_bytes,
            "disk_max_entry_bytes": topo.cdn_disk_max_entry_bytes,
        }
    return PhotostackNodeEngine(_node_config(node, data, settings))


class WorkerEngine(PhotostackNodeEngine):
    """``python -m photostack.blocks.queue.worker`` running the uploads' task registry; its
    collaborators (app nodes, media) in a JSON file named by PHOTOSTACK_TASKS_SETTINGS."""

    def __init__(self, config: NodeProcessConfig, argv: list[str]) -> None:
        super().__init__(config)
        self.argv = argv

    def process_spec(self) -> ProcessSpec:
        from photostack.service.tasks import SETTINGS_ENV

        return ProcessSpec(
            argv=self.argv,
            cwd=self.config.spec_path.parent,
            env={"PYTHONUNBUFFERED": "1", SETTINGS_ENV: str(self.config.spec_path)},
            stop_timeout_s=15.0,
        )


def _worker_engine(lay: Layout, node: NodeSpec, data: DataDir, apps: list[Peer]) -> Engine:
    import sys

    topo = lay.topology
    argv = [
        sys.executable, "-m", "photostack.blocks.queue.worker",
        "--dsn", queue_dsn(lay), "--queue", QUEUE_NAME,
        "--tasks", "photostack.service.tasks:registry",
        "--concurrency", str(topo.worker_concurrency),
        "--visibility-timeout-s", str(topo.worker_visibility_timeout_s),
        "--max-length", str(topo.queue_max_length),
        "--host", node.host, "--port", str(node.port), "--worker-id", node.name,
    ]  # fmt: skip
    settings = {
        "app_nodes": [vars(p) for p in apps],
        "media": _media_settings(lay),
        "balancing": topo.web_balancing,
    }
    return WorkerEngine(
        _node_config(node, data, settings),
        argv,
    )


def _as_dict(settings: WebSettings | AppSettings) -> dict[str, object]:
    import json

    loaded: dict[str, object] = json.loads(settings.to_json())
    return loaded


def _node_config(
    node: NodeSpec, data: DataDir, settings: Mapping[str, object]
) -> NodeProcessConfig:
    """How one of our Python nodes is started: its spec file under run/, its log under logs/."""
    return NodeProcessConfig(
        name=node.name,
        role=node.role.value,
        host=node.host,
        port=node.port,
        spec_path=data.run / f"{node.name}.json",
        log_path=data.log_path(node.name),
        settings=dict(settings),
    )
