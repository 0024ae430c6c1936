"""The supervisor: spawns every node, waits for readiness, restarts crashes, stops in phases.

Like uvicorn's multiprocess supervisor: signal handlers only record; the main loop acts. Start-up
goes in dependency order (storage primaries, replicas, caches, app, web, edge) and shutdown in the
reverse one, so a primary always stops before its synchronous standby and no tier loses the tier it
calls while it still serves requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from photostack.cluster.engines import run_as
from photostack.cluster.engines.base import Engine, EngineError
from photostack.cluster.state import NodeLifecycle, NodeState, RestartPolicy
from photostack.cluster.topology import NodeSpec, Role

__all__ = [
    "CommandRefused",
    "ManagedNode",
    "StartupError",
    "Supervisor",
    "SupervisorConfig",
    "install_signal_handlers",
]

log = logging.getLogger("photostack.supervisor")


class StartupError(Exception):
    """The cluster cannot come up. ``str(exc)`` is a one-line reason for the user."""


@dataclass(frozen=True)
class SupervisorConfig:
    ready_timeout_s: dict[Role, float] = field(
        default_factory=lambda: {
            Role.STORAGE: 120.0,
            Role.CACHE: 20.0,
            Role.APP: 45.0,
            Role.DIRECTORY: 45.0,
            Role.WEB: 45.0,
            Role.EDGE: 30.0,
            Role.WORKER: 45.0,
            Role.CHAOS: 20.0,
            Role.MEDIA: 20.0,
            Role.CDN: 20.0,
        }
    )
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(eq=False)
class ManagedNode:
    """One node under supervision: its spec, its engine, its process and its history."""

    spec: NodeSpec
    engine: Engine
    log_path: Path
    lifecycle: NodeLifecycle
    process: asyncio.subprocess.Process | None = None
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    consecutive_crashes: int = 0
    last_exit_code: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def describe(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "name": self.name,
            "role": self.spec.role.value,
            "group": self.spec.group,
            "shard": self.spec.shard,
            "replica_of": self.spec.replica_of,
            "address": self.spec.address,
            "pid": self.pid,
            "state": self.lifecycle.state.value,
            "restarts": self.restarts,
            "uptime_s": round(now - self.started_at, 1) if self.started_at and self.pid else None,
            "last_exit_code": self.last_exit_code,
            "log": str(self.log_path),
        }


Listener = Callable[[str], None]
ReadyHook = Callable[[ManagedNode], Coroutine[Any, Any, None]]


class Supervisor:
    """Owns every node's process. All methods run on one event loop."""

    def __init__(
        self,
        nodes: Iterable[ManagedNode],
        phases: list[list[str]],
        config: SupervisorConfig | None = None,
        on_event: Listener | None = None,
        on_spawn: Callable[[], None] | None = None,
    ) -> None:
        self.nodes: dict[str, ManagedNode] = {n.name: n for n in nodes}
        self.phases = phases  # start order; shutdown walks it backwards
        self.config = config or SupervisorConfig()
        self._on_event = on_event or (lambda line: None)
        self._on_spawn = on_spawn or (lambda: None)  # e.g. record pids for leftover clean-up
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutting_down = False
        self._log_files: dict[str, IO[bytes]] = {}
        # Called (as a task) each time a node becomes READY: membership re-joins drained nodes.
        self.on_ready: ReadyHook | None = None
        # Awaited before a node is (re)started: after a failover a storage node learns here that
        # it comes back as a replica (cluster/_roles.py; docs/replication.md).
        self.before_launch: ReadyHook | None = None
        # Long-running tasks started with the health loop (the role keeper's reconciliation).
        self.watchers: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def add_node(self, node: ManagedNode, *, like: str) -> None:
        """Supervise a node created at run time; it starts and stops in ``like``'s phase."""
        if node.name in self.nodes:
            raise CommandRefused(f"{node.name} exists already")
        self.nodes[node.name] = node
        for phase in self.phases:
            if like in phase:
                phase.append(node.name)
                return
        self.phases.append([node.name])

    # -- start-up ------------------------------------------------------------------------------

    async def start_phase(self, names: list[str]) -> None:
        """Prepare and start a group of nodes concurrently; raise StartupError if any fails."""
        results = await asyncio.gather(
            *(self._launch(self.nodes[name], fatal=True) for name in names), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, StartupError):
                    raise result
                if isinstance(result, EngineError):
                    raise StartupError(str(result)) from result
                raise result

    async def _launch(self, node: ManagedNode, *, fatal: bool) -> None:
        if self.before_launch is not None and not fatal:
            await self.before_launch(node)
        async with node.lock:
            if self._shutting_down:
                return
            try:
                await asyncio.to_thread(node.engine.prepare)
            except EngineError as exc:
                node.lifecycle.become(NodeState.FAILED)
                self._emit(f"{node.name} failed: {exc}")
                if fatal:
                    raise StartupError(f"{node.name}: {exc}") from exc
                return
            process = await self._spawn(node)
        deadline = time.monotonic() + self.config.ready_timeout_s[node.spec.role]
        while time.monotonic() < deadline:
            if process.returncode is not None or node.process is not process:
                break
            if await node.engine.probe(self.config.probe_timeout_s):
                if node.process is process and node.lifecycle.state is NodeState.STARTING:
                    node.lifecycle.become(NodeState.READY)
                    node.ready_at = time.monotonic()
                    self._emit(f"{node.name} ready (pid {process.pid}, {node.spec.address})")
                    if self.on_ready is not None:
                        self._track(self.on_ready(node))
                return
            await asyncio.sleep(0.1)  # poll interval under a deadline, not synchronisation
        if process.returncode is not None:
            reason = (
                f"exited with code {process.returncode} while starting; {_last_line(node.log_path)}"
            )
        else:
            reason = f"not ready within {self.config.ready_timeout_s[node.spec.role]:.0f}s"
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # the watcher restarts it with back-off unless this is fatal
        self._emit(f"{node.name} {reason}")
        if fatal:
            raise StartupError(f"{node.name} {reason} (log: {node.log_path})")

    async def _spawn(self, node: ManagedNode) -> asyncio.subprocess.Process:
        spec = node.engine.process_spec()
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        old = self._log_files.pop(node.name, None)
        if old is not None:
            old.close()
        log_file = node.log_path.open("ab", buffering=0)
        self._log_files[node.name] = log_file
        log_file.write(f"--- photostack: starting {node.name}: {' '.join(spec.argv)}\n".encode())
        env = {**os.environ, **spec.env}
        try:
            identity = run_as(spec.user)  # user, group and no supplementary groups: drop root fully
        except EngineError as exc:
            node.lifecycle.become(NodeState.FAILED)
            raise StartupError(f"{node.name}: {exc}") from exc
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                cwd=spec.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                user=identity.user,
                group=identity.group,
                extra_groups=identity.extra_groups,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops us in order
            )
        except OSError as exc:
            node.lifecycle.become(NodeState.FAILED)
            raise StartupError(f"{node.name}: cannot run {spec.argv[0]}: {exc.strerror}") from exc
        node.lifecycle.become(NodeState.STARTING)
        node.process = process
        node.started_at = time.monotonic()
        self._on_spawn()
        self._track(self._watch(node, process))
        return process

    async def _watch(self, node: ManagedNode, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        node.last_exit_code = code
        if node.process is not process:
            return
        node.process = None
        if node.lifecycle.state is NodeState.STOPPING or self._shutting_down:
            return
        uptime_s = time.monotonic() - (node.started_at or time.monotonic())
        node.consecutive_crashes = self.config.restart.crashes_after(
            node.consecutive_crashes, uptime_s
        )
        delay_s = self.config.restart.delay_s(node.consecutive_crashes)
        node.lifecycle.become(NodeState.BACKOFF)
        self._emit(f"{node.name} exited (code {code}); restarting in {delay_s:.2f}s")
        await asyncio.sleep(delay_s)  # back-off is the point of this wait
        if node.lifecycle.state is NodeState.BACKOFF and not self._shutting_down:
            node.restarts += 1
            await self._launch(node, fatal=False)

    # -- health --------------------------------------------------------------------------------

    async def watch_health(self) -> None:
        """Probe every running node forever; flip READY <-> UNHEALTHY."""
        for watcher in self.watchers:
            self._track(watcher())
        while not self._shutting_down:
            await asyncio.gather(*(self._probe(n) for n in self.nodes.values()))
            await asyncio.sleep(self.config.probe_interval_s)

    async def _probe(self, node: ManagedNode) -> None:
        if node.lifecycle.state not in (NodeState.READY, NodeState.UNHEALTHY):
            return
        ok = await node.engine.probe(self.config.probe_timeout_s)
        state = node.lifecycle.state
        if ok and state is NodeState.UNHEALTHY:
            node.lifecycle.become(NodeState.READY)
            self._emit(f"{node.name} healthy again")
        elif not ok and state is NodeState.READY and node.process is not None:
            node.lifecycle.become(NodeState.UNHEALTHY)
            self._emit(f"{node.name} unhealthy: readiness probe failed")

    # -- commands ------------------------------------------------------------------------------

    def kill(self, name: str) -> ManagedNode:
        """SIGKILL a node's process, as a crash would; the supervisor restarts it."""
        node = self.nodes[name]
        if node.process is None:
            raise CommandRefused(f"{name} has no running process (state {node.lifecycle.state})")
        with contextlib.suppress(ProcessLookupError):
            node.process.kill()
        self._emit(f"{name} killed (SIGKILL) by request")
        return node

    async def stop(self, name: str) -> ManagedNode:
        """Stop a node gracefully; it stays down until started again."""
        node = self.nodes[name]
        async with node.lock:
            state = node.lifecycle.state
            if state is NodeState.STOPPED:
                return node
            if state in (NodeState.BACKOFF, NodeState.PENDING, NodeState.FAILED):
                node.lifecycle.become(NodeState.STOPPED)
                return node
            await self._stop_process(node)
        self._emit(f"{name} stopped by request")
        return node

    async def start(self, name: str) -> ManagedNode:
        node = self.nodes[name]
        if node.lifecycle.state not in (NodeState.STOPPED, NodeState.FAILED, NodeState.PENDING):
            raise CommandRefused(f"{name} is {node.lifecycle.state}, not stopped")
        node.consecutive_crashes = 0
        self._track(self._launch(node, fatal=False))
        return node

    async def _stop_process(self, node: ManagedNode) -> None:
        process = node.process
        if process is None:
            if node.lifecycle.can_become(NodeState.STOPPED):
                node.lifecycle.become(NodeState.STOPPED)
            return
        spec = node.engine.process_spec()
        node.lifecycle.become(NodeState.STOPPING)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(spec.stop_signal)
        try:
            await asyncio.wait_for(process.wait(), spec.stop_timeout_s)
        except TimeoutError:
            self._emit(f"{node.name} did not stop in {spec.stop_timeout_s:.0f}s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        node.process = None
        node.lifecycle.become(NodeState.STOPPED)

    # -- shutdown ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop every node, phase by phase in reverse start order."""
        self._shutting_down = True
        for phase in reversed(self.phases):
            await asyncio.gather(*(self._stop_for_shutdown(self.nodes[n]) for n in phase))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for log_file in self._log_files.values():
            log_file.close()
        self._log_files.clear()

    async def _stop_for_shutdown(self, node: ManagedNode) -> None:
        if node.process is not None:
            await self._stop_process(node)

    # -- helpers -------------------------------------------------------------------------------

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task failed", exc_info=task.exception())

    def _emit(self, line: str) -> None:
        log.info(line)
        self._on_event(line)

    def pids(self) -> dict[str, int]:
        return {n.name: n.pid for n in self.nodes.values() if n.pid is not None}


class CommandRefused(Exception):
    """A control command that the node's current state does not allow (answered with 409)."""


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            lines = [ln for ln in handle.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return f"last log line: {lines[-1].strip()[:200]}" if lines else "log is empty"


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM only record the request; the main loop performs the shutdown."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
