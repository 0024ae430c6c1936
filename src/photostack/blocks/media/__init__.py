"""Media: the content-addressed origin, the client that writes to every origin, the CDN edge.

- ``ContentStore``: files by key (the sha256 of the bytes) in sharded directories, with the
  content type sniffed from the bytes stored beside them.
- ``OriginServer``: ``GET``/``HEAD /media/{key}`` (strong ETag, immutable Cache-Control, Range,
  If-None-Match, sendfile) and the internal ``PUT``/``DELETE``.
- ``MediaClient``: ``put(data) -> MediaObject`` on every origin before returning (else
  ``MediaUnavailable``), ``get``, ``delete`` (origins, then the CDN purge), ``purge``.
- ``CdnServer``: the static host: a byte-bounded in-memory cache over a byte-bounded disk tier
  (``DiskTier``), collapsed misses, origin failover, stale-while-revalidate, ``PURGE`` (both
  tiers) on an internal port.

See docs/media.md.
"""

from photostack.blocks.media._cdn import CdnConfig, CdnServer, FetchOutcome
from photostack.blocks.media._cdn_cache import CachedObject, CacheState, CdnCache, CdnCacheStats
from photostack.blocks.media._cdn_disk import DiskIndex, DiskStats, DiskTier, DiskTierConfig
from photostack.blocks.media._cdn_disk import file_name as disk_file_name
from photostack.blocks.media._client import MediaClient, MediaObject
from photostack.blocks.media._errors import (
    HashMismatch,
    InvalidKey,
    MediaError,
    MediaNotFound,
    MediaUnavailable,
    ObjectTooLarge,
)
from photostack.blocks.media._flights import Flights
from photostack.blocks.media._http import HttpLimits
from photostack.blocks.media._keys import (
    KEY_LENGTH,
    check_key,
    is_valid_key,
    key_of,
    shard_parts,
    sniff_content_type,
)
from photostack.blocks.media._origin import MEDIA_PREFIX, OriginConfig, OriginServer
from photostack.blocks.media._origins import Origin, OriginSet
from photostack.blocks.media._rules import (
    IMMUTABLE_CACHE_CONTROL,
    ByteRange,
    Freshness,
    RangeVerdict,
    Selection,
    etag_matches,
    parse_cache_control,
    parse_range,
    select,
)
from photostack.blocks.media._store import ContentStore, StoredObject

__all__ = [
    "IMMUTABLE_CACHE_CONTROL",
    "KEY_LENGTH",
    "MEDIA_PREFIX",
    "ByteRange",
    "CacheState",
    "CachedObject",
    "CdnCache",
    "CdnCacheStats",
    "CdnConfig",
    "CdnServer",
    "ContentStore",
    "DiskIndex",
    "DiskStats",
    "DiskTier",
    "DiskTierConfig",
    "FetchOutcome",
    "Flights",
    "Freshness",
    "HashMismatch",
    "HttpLimits",
    "InvalidKey",
    "MediaClient",
    "MediaError",
    "MediaNotFound",
    "MediaObject",
    "MediaUnavailable",
    "ObjectTooLarge",
    "Origin",
    "OriginConfig",
    "OriginServer",
    "OriginSet",
    "RangeVerdict",
    "Selection",
    "StoredObject",
    "check_key",
    "disk_file_name",
    "etag_matches",
    "is_valid_key",
    "key_of",
    "parse_cache_control",
    "parse_range",
    "select",
    "shard_parts",
    "sniff_content_type",
]
