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
    # Real-time events: pub/sub on the cache nodes (none: connections re-read the log instead).
    cache_nodes: tuple[Peer, ...] = ()
    events_max_connections: int = 12_000  # SSE + WebSocket + long polls held at once (then 503)
    events_max_buffered: int = 256  # per connection; a consumer further behind is cut off
    events_heartbeat_s: float = 15.0  # SSE comment / long-poll whitespace at least this often
    events_send_timeout_s: float = 30.0  # a write blocked longer: slow consumer, cut off
    events_resync_s: float = 30.0  # re-read the log this often (1 s without cache nodes)
    events_reconnect_ms: int = 1000  # the SSE retry: hint
    # Uploads (docs/uploads.md): the file part's limit; the media store (media_store_from).
    upload_max_bytes: int = 10 * 1024 * 1024
    media: dict[str, Any] = field(default_factory=dict)

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
            cache_nodes=tuple(Peer(**p) for p in raw.get("cache_nodes", ())),
            **{k: raw[k] for k in _WEB_EVENT_FIELDS if k in raw},
            upload_max_bytes=raw.get("upload_max_bytes", 10 * 1024 * 1024),
            media=raw.get("media", {}),
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
    # Per-user event logs: trimmed to the newest N and to an age; the newest few kept hot in Redis.
    events_keep_count: int = 1000
    events_keep_age_s: float = 7 * 24 * 3600.0
    events_hot_count: int = 100
    events_trim_interval_s: float = 60.0
    # The directory (docs/directory.md): with nodes, storage placement comes from their shard map
    # (polled every directory_poll_s); without, the static hash-mod placement over ``storage``.
    directory_nodes: tuple[Peer, ...] = ()
    directory_poll_s: float = 1.0
    # Absolute media URLs of PHOTO objects (the static host / CDN edge).
    static_base_url: str = "http://127.0.0.1:8081"
    # Cross-shard jobs (service/_jobs.py): the periodic runner on this node (leased per job).
    jobs_enabled: bool = True
    # Cached reads (docs/caching.md): the topology's [cache] product keys, parsed by
    # service._caching.CachingConfig.from_dict ({} = the defaults).
    caching: dict[str, Any] = field(default_factory=dict)
    # The task queue's own database (docs/uploads.md; "" = no uploads: 503) and the feed's
    # FeedConfig keys (fanout_limit, max_items...; {} = the defaults).
    queue_dsn: str = ""
    queue_name: str = "media"
    queue_max_length: int = 100_000
    feed: dict[str, Any] = field(default_factory=dict)
    # Replication (docs/replication.md): group -> {"replication", "consistency",
    # "max_replica_lag_s"}; a group missing here reads from its primary only, cp.
    replication: dict[str, Any] = field(default_factory=dict)
    # Media (docs/media.md): the origins every upload is written to (photostack.blocks.media
    # MediaClient), and the CDN edge's internal purge listener (None: no CDN to purge).
    media_nodes: tuple[Peer, ...] = ()
    cdn_purge: Peer | None = None

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
            **{k: raw[k] for k in _APP_EVENT_FIELDS if k in raw},
            directory_nodes=tuple(Peer(**p) for p in raw.get("directory_nodes", ())),
            **{k: raw[k] for k in _APP_DIRECTORY_FIELDS if k in raw},
            caching=raw.get("caching", {}),
            **{k: raw[k] for k in _APP_UPLOAD_FIELDS if k in raw},
            replication=raw.get("replication", {}),
            media_nodes=tuple(Peer(**p) for p in raw.get("media_nodes", ())),
            cdn_purge=Peer(**raw["cdn_purge"]) if raw.get("cdn_purge") else None,
        )


_WEB_EVENT_FIELDS = (
    "events_max_connections",
    "events_max_buffered",
    "events_heartbeat_s",
    "events_send_timeout_s",
    "events_resync_s",
    "events_reconnect_ms",
)
_APP_EVENT_FIELDS = (
    "events_keep_count",
    "events_keep_age_s",
    "events_hot_count",
    "events_trim_interval_s",
)
_APP_UPLOAD_FIELDS = ("queue_dsn", "queue_name", "queue_max_length", "feed")
_APP_DIRECTORY_FIELDS = ("directory_poll_s", "static_base_url", "jobs_enabled")
