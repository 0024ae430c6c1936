"""Pure parts of the Redis engine, and the engines package's exports."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import photostack.cluster.engines
import photostack.cluster.engines.testing
from photostack.cluster.engines import RedisConfig, RedisEngine


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def make_engine(**overrides: object) -> RedisEngine:
    values: dict[str, object] = {
        "name": "cache-1",
        "port": 6380,
        "data_dir": Path("/data/cache-1"),
        "log_path": Path("/logs/cache-1.log"),
    }
    values.update(overrides)
    return RedisEngine(RedisConfig(**values))  # type: ignore[arg-type]


def test_cache_node_runs_in_the_foreground_without_persistence() -> None:
    spec = make_engine().process_spec()

    assert Path(spec.argv[0]).name == "redis-server"
    assert option(spec.argv, "--port") == "6380"
    assert option(spec.argv, "--bind") == "127.0.0.1"
    assert option(spec.argv, "--save") == ""
    assert option(spec.argv, "--appendonly") == "no"
    assert option(spec.argv, "--daemonize") == "no"
    assert option(spec.argv, "--logfile") == ""
    assert option(spec.argv, "--dir") == "/data/cache-1"
    assert "--maxmemory" not in spec.argv
    assert spec.user is None


def test_persistence_and_memory_limits_reach_the_command_line() -> None:
    spec = make_engine(
        persistence=True, maxmemory_bytes=64 * 1024 * 1024, maxmemory_policy="allkeys-lru"
    ).process_spec()

    assert option(spec.argv, "--appendonly") == "yes"
    assert option(spec.argv, "--maxmemory") == str(64 * 1024 * 1024)
    assert option(spec.argv, "--maxmemory-policy") == "allkeys-lru"


def test_url_brackets_ipv6() -> None:
    assert make_engine().url == "redis://127.0.0.1:6380/0"
    assert make_engine(host="::1").url == "redis://[::1]:6380/0"


@pytest.mark.parametrize("module", [photostack.cluster.engines, photostack.cluster.engines.testing])
def test_every_export_imports(module: object) -> None:
    reloaded = importlib.import_module(module.__name__)  # type: ignore[attr-defined]
    for name in reloaded.__all__:
        assert getattr(reloaded, name) is not None, name
