"""Entry point of one photostack node process: `python -m photostack.cluster.node SPEC.json`.

The spec names the role (edge, web, app), its address and its settings; this module only wires
the role's block or service to a server loop. SIGTERM stops the node gracefully (uvicorn drains
in-flight requests; the edge stops accepting, then finishes what it holds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn

__all__ = ["main"]

EXIT_BAD_SPEC = 2


def _serve_asgi(app: Any, host: str, port: int) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
        server_header=False,
        ws_ping_interval=15.0,  # WebSocket heartbeat; a peer silent past the timeout is dropped
        ws_ping_timeout=20.0,
    )
    _DrainingServer(config).run()


class _DrainingServer(uvicorn.Server):
    """Calls the app's ``state.drain()`` (if any) before the graceful shutdown: long-lived
    streams get their reconnect hint (SSE retry + close, WebSocket 1012) instead of a cut.

    SIGUSR1 runs the same drain without stopping: ``photostack stop`` sends it once the node is
    out of its pool, so streams close at once instead of being waited for as requests.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drains: set[asyncio.Task[None]] = set()

    def _drain_hook(self) -> Any:
        return getattr(getattr(self.config.app, "state", None), "drain", None)

    async def startup(self, sockets: Any = None) -> None:
        drain = self._drain_hook()
        if drain is not None:  # before the socket listens: ready implies the handler is there
            loop = asyncio.get_running_loop()

            def on_drain_signal() -> None:
                task = loop.create_task(drain())
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)

            loop.add_signal_handler(signal.SIGUSR1, on_drain_signal)
        await super().startup(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        drain = self._drain_hook()
        if drain is not None:
            await drain()
        await super().shutdown(sockets)


def _run_web(spec: dict[str, Any]) -> None:
    from photostack.blocks.balancer import (
        AdminServer,
        Backend,
        BalancerError,
        BalancerMetrics,
        SmartClient,
        parse_settings,
    )
    from photostack.service.settings import WebSettings
    from photostack.service.web import create_app

    raw = spec["settings"]
    settings = WebSettings.from_json(json.dumps(raw))
    config, weights = parse_settings(raw.get("balancing", {}))
    metrics = BalancerMetrics("photostack_web_appclient")
    client = SmartClient(
        [Backend(p.name, p.host, p.port, weights.get(p.name, 1.0)) for p in settings.app_nodes],
        config,
        hooks=metrics,
    )
    metrics.watch(client.snapshot)
    admin = AdminServer({"app": client.upstream}, registry=metrics.registry)

    async def startup() -> None:
        await client.start()
        if raw.get("admin_socket"):
            await admin.start_unix(Path(raw["admin_socket"]))

    async def shutdown() -> None:
        await admin.aclose()
        await client.aclose()

    app = create_app(
        settings,
        client,
        unavailable_errors=(BalancerError,),
        on_startup=startup,
        on_shutdown=shutdown,
    )
    _serve_asgi(app, spec["host"], spec["port"])


def _run_app(spec: dict[str, Any]) -> None:
    from photostack.service.app import create_app
    from photostack.service.settings import AppSettings

    settings = AppSettings.from_json(json.dumps(spec["settings"]))
    _serve_asgi(create_app(settings), spec["host"], spec["port"])


def _run_edge(spec: dict[str, Any]) -> None:
    import uvloop

    from photostack.blocks.balancer import AdminServer, Backend, parse_settings
    from photostack.blocks.proxy import ProxyConfig, ProxyServer, parse_proxy_settings

    raw = spec["settings"]
    upstream, weights = parse_settings(raw.get("balancing", {}))
    backends = tuple(
        Backend(b["name"], b["host"], b["port"], weights.get(b["name"], 1.0))
        for b in raw["backends"]
    )
    config = ProxyConfig(
        backends=backends,
        listen_host=spec["host"],
        listen_port=spec["port"],
        name=spec["name"],
        upstream=upstream,
    )
    # Proxy features from [edge.proxy] (docs/proxy.md), TLS and log paths resolved by the plan.
    config = parse_proxy_settings(raw.get("proxy", {}), config)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = ProxyServer(config)
        admin = AdminServer({"web": server.upstream}, registry=server.metrics.registry)
        await server.start()
        try:
            if raw.get("admin_socket"):
                await admin.start_unix(Path(raw["admin_socket"]))
            await stop.wait()
        finally:
            await admin.aclose()
            await server.aclose()

    uvloop.run(run())


def _run_directory(spec: dict[str, Any]) -> None:
    from photostack.service.directory import DirectorySettings, create_directory_app

    settings = DirectorySettings.from_json(json.dumps(spec["settings"]))
    _serve_asgi(create_directory_app(settings), spec["host"], spec["port"])


def _run_chaos(spec: dict[str, Any]) -> None:
    from photostack.blocks.chaos import ChaosProxy, LinkConfig, create_chaos_app

    links = [LinkConfig(**link) for link in spec["settings"]["links"]]
    _serve_asgi(create_chaos_app(ChaosProxy(links)), spec["host"], spec["port"])


async def _until_signalled(server: Any) -> None:
    """Start ``server``, serve until SIGINT/SIGTERM, then drain and close it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.aclose()


def _run_media(spec: dict[str, Any]) -> None:
    """A media origin (docs/media.md), on the default event loop: its loop.sendfile is
    os.sendfile (uvloop has none)."""
    from photostack.blocks.media import OriginConfig, OriginServer

    raw = spec["settings"]
    config = OriginConfig(
        name=spec["name"],
        root=Path(raw["root"]),
        host=spec["host"],
        port=spec["port"],
        max_object_bytes=int(raw.get("max_object_bytes", 64 * 1024 * 1024)),
    )
    asyncio.run(_until_signalled(OriginServer(config)))


def _run_cdn(spec: dict[str, Any]) -> None:
    """The CDN edge on the static port, its purge listener on an internal one (docs/media.md)."""
    import uvloop

    from photostack.blocks.media import CdnConfig, CdnServer, Origin

    raw = spec["settings"]
    config = CdnConfig(
        origins=tuple(Origin(o["name"], o["host"], o["port"]) for o in raw["origins"]),
        name=spec["name"],
        host=spec["host"],
        port=spec["port"],
        purge_port=raw.get("purge_port"),
        cache_bytes=int(raw["cache_bytes"]),
        max_entry_bytes=int(raw["max_entry_bytes"]),
        max_object_bytes=int(raw["max_object_bytes"]),
        disk_root=Path(raw["disk_root"]) if raw.get("disk_root") else None,
        disk_cache_bytes=int(raw.get("disk_cache_bytes", 1 << 30)),
        disk_max_entry_bytes=int(raw.get("disk_max_entry_bytes", 64 << 20)),
    )
    uvloop.run(_until_signalled(CdnServer(config)))


_ROLES = {
    "edge": _run_edge,
    "web": _run_web,
    "app": _run_app,
    "directory": _run_directory,
    "chaos": _run_chaos,  # the TCP chaos proxy of drill topologies (docs/chaos.md)
    "media": _run_media,  # a media origin (docs/media.md)
    "cdn": _run_cdn,  # the static host's caching proxy (docs/media.md)
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if len(args) != 1:
        print("usage: python -m photostack.cluster.node SPEC.json", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_SPEC
    try:
        spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        run = _ROLES[spec["role"]]
    except (OSError, ValueError, KeyError) as exc:
        print(f"bad node spec {args[0]}: {exc!r}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_SPEC
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
