"""``[cache]`` in the topology: engine choice, policy and bound; the cache-node engine's argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from photostack.blocks.cache import PolicyName
from photostack.cluster.engines import CacheNodeConfig, CacheNodeEngine
from photostack.cluster.topology import TopologyError, parse_topology

BASE = """
[storage.users]
shards = 1
[storage.social]
shards = 1
[storage.photos]
shards = 1
"""


def _cache(body: str) -> str:
    return f"[cache]\n{body}\n{BASE}"


def test_defaults_are_redis_with_its_own_policy() -> None:
    topo = parse_topology(BASE)
    assert (topo.cache_engine, topo.cache_policy, topo.cache_maxmemory_bytes) == (
        "redis",
        None,
        None,
    )


def test_photostack_engine_with_any_of_our_policies() -> None:
    topo = parse_topology(_cache('engine = "photostack"\npolicy = "mru"\nmaxmemory_bytes = 4096'))
    assert topo.cache_engine == "photostack"
    assert topo.cache_policy is PolicyName.MRU
    assert topo.cache_maxmemory_bytes == 4096


def test_redis_engine_takes_redis_policies_only() -> None:
    topo = parse_topology(_cache('engine = "redis"\npolicy = "allkeys-lfu"'))
    assert topo.cache_policy is PolicyName.LFU
    with pytest.raises(TopologyError, match="needs engine = 'photostack'"):
        parse_topology(_cache('engine = "redis"\npolicy = "fifo"'))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('engine = "memcached"', "engine must be 'redis' or 'photostack'"),
        ('engine = "photostack"\npolicy = "volatile-lru"', "unknown eviction policy"),
        ("maxmemory_bytes = 0", "outside"),
        ("max_memory = 5", "unknown key 'max_memory'"),
    ],
)
def test_bad_cache_tables_are_refused(body: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(_cache(body))


def test_cache_node_engine_spawns_our_server(tmp_path: Path) -> None:
    engine = CacheNodeEngine(
        CacheNodeConfig(
            name="cache-1",
            port=7001,
            log_path=tmp_path / "c.log",
            cwd=tmp_path,
            maxmemory_bytes=1024,
            policy=PolicyName.LFU,
        )
    )
    argv = engine.process_spec().argv
    assert argv[1:3] == ["-m", "photostack.blocks.cache.server"]
    assert argv[argv.index("--policy") + 1] == "allkeys-lfu"
    assert argv[argv.index("--maxmemory-bytes") + 1] == "1024"
    assert engine.url == "redis://127.0.0.1:7001/0"
