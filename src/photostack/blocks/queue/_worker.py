"""The worker runtime: runs registered task handlers with bounded concurrency over any engine.

Task code plugs in as registered async functions (``registry.task("thumbnail")``); the runtime
leases work, extends each lease while its handler runs, reports the outcome, and stops in
phases: stop leasing -> let running handlers finish until ``stop_deadline_s`` -> cancel the rest
and release their leases, so another worker takes them at once instead of after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from photostack.blocks.queue._backend import QueueBackend, ReapResult
from photostack.blocks.queue._errors import (
    IllegalTransition,
    LeaseLost,
    PermanentTaskError,
    QueueConfigError,
    QueueError,
    QueueUnavailable,
)
from photostack.blocks.queue._model import Json, Lease, RetryPolicy, TaskState
from photostack.blocks.queue._policy import heartbeat_interval_s

__all__ = [
    "Handler",
    "TaskContext",
    "TaskRegistry",
    "Worker",
    "WorkerConfig",
    "WorkerHooks",
    "WorkerState",
]

log = logging.getLogger("photostack.queue.worker")


@dataclass(frozen=True)
class TaskContext:
    """What a handler gets: the task and whether an earlier holder lost it mid-run (so the
    handler's effects may already be partly done: make them idempotent, keyed by task id)."""

    task_id: str
    kind: str
    payload: Json
    attempt: int
    redelivered: bool


Handler = Callable[[TaskContext], Awaitable[Json]]


class TaskRegistry:
    """Task kinds -> handlers (and each kind's retry policy). Workers load one by
    ``module:attribute``; producers build their QueueConfig policies from the same one."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._policies: dict[str, RetryPolicy] = {}

    def __repr__(self) -> str:
        return f"<TaskRegistry kinds={sorted(self._handlers)}>"

    def register(self, kind: str, handler: Handler, policy: RetryPolicy | None = None) -> None:
        if kind in self._handlers:
            raise QueueConfigError(f"task kind {kind!r} is registered twice")
        self._handlers[kind] = handler
        if policy is not None:
            self._policies[kind] = policy

    def task(self, kind: str, policy: RetryPolicy | None = None) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def decorate(handler: Handler) -> Handler:
            self.register(kind, handler, policy)
            return handler

        return decorate

    def handler_for(self, kind: str) -> Handler | None:
        return self._handlers.get(kind)

    def kinds(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def policies(self) -> Mapping[str, RetryPolicy]:
        return MappingProxyType(dict(self._policies))


class WorkerHooks:
    """Events of a worker, no-ops by default; the metrics subclass counts them."""

    def on_leased(self, lease: Lease) -> None: ...
    def on_succeeded(self, lease: Lease, duration_s: float) -> None: ...
    def on_failed(self, lease: Lease, outcome: TaskState, duration_s: float) -> None: ...
    def on_lease_lost(self, lease: Lease) -> None: ...
    def on_released(self, lease: Lease) -> None: ...
    def on_reaped(self, result: ReapResult) -> None: ...
    def on_backend_error(self, error: QueueError) -> None: ...


class WorkerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


_WORKER_TRANSITIONS = {
    WorkerState.NEW: {WorkerState.RUNNING, WorkerState.STOPPED},
    WorkerState.RUNNING: {WorkerState.DRAINING},
    WorkerState.DRAINING: {WorkerState.STOPPED},
    WorkerState.STOPPED: set(),
}


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = 4
    visibility_timeout_s: float = 30.0
    #: Fallback poll when no notification arrives (a missed NOTIFY, a delayed task falling due).
    poll_interval_s: float = 1.0
    stop_deadline_s: float = 10.0
    #: Backoff after the engine failed, before leasing again.
    error_backoff_s: float = 1.0
    #: An engine failing this long without a break ends ``run()`` with QueueUnavailable, so
    #: the supervisor restarts the process (with fresh connections) instead of it limping on.
    give_up_after_s: float = 30.0
    worker_id: str = field(default_factory=_default_worker_id)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise QueueConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.visibility_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise QueueConfigError("visibility_timeout_s and poll_interval_s must be positive")

    @property
    def reap_interval_s(self) -> float:
        return min(self.visibility_timeout_s / 2.0, 5.0)


class Worker:
    """Runs tasks from ``backend`` with ``registry``'s handlers. ``run()`` until ``stop()``."""

    def __init__(
        self,
        backend: QueueBackend,
        registry: TaskRegistry,
        config: WorkerConfig | None = None,
        *,
        hooks: WorkerHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.config = config or WorkerConfig()
        self.hooks = hooks or WorkerHooks()
        self._clock = clock
        self.state = WorkerState.NEW
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._running: dict[asyncio.Task[None], Lease] = {}

    def __repr__(self) -> str:
        return f"<Worker {self.config.worker_id} {self.state.value} busy={self.busy}>"

    @property
    def busy(self) -> int:
        return len(self._running)

    def _set(self, new: WorkerState) -> None:
        if new not in _WORKER_TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.state.value} -> {new.value}")
        self.state = new

    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler: it only records)."""
        self._stop.set()

    async def run(self) -> None:
        """Lease and run tasks until :meth:`stop`, then drain. Raises QueueError only when
        consuming cannot start at all."""
        cfg = self.config
        self._set(WorkerState.RUNNING)
        await self.backend.start_consuming(cfg.concurrency)
        next_reap = self._clock()
        failing_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    if self._clock() >= next_reap:
                        next_reap = self._clock() + cfg.reap_interval_s
                        reaped = await self.backend.reap_expired()
                        if reaped.requeued or reaped.dead:
                            self.hooks.on_reaped(reaped)
                    free = cfg.concurrency - len(self._running)
                    if free > 0:
                        leases = await self.backend.lease(
                            free, cfg.visibility_timeout_s, cfg.worker_id
                        )
                        for lease in leases:
                            self._spawn(lease)
                        if len(leases) == free:
                            failing_since = None
                            continue  # maybe more is due: look again once a slot frees
                    failing_since = None
                    await self._idle(full=len(self._running) >= cfg.concurrency)
                except QueueError as exc:
                    log.warning("queue engine error: %s", exc)
                    self.hooks.on_backend_error(exc)
                    now = self._clock()
                    failing_since = now if failing_since is None else failing_since
                    if now - failing_since >= cfg.give_up_after_s:
                        raise QueueUnavailable(
                            f"engine failing for {now - failing_since:.0f}s: {exc}"
                        ) from exc
                    await self._sleep_unless_stopped(cfg.error_backoff_s)
        finally:
            await self._drain()

    def _spawn(self, lease: Lease) -> None:
        self.hooks.on_leased(lease)
        task = asyncio.create_task(self._execute(lease), name=f"task-{lease.task_id}")
        self._running[task] = lease
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()

    async def _idle(self, *, full: bool) -> None:
        """Wait for a free slot (when full) or for new work, or for stop."""
        self._slot_freed.clear()
        waiter = (
            self._slot_freed.wait()
            if full
            else self.backend.wait_for_work(self.config.poll_interval_s)
        )
        await self._first(waiter)

    async def _first(self, waiter: Awaitable[object]) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        wait = asyncio.ensure_future(waiter)
        try:
            await asyncio.wait({stop, wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (stop, wait):
                fut.cancel()
            await asyncio.gather(stop, wait, return_exceptions=True)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _execute(self, lease: Lease) -> None:
        started = self._clock()
        context = TaskContext(
            lease.task_id, lease.kind, lease.payload, lease.attempt, lease.redelivered
        )
        handler = self.registry.handler_for(lease.kind)
        # Most tasks end before their first heartbeat is due: start the heartbeat loop from a
        # timer, not a task per run.
        me = asyncio.current_task()
        assert me is not None
        beat = _Beat()
        interval = heartbeat_interval_s(self.config.visibility_timeout_s)
        timer = asyncio.get_running_loop().call_later(
            interval, lambda: beat.start(self._heartbeat(lease, me, beat))
        )
        try:
            result = await self._call(handler, context)
        except asyncio.CancelledError:
            if beat.lost:
                self.hooks.on_lease_lost(lease)  # heartbeat lost the lease: not ours now
                return
            raise  # the drain cancelled us: it releases the lease
        except PermanentTaskError as exc:
            await self._stop_beat(timer, beat)
            await self._report_failure(lease, str(exc) or type(exc).__name__, started, True)
        except Exception as exc:  # noqa: BLE001 - task code is foreign: any error is the task's
            await self._stop_beat(timer, beat)
            error = f"{type(exc).__name__}: {exc}"
            await self._report_failure(lease, error, started, False)
        else:
            await self._stop_beat(timer, beat)
            try:
                await self.backend.complete(lease, result)
            except LeaseLost:
                self.hooks.on_lease_lost(lease)
            except QueueError as exc:
                log.warning("task %s: could not record success: %s", lease.task_id, exc)
                self.hooks.on_backend_error(exc)
            else:
                self.hooks.on_succeeded(lease, self._clock() - started)
        finally:
            await self._stop_beat(timer, beat)

    @staticmethod
    async def _stop_beat(timer: asyncio.TimerHandle, beat: _Beat) -> None:
        timer.cancel()
        task, beat.task = beat.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    async def _call(handler: Handler | None, context: TaskContext) -> Json:
        if handler is None:
            raise PermanentTaskError(f"no handler registered for task kind {context.kind!r}")
        return await handler(context)

    async def _report_failure(
        self, lease: Lease, error: str, started: float, permanent: bool
    ) -> None:
        try:
            outcome = await self.backend.fail(lease, error[:2000], permanent=permanent)
        except LeaseLost:
            self.hooks.on_lease_lost(lease)
        except QueueError as exc:
            log.warning("task %s: could not record failure: %s", lease.task_id, exc)
            self.hooks.on_backend_error(exc)
        else:
            self.hooks.on_failed(lease, outcome, self._clock() - started)

    async def _heartbeat(self, lease: Lease, runner: asyncio.Task[object], beat: _Beat) -> None:
        """Extend the lease while the task runs; on losing it, cancel the run (a stale holder
        must not keep going as if it owned the task)."""
        cfg = self.config
        interval = heartbeat_interval_s(cfg.visibility_timeout_s)
        held_until = self._clock() + cfg.visibility_timeout_s - interval
        while True:
            try:
                await self.backend.heartbeat(lease, cfg.visibility_timeout_s)
                held_until = self._clock() + cfg.visibility_timeout_s
            except LeaseLost:
                beat.lost = True
            except QueueError as exc:
                self.hooks.on_backend_error(exc)
                beat.lost = self._clock() >= held_until  # cannot prove we still hold it
            if beat.lost:
                runner.cancel()
                return
            await asyncio.sleep(interval)

    async def _drain(self) -> None:
        self._set(WorkerState.DRAINING)
        with contextlib.suppress(QueueError):
            await self.backend.stop_consuming()
        if self._running:
            await asyncio.wait(set(self._running), timeout=self.config.stop_deadline_s)
        leftover = dict(self._running)
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        for lease in leftover.values():
            try:
                await self.backend.release(lease)
            except QueueError as exc:  # LeaseLost included: someone else has it already
                log.warning("task %s: not released: %s", lease.task_id, exc)
            else:
                self.hooks.on_released(lease)
        with contextlib.suppress(QueueError):
            await self.backend.stop_consuming()
        self._set(WorkerState.STOPPED)


class _Beat:
    """The heartbeat of one run: its task once started, and whether the lease was lost."""

    __slots__ = ("lost", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.lost = False

    def start(self, beating: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.create_task(beating)
