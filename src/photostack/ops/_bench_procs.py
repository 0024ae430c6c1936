"""The processes a benchmark starts: the hello anchor and a whole cluster (`photostack up`).

Both are driven the way a user would: a subprocess whose output is watched for a readiness
line with a deadline, stopped with SIGINT. The cluster is then read only through its control
API and used only through its public HTTP API.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from photostack.cluster.topology import layout, load_topology
from photostack.ops._bench_cpu import TierRoots
from photostack.ops._bench_hello import READY_PREFIX as HELLO_READY_PREFIX
from photostack.ops.client import ControlClient, ControlError

__all__ = [
    "BenchError",
    "ClusterNode",
    "ServerProcess",
    "create_user",
    "free_port_base",
    "read_nodes",
    "start_cluster",
    "start_hello",
    "tier_roots",
]

CLUSTER_READY_PREFIX = "ready: "
_PORT_BASE_SEARCH = range(17000, 30000, 100)
_STORAGE_TIER = "postgres"
_OUTPUT_TAIL_LINES = 30


class BenchError(Exception):
    """The benchmark could not run (a target did not start, the API refused...). One line."""


class ServerProcess:
    """A child process whose merged output is kept and can be waited on line by line."""

    def __init__(self, argv: Sequence[str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, name=f"{name}-output", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(
        self, prefix: str, deadline_s: float, echo: Callable[[str], None] | None = None
    ) -> str:
        """The first output line starting with ``prefix``; ``echo`` sees every line until then.

        Raises BenchError if the process exits or ``deadline_s`` passes first (with the last
        output lines in the message, unless ``echo`` has shown them already).
        """
        end = time.monotonic() + deadline_s
        while True:
            remaining_s = end - time.monotonic()
            if remaining_s <= 0:
                tail = "" if echo else self.tail()
                raise BenchError(f"{self.name}: no {prefix!r} line in {deadline_s:.0f}s{tail}")
            try:
                line = self._queue.get(timeout=remaining_s)
            except queue.Empty:
                continue
            if line is None:
                code = self.process.wait()
                tail = "" if echo else self.tail()
                raise BenchError(f"{self.name} exited with code {code}{tail}")
            if line.startswith(prefix):
                return line.rstrip("\n")
            if echo is not None:
                echo(f"  {self.name}: {line.rstrip()}")

    def stop(self, timeout_s: float) -> int:
        """SIGINT, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def tail(self) -> str:
        """The last lines of output, formatted to follow an error message."""
        lines = self.lines[-_OUTPUT_TAIL_LINES:]
        return "; last output:\n" + "".join(lines) if lines else ""

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)


def start_hello(deadline_s: float) -> tuple[ServerProcess, int]:
    """Start the uvicorn hello anchor; returns it and its port. Raises BenchError."""
    server = ServerProcess([sys.executable, "-m", "photostack.ops._bench_hello"], "hello")
    try:
        line = server.wait_for_line(HELLO_READY_PREFIX, deadline_s)
    except BenchError:
        server.stop(timeout_s=5.0)
        raise
    return server, int(line.removeprefix(HELLO_READY_PREFIX))


def start_cluster(data_dir: Path, port_base: int) -> ServerProcess:
    """`photostack up` on the default topology (not yet ready: wait for ``ready: ``)."""
    argv = [
        sys.executable,
        "-m",
        "photostack.cli",
        "up",
        "--data-dir",
        str(data_dir),
        "--port-base",
        str(port_base),
    ]
    return ServerProcess(argv, "photostack up")


def free_port_base(host: str = "127.0.0.1") -> int:
    """A port base whose every port in the default topology is free now. Raises BenchError."""
    topology = load_topology(None)
    for base in _PORT_BASE_SEARCH:
        lay = layout(topology, base)
        ports = [lay.api_port, lay.static_port, lay.control_port, *(n.port for n in lay.nodes)]
        if all(_is_free(host, port) for port in ports):
            return base
    raise BenchError("no free port range for a benchmark cluster")


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ClusterNode:
    name: str
    role: str
    group: str | None
    pid: int | None
    state: str


def read_nodes(control_url: str) -> tuple[dict[str, Any], list[ClusterNode]]:
    """The cluster document and its nodes, from the control API. Raises BenchError."""
    try:
        with ControlClient(control_url) as client:
            cluster = client.cluster()
    except ControlError as exc:
        raise BenchError(str(exc)) from exc
    nodes = [
        ClusterNode(
            name=node["name"],
            role=node["role"],
            group=node.get("group"),
            pid=node.get("pid"),
            state=node.get("state", "?"),
        )
        for node in cluster["nodes"]
    ]
    return cluster, nodes


def tier_roots(nodes: Sequence[ClusterNode], tiers: Sequence[str]) -> list[TierRoots]:
    """Group node pids by tier (storage nodes form the ``postgres`` tier).

    Raises BenchError when a node of a measured tier has no process: the figures would be low.
    """
    missing = [n.name for n in nodes if n.pid is None and _tier_of(n) in tiers]
    if missing:
        raise BenchError(f"nodes without a process: {', '.join(missing)}")
    return [
        TierRoots(tier, tuple(n.pid for n in nodes if n.pid is not None and _tier_of(n) == tier))
        for tier in tiers
    ]


def _tier_of(node: ClusterNode) -> str:
    return _STORAGE_TIER if node.role == "storage" else node.role


def create_user(api_url: str, username: str, timeout_s: float = 30.0) -> str:
    """Register ``username`` through the public API; returns the new user's id.

    Raises BenchError when the API refuses or cannot be reached.
    """
    try:
        response = httpx.post(f"{api_url}/v1/users", json={"username": username}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise BenchError(f"POST /v1/users failed: {exc}") from exc
    if response.status_code != 201:
        raise BenchError(f"POST /v1/users answered {response.status_code}: {response.text[:300]}")
    user_id = response.json().get("id")
    if not isinstance(user_id, str):
        raise BenchError(f"POST /v1/users answered without an id: {response.text[:300]}")
    return user_id
