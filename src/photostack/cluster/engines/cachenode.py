"""The photostack cache node (``photostack.blocks.cache``) as an engine: one Python process
speaking RESP, probed with PING like Redis."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from photostack.blocks.cache import PolicyName
from photostack.cluster.engines._ports import ensure_port_free
from photostack.cluster.engines.base import EngineError, ProcessSpec

__all__ = ["CacheNodeConfig", "CacheNodeEngine"]


@dataclass(frozen=True, kw_only=True)
class CacheNodeConfig:
    """One cache node. ``maxmemory_bytes`` 0 is unbounded; the bound counts key + value bytes."""

    name: str
    port: int
    log_path: Path
    cwd: Path
    host: str = "127.0.0.1"
    maxmemory_bytes: int = 0
    policy: PolicyName = PolicyName.LRU
    stop_timeout_s: float = 10.0


class CacheNodeEngine:
    """Implements :class:`~photostack.cluster.engines.base.Engine` for one photostack cache
    node: ``python -m photostack.blocks.cache.server``."""

    def __init__(self, config: CacheNodeConfig) -> None:
        self._config = config

    def __repr__(self) -> str:
        return f"<CacheNodeEngine {self.name} {self._config.host}:{self._config.port}>"

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> CacheNodeConfig:
        return self._config

    @property
    def url(self) -> str:
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"redis://{host}:{self._config.port}/0"

    def prepare(self) -> None:
        """Check the port. Raises EngineError."""
        ensure_port_free(self._config.host, self._config.port)
        try:
            self._config.cwd.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create {self._config.cwd}: {exc.strerror}") from exc

    def process_spec(self) -> ProcessSpec:
        cfg = self._config
        argv = [
            sys.executable, "-m", "photostack.blocks.cache.server",
            "--host", cfg.host,
            "--port", str(cfg.port),
            "--maxmemory-bytes", str(cfg.maxmemory_bytes),
            "--policy", cfg.policy.value,
        ]  # fmt: skip
        return ProcessSpec(
            argv=argv,
            cwd=cfg.cwd,
            env={"PYTHONUNBUFFERED": "1"},
            stop_timeout_s=cfg.stop_timeout_s,
        )

    async def probe(self, timeout_s: float) -> bool:
        """Ready when PING answers."""
        client = redis.asyncio.Redis(
            host=self._config.host,
            port=self._config.port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await client.ping())
        except (OSError, TimeoutError, redis.exceptions.RedisError):
            return False
        finally:
            await client.aclose()
