"""Port checks shared by every engine."""

from __future__ import annotations

import errno
import socket

from photostack.cluster.engines.base import EngineError

__all__ = ["ensure_port_free"]


def ensure_port_free(host: str, port: int) -> None:
    """Raise EngineError when ``host:port`` cannot be bound by a new listener.

    Engines fail late and verbosely on a taken port (Postgres only in its log); checking first
    gives the user one clear line. SO_REUSEADDR mirrors what servers set, so a port that only
    has TIME_WAIT leftovers counts as free, as it is for the real server.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EngineError(f"port {host}:{port} is already in use") from exc
            raise EngineError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
