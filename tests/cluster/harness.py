"""A real cluster through the CLI: `photostack up` on the small topology, driven over HTTP."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from photostack.cluster.engines import discard_postgres_data
from photostack.cluster.topology import bundled_topology

READY_DEADLINE_S = 240.0

# The three data groups on one unreplicated shard each: the smallest storage a test cluster needs.
ONE_SHARD_STORES = """
[storage.users]
shards = 1
replicas = 0

[storage.social]
shards = 1
replicas = 0

[storage.photos]
shards = 1
replicas = 0
"""


def free_port_base() -> int:
    """A port base whose whole block (base .. base+199: public, control and every internal port
    of the test topologies) is free now. Blocks start at a random offset so concurrent runs on
    one machine rarely probe the same block first."""
    blocks = list(range(17000, 30000, 200))
    start = random.randrange(len(blocks))
    for base in blocks[start:] + blocks[:start]:
        if all(_is_free(base + i) for i in range(200)):
            return base
    raise RuntimeError("no free port range for a test cluster")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RunningCluster:
    process: subprocess.Popen[str]
    data_dir: Path
    port_base: int
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _pump: threading.Thread | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port_base}"

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.port_base + 10}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return photostack(*args, "--data-dir", str(self.data_dir), check=check)

    def wait_for_line(self, prefix: str, deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"photostack up exited; output:\n{''.join(self.lines)}")
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line in {deadline_s}s; output:\n{''.join(self.lines)}")

    def stop(self, timeout_s: float = 120.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            if self._pump is not None:
                self._pump.join(timeout_s)
            if self.process.stdout is not None:
                self.process.stdout.close()


def photostack(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "photostack.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def start_cluster(data_dir: Path, port_base: int, topology: Path | None = None) -> RunningCluster:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "photostack.cli",
            "up",
            "--topology",
            str(topology or bundled_topology("small")),
            "--data-dir",
            str(data_dir),
            "--port-base",
            str(port_base),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    cluster = RunningCluster(process, data_dir, port_base)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            cluster.lines.append(line)
            cluster._queue.put(line)
        cluster._queue.put(None)

    cluster._pump = threading.Thread(target=pump, daemon=True)
    cluster._pump.start()
    return cluster


@contextlib.contextmanager
def running_cluster(
    data_dir: Path,
    port_base: int | None = None,
    *,
    topology: Path | None = None,
    discard: bool = True,
) -> Iterator[RunningCluster]:
    """A cluster for the block's duration; ``discard`` removes its Postgres data afterwards."""
    cluster = start_cluster(data_dir, port_base or free_port_base(), topology)
    try:
        cluster.wait_for_line("ready: ", READY_DEADLINE_S)
        yield cluster
    finally:
        cluster.stop()
        if discard:
            discard_postgres_data(data_dir)  # as root it lives outside data_dir


@contextlib.contextmanager
def cluster_from_text(
    root: Path, name: str, text: str, port_base: int | None = None
) -> Iterator[RunningCluster]:
    """A cluster on the topology ``text`` (written to ``root/name.toml``), data under ``root``."""
    topology = root / f"{name}.toml"
    topology.write_text(text, encoding="utf-8")
    with running_cluster(root / "data", port_base, topology=topology) as cluster:
        yield cluster


def new_user(api: httpx.Client) -> dict[str, Any]:
    """Register a fresh user through the public API; the answer carries ``id`` and ``token``."""
    r = api.post("/v1/users", json={"username": f"t_{uuid.uuid4().hex[:12]}"})
    assert r.status_code == 201, r.text
    return dict(r.json())
