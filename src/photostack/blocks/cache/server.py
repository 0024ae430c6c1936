"""Run one photostack cache node: ``python -m photostack.blocks.cache.server --port P
--maxmemory-bytes N --policy lru``. SIGTERM or SIGINT stops it (stop accepting, close clients)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from photostack.blocks.cache._errors import UnknownPolicyError
from photostack.blocks.cache._policy import PolicyName, parse_policy_name
from photostack.blocks.cache._server import CacheServer
from photostack.blocks.cache._session import NodeConfig

__all__ = ["main", "serve"]

log = logging.getLogger("photostack.cache")


async def serve(config: NodeConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = CacheServer(config)
    await server.start()
    log.info(
        "cache node ready on %s:%d maxmemory=%d policy=%s",
        config.host,
        server.port,
        config.maxmemory_bytes,
        config.policy.value,
    )
    try:
        await stop.wait()
    finally:
        await server.aclose()
        log.info("cache node stopped")


def _policy(ctx: click.Context, param: click.Parameter, value: str) -> PolicyName:
    try:
        return parse_policy_name(value)
    except UnknownPolicyError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=6379, show_default=True)
@click.option(
    "--maxmemory-bytes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Bound on key+value bytes; 0 is unbounded.",
)
@click.option(
    "--policy",
    default="lru",
    show_default=True,
    callback=_policy,
    help="lru, lfu, random, fifo, lifo, mru or noeviction (or allkeys-lru, ...).",
)
def main(host: str, port: int, maxmemory_bytes: int, policy: PolicyName) -> None:
    """Run one photostack cache node (RESP2, a Redis subset)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = NodeConfig(host=host, port=port, maxmemory_bytes=maxmemory_bytes, policy=policy)
    if sys.platform != "win32":
        import uvloop

        uvloop.run(serve(config))
    else:  # pragma: no cover
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
