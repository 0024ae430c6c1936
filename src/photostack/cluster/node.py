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
    )
    uvicorn.Server(config).run()


def _run_web(spec: dict[str, Any]) -> None:
    from photostack.blocks.balancer import Backend, BalancerError, SmartClient
    from photostack.service.settings import WebSettings
    from photostack.service.web import create_app

    settings = WebSettings.from_json(json.dumps(spec["settings"]))
    client = SmartClient([Backend(p.name, p.host, p.port) for p in settings.app_nodes])
    app = create_app(
        settings, client, unavailable_errors=(BalancerError,), on_shutdown=client.aclose
    )
    _serve_asgi(app, spec["host"], spec["port"])


def _run_app(spec: dict[str, Any]) -> None:
    from photostack.service.app import create_app
    from photostack.service.settings import AppSettings

    settings = AppSettings.from_json(json.dumps(spec["settings"]))
    _serve_asgi(create_app(settings), spec["host"], spec["port"])


def _run_edge(spec: dict[str, Any]) -> None:
    import uvloop

    from photostack.blocks.balancer import Backend
    from photostack.blocks.proxy import ProxyConfig, ProxyServer

    backends = tuple(Backend(b["name"], b["host"], b["port"]) for b in spec["settings"]["backends"])
    config = ProxyConfig(
        backends=backends, listen_host=spec["host"], listen_port=spec["port"], name=spec["name"]
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = ProxyServer(config)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.aclose()

    uvloop.run(run())


_ROLES = {"edge": _run_edge, "web": _run_web, "app": _run_app}


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
