"""The directory's errors: one root, families by cause."""

from __future__ import annotations

__all__ = [
    "DirectoryError",
    "DirectoryUnavailableError",
    "MapFormatError",
    "StaleMapError",
    "UnknownGroupError",
    "WrongShardError",
]


class DirectoryError(Exception):
    """Root of every error raised by the directory service and its clients."""


class MapFormatError(DirectoryError, ValueError):
    """A shard map document that is not well formed (answered 422)."""


class StaleMapError(DirectoryError):
    """A map whose version does not move forward (answered 409)."""


class UnknownGroupError(DirectoryError, LookupError):
    """A storage group the map does not have."""


class DirectoryUnavailableError(DirectoryError):
    """No directory node answered (each one was tried in turn)."""


class WrongShardError(DirectoryError):
    """A storage shard does not own the key's logical shard (like a Redis MOVED).

    ``shard_version`` is the newest map version the shard has recorded: the client refreshes
    its map and retries once.
    """

    def __init__(self, group: str, logical_shard: int, shard_version: int) -> None:
        super().__init__(
            f"{group} shard does not own logical shard {logical_shard} "
            f"(the shard is at map version {shard_version})"
        )
        self.group = group
        self.logical_shard = logical_shard
        self.shard_version = shard_version
