"""photostack's own node processes (edge, web, app) seen as engines by the supervisor.

Each one is `python -m photostack.cluster.node SPEC.json`; the spec file carries the role and the
role's settings, so a node can be restarted by hand with the same command the supervisor used.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photostack.cluster.engines.base import ProcessSpec

__all__ = ["NodeProcessConfig", "PhotostackNodeEngine", "http_get_status"]


@dataclass(frozen=True)
class NodeProcessConfig:
    name: str
    role: str  # "edge" | "web" | "app"
    host: str
    port: int
    spec_path: Path
    log_path: Path
    settings: dict[str, Any]  # role settings, JSON-ready


class PhotostackNodeEngine:
    """Spawns one of our Python nodes and probes its ``/healthz``."""

    def __init__(self, config: NodeProcessConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def prepare(self) -> None:
        spec = {
            "name": self.config.name,
            "role": self.config.role,
            "host": self.config.host,
            "port": self.config.port,
            "settings": self.config.settings,
        }
        self.config.spec_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config.spec_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.config.spec_path)

    def process_spec(self) -> ProcessSpec:
        return ProcessSpec(
            argv=[sys.executable, "-m", "photostack.cluster.node", str(self.config.spec_path)],
            cwd=self.config.spec_path.parent,
            env={"PYTHONUNBUFFERED": "1"},
            stop_timeout_s=10.0,
        )

    async def probe(self, timeout_s: float) -> bool:
        status = await http_get_status(self.config.host, self.config.port, "/healthz", timeout_s)
        return status == 200


async def http_get_status(host: str, port: int, path: str, timeout_s: float) -> int | None:
    """Status code of one ``GET path``, or None when the node does not answer in time."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])
