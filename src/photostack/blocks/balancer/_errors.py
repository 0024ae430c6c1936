"""The balancer's one error root and its families, split by cause.

Callers decide by family: a timeout is answered 504, a backend that cannot be reached 503, a
backend that answered nonsense 502. Every upstream error also says which backend it blames and
whether the request may have reached it, because that decides whether a retry is safe.
"""

from __future__ import annotations

__all__ = [
    "BalancerConfigError",
    "BalancerError",
    "IllegalTransition",
    "NoBackendAvailable",
    "PoolTimeout",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class BalancerError(Exception):
    """Root of every error raised by the balancer block."""


class BalancerConfigError(BalancerError, ValueError):
    """Balancing settings that cannot work (unknown key, bad value). One line for the user."""


class IllegalTransition(BalancerError):
    """A state machine was asked for a transition its table does not allow (a bug, not bad luck)."""


class NoBackendAvailable(BalancerError):
    """No backend could be tried: the pool is empty, or every try failed before sending."""


class UpstreamError(BalancerError):
    """One try against one backend failed.

    ``request_sent`` is False only when it is certain that no byte of the request reached the
    backend; the retry rule treats anything else as possibly processed.
    """

    #: Whether this failure is evidence that the backend is unhealthy (passive health check).
    blames_backend: bool = True

    def __init__(self, message: str, *, backend: str, request_sent: bool) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.request_sent = request_sent


class UpstreamTimeout(UpstreamError):
    """The backend did not connect or answer in time."""


class PoolTimeout(UpstreamTimeout):
    """Every pooled connection to the backend stayed busy: our saturation, not its fault."""

    blames_backend = False


class UpstreamConnectError(UpstreamError):
    """The connection was refused, reset or closed by the backend."""


class UpstreamProtocolError(UpstreamError):
    """The backend answered bytes that are not a valid HTTP/1.1 response."""
