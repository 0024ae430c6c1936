"""Engines: how photostack prepares, starts and probes real servers (Postgres, Redis, ...)."""

from photostack.cluster.engines._pginstall import (
    PostgresInstall,
    discard_postgres_data,
    postgres_data_home,
    prepare_postgres_install,
)
from photostack.cluster.engines._ports import ensure_port_free
from photostack.cluster.engines._sysuser import RUN_USER, RunAs, run_as
from photostack.cluster.engines.base import Engine, EngineError, ProcessSpec
from photostack.cluster.engines.cachenode import CacheNodeConfig, CacheNodeEngine
from photostack.cluster.engines.nginx import NginxBackend, NginxConfig, NginxEngine
from photostack.cluster.engines.postgres import (
    PostgresConfig,
    PostgresEngine,
    ensure_database,
    postgres_dsn,
    replication_state,
)
from photostack.cluster.engines.redis import RedisConfig, RedisEngine

__all__ = [
    "RUN_USER",
    "CacheNodeConfig",
    "CacheNodeEngine",
    "Engine",
    "EngineError",
    "NginxBackend",
    "NginxConfig",
    "NginxEngine",
    "PostgresConfig",
    "PostgresEngine",
    "PostgresInstall",
    "ProcessSpec",
    "RedisConfig",
    "RedisEngine",
    "RunAs",
    "discard_postgres_data",
    "ensure_database",
    "ensure_port_free",
    "postgres_data_home",
    "postgres_dsn",
    "prepare_postgres_install",
    "replication_state",
    "run_as",
]
