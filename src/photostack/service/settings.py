"""Configuration handed to the web and app nodes by the cluster layer.

Plain frozen dataclasses with a JSON round trip, so a node process is started with one file and
the settings a test builds by hand are the same objects the supervisor writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AppSettings", "Peer", "ShardDsns", "WebSettings"]


@dataclass(frozen=True)
class Peer:
    """A node reachable over HTTP."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class ShardDsns:
    """One shard of a storage group: its primary and its replicas, as libpq URLs."""

    index: int
    primary: str
    replicas: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebSettings:
    name: str
    app_nodes: tuple[Peer, ...]
    token_secret_path: Path
    max_body_bytes: int = 1 << 20
    app_timeout_s: float = 5.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> WebSettings:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            name=raw["name"],
            app_nodes=tuple(Peer(**p) for p in raw["app_nodes"]),
            token_secret_path=Path(raw["token_secret_path"]),
            max_body_bytes=raw["max_body_bytes"],
            app_timeout_s=raw["app_timeout_s"],
        )


@dataclass(frozen=True)
class AppSettings:
    name: str
    # storage group name ("users", "social", "photos") -> its shards, in index order
    storage: dict[str, tuple[ShardDsns, ...]]
    cache_nodes: tuple[Peer, ...] = ()
    pool_min_size: int = 1
    pool_max_size: int = 10
    statement_timeout_ms: int = 5000
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> AppSettings:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            name=raw["name"],
            storage={
                group: tuple(
                    ShardDsns(s["index"], s["primary"], tuple(s["replicas"])) for s in shards
                )
                for group, shards in raw["storage"].items()
            },
            cache_nodes=tuple(Peer(**p) for p in raw["cache_nodes"]),
            pool_min_size=raw["pool_min_size"],
            pool_max_size=raw["pool_max_size"],
            statement_timeout_ms=raw["statement_timeout_ms"],
            extra=raw["extra"],
        )
