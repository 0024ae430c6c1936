"""The benchmark anchor: a bare uvicorn hello-world, one process, uvloop + httptools.

Run as ``python -m photostack.ops._bench_hello``. It binds an ephemeral port itself, prints
``listening: PORT`` once the socket accepts connections (the kernel queues them until uvicorn
takes over), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

__all__ = ["BODY", "READY_PREFIX", "app", "main"]

READY_PREFIX = "listening: "
BODY = b'{"message":"hello, world"}'
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode("ascii")),
]
_BACKLOG = 2048  # uvicorn's own default

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: every HTTP request gets the same small JSON body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(host: str = "127.0.0.1") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(_BACKLOG)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        access_log=False,
        lifespan="off",
        log_level="warning",
    )
    print(f"{READY_PREFIX}{sock.getsockname()[1]}", flush=True)  # noqa: T201 - the parent reads it
    uvicorn.Server(config).run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
