"""Caching: eviction policies, a bounded TTL cache, stampede protection, write policies and
the photostack cache node (a RESP2 server).

Policy code is pure (injected clock and randomness); asyncio drives it in ``SingleFlight``,
``ReadThrough``, the write policies and ``CacheServer``. The distributed tier: ``RingCache``
(client-side consistent-hash routing over cache nodes, per-node failure modes, epochs),
``CacheAside`` / ``GlobalReadThrough`` (the global cache's two forms) and ``InvalidationBus``
(pub/sub invalidation of the app nodes' local caches). Run a node with
``python -m photostack.blocks.cache.server --port P --maxmemory-bytes N --policy lru``.
"""

from photostack.blocks.cache._bounded import (
    BoundedCache,
    CacheStats,
    Clock,
    default_sizer,
    make_policy,
)
from photostack.blocks.cache._errors import (
    CacheError,
    CacheFullError,
    DirtySetFullError,
    LogCorruptError,
    UnknownPolicyError,
    WriteBackClosedError,
)
from photostack.blocks.cache._global import (
    CacheAside,
    GlobalLookup,
    GlobalReadThrough,
    GlobalStats,
    RemoteTier,
    decode_envelope,
    encode_envelope,
)
from photostack.blocks.cache._invalidation import BusStats, InvalidationBus
from photostack.blocks.cache._lfu import LFUPolicy
from photostack.blocks.cache._node import NodeCore
from photostack.blocks.cache._policy import (
    FIFOPolicy,
    LIFOPolicy,
    LRUPolicy,
    MRUPolicy,
    NoEvictionPolicy,
    Policy,
    PolicyName,
    RandomPolicy,
    RandomSet,
    parse_policy_name,
)
from photostack.blocks.cache._readthrough import (
    CacheStatus,
    Lookup,
    ReadThrough,
    ReadThroughConfig,
    ReadThroughStats,
)
from photostack.blocks.cache._resp import RequestParser, RespProtocolError
from photostack.blocks.cache._ring_client import (
    CacheNodeAddress,
    RingCache,
    RingCacheConfig,
    RingCacheStats,
)
from photostack.blocks.cache._ring_routing import (
    FailureMode,
    IllegalTransitionError,
    NodeHealth,
    NodeState,
    Route,
    parse_failure_mode,
)
from photostack.blocks.cache._server import CacheServer
from photostack.blocks.cache._session import NodeConfig, Session, parse_memory
from photostack.blocks.cache._stampede import (
    Freshness,
    SingleFlight,
    Stored,
    classify,
    xfetch_refresh_due,
)
from photostack.blocks.cache._wal import WriteAheadLog
from photostack.blocks.cache._write import (
    CacheTier,
    KeyLocks,
    Store,
    WhenFull,
    WriteAround,
    WriteBack,
    WriteBackConfig,
    WriteBackLog,
    WriteBackStats,
    WriteThrough,
)

__all__ = [
    "BoundedCache",
    "BusStats",
    "CacheAside",
    "CacheError",
    "CacheFullError",
    "CacheNodeAddress",
    "CacheServer",
    "CacheStats",
    "CacheStatus",
    "CacheTier",
    "Clock",
    "DirtySetFullError",
    "FIFOPolicy",
    "FailureMode",
    "Freshness",
    "GlobalLookup",
    "GlobalReadThrough",
    "GlobalStats",
    "IllegalTransitionError",
    "InvalidationBus",
    "KeyLocks",
    "LFUPolicy",
    "LIFOPolicy",
    "LRUPolicy",
    "LogCorruptError",
    "Lookup",
    "MRUPolicy",
    "NoEvictionPolicy",
    "NodeConfig",
    "NodeCore",
    "NodeHealth",
    "NodeState",
    "Policy",
    "PolicyName",
    "RandomPolicy",
    "RandomSet",
    "ReadThrough",
    "ReadThroughConfig",
    "ReadThroughStats",
    "RemoteTier",
    "RequestParser",
    "RespProtocolError",
    "RingCache",
    "RingCacheConfig",
    "RingCacheStats",
    "Route",
    "Session",
    "SingleFlight",
    "Store",
    "Stored",
    "UnknownPolicyError",
    "WhenFull",
    "WriteAheadLog",
    "WriteAround",
    "WriteBack",
    "WriteBackClosedError",
    "WriteBackConfig",
    "WriteBackLog",
    "WriteBackStats",
    "WriteThrough",
    "classify",
    "decode_envelope",
    "default_sizer",
    "encode_envelope",
    "make_policy",
    "parse_failure_mode",
    "parse_memory",
    "parse_policy_name",
    "xfetch_refresh_due",
]
