"""The chaos block's errors: one root, families by cause."""

from __future__ import annotations

__all__ = [
    "ChaosError",
    "LinkNotFound",
    "NetnsError",
    "NetnsUnavailable",
    "ToxicConfigError",
    "ToxicNotFound",
]


class ChaosError(Exception):
    """Root of every error raised by ``photostack.blocks.chaos``."""


class ToxicConfigError(ChaosError, ValueError):
    """A toxic or link description is malformed (unknown type, bad attribute). Caller's fault."""


class ToxicNotFound(ChaosError, LookupError):
    """No toxic with that id on the link."""


class LinkNotFound(ChaosError, LookupError):
    """No link with that name on the proxy."""


class NetnsError(ChaosError):
    """A network-namespace command failed (``ip`` exited non-zero)."""


class NetnsUnavailable(NetnsError):
    """Network namespaces cannot be used here (not root, no ``ip``, no kernel support)."""
