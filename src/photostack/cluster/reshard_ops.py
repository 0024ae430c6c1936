"""Online resharding on a running cluster: the control API's ``/v1/reshard`` routes.

``remove-shard GROUP SHARD`` moves every logical shard of the group's SHARD-th physical shard
(1-based, as ``photostack directory show`` numbers them) to the others through the same executor;
once the move is done its nodes (primary and replicas) are recorded in
``DATA/reshard-retired.json`` and stopped, and no later ``up`` starts them.

``add-shard GROUP`` starts a new shard for the group: a Postgres primary like the group's first
primary and the group's streaming replicas of it, with the group's replication mode (on the next
free ports; cluster/_reshard_nodes.py), records them in ``DATA/reshard-nodes.json`` so every later
``up`` starts them with the others, creates the database and tables, then plans and runs the
move (service/_reshard.py) in the background; the map it publishes lists the new shard's
primary and replicas, so the failover coordinator watches it. A move left unfinished
(supervisor stopped or crashed) resumes when the cluster is next ready. See docs/resharding.md.

- ``POST /v1/reshard/{group}/add-shard`` -> 202 the move | 400 ``bad_reshard`` (one-line reason)
- ``POST /v1/reshard/{group}/remove-shard/{shard}`` -> 202 the move | 400 ``bad_reshard``
- ``POST /v1/reshard/{group}/hot-shard`` -> 202 the move off the hottest shard | 400
- ``POST /v1/reshard/cancel`` -> 200 the cancelled move | 409 past the cut-over | 404 none
- ``GET  /v1/reshard`` -> the active move, the recent ones, per-shard load and skew
- ``GET  /v1/shards`` -> per group: rows and tx/s per shard, their std / mean (``status``)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.cluster._reshard_nodes import (
    NODES_FILE,
    RETIRED_FILE,
    GroupReplication,
    added_storage_nodes,
    member_names,
    record_node,
    record_retired,
    retired_storage_nodes,
    storage_member,
    template_primary,
)
from photostack.cluster.engines import (
    EngineError,
    ensure_database,
    ensure_port_free,
    postgres_dsn,
)
from photostack.cluster.state import NodeState
from photostack.cluster.supervisor import CommandRefused, ManagedNode, Supervisor
from photostack.cluster.topology import NodeSpec, Role
from photostack.service._hotshard import SkewTracker, sample_group, sample_loads
from photostack.service._reshard import RETRYABLE, MoveRecord, ReshardExecutor
from photostack.service._reshard_plan import (
    GROUP_TABLES,
    MoveKind,
    MoveState,
    ReshardError,
    check_supported,
)
from photostack.service.directory import Endpoint
from photostack.service.schema import apply_schema

__all__ = [
    "NODES_FILE",
    "RETIRED_FILE",
    "GroupReplication",
    "ReshardControl",
    "added_storage_nodes",
    "prepare_storage",
    "reshard_routes",
    "retired_storage_nodes",
]

log = logging.getLogger("photostack.reshard")

_DATABASE = "photostack"
_READY_S = 120.0
_RESUME_ERRORS: tuple[type[Exception], ...] = (ReshardError, *RETRYABLE)
_SAMPLE_ERRORS: tuple[type[Exception], ...] = (*RETRYABLE, TimeoutError)
_METRICS_EVERY_S = 5.0


class _JSON(JSONResponse):
    media_type = "application/json; charset=utf-8"


def _error(status: int, code: str, message: str) -> Response:
    return _JSON({"error": {"code": code, "message": message}}, status_code=status)


def _ready(node: ManagedNode) -> bool:
    return node.lifecycle.state is NodeState.READY


def _endpoint(node: ManagedNode) -> Endpoint:
    """How the map names a new shard's member (app nodes reach it directly)."""
    return Endpoint(node.name, postgres_dsn(node.spec.host, node.spec.port, _DATABASE))


async def prepare_storage(group: str, dsn: str) -> int:
    """Create or upgrade ``group``'s tables, with every index, on the database at ``dsn``: what
    ``up`` and ``add-shard`` do to a new shard (the ``indexes`` bench uses it on a bare
    Postgres). Returns the schema version. Raises KeyError for an unknown group, OSError /
    asyncpg errors when the server fails."""
    return await apply_schema(group, dsn)


class ReshardControl:
    def __init__(
        self,
        supervisor: Supervisor,
        data_root: Path,
        registry: CollectorRegistry | None = None,
        replication: Mapping[str, GroupReplication] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._data_root = data_root
        self._replication = dict(replication or {})  # per group, from the topology
        self._executor: ReshardExecutor | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._skew = SkewTracker()
        self._gauges: tuple[Gauge, Gauge, Gauge] | None = None
        self._metrics_skew = SkewTracker()  # its own windows: status calls do not cut them
        if registry is not None:
            self.register_metrics(registry)

    def executor(self) -> ReshardExecutor:
        if self._executor is None:
            directory = next(
                (
                    n
                    for n in self._supervisor.nodes.values()
                    if n.spec.role is Role.STORAGE
                    and n.spec.group == "directory"
                    and n.spec.is_primary
                ),
                None,
            )
            if directory is None:
                raise ReshardError("this cluster has no directory: nothing to reshard")
            dsn = postgres_dsn(directory.spec.host, directory.spec.port, _DATABASE)
            self._executor = ReshardExecutor(dsn)
        return self._executor

    async def add_shard(self, group: str) -> dict[str, Any]:
        async with self._lock:
            executor = self.executor()
            current = await executor.current_map()
            active = await executor.active()
            if active is not None:
                if active.group == group and active.kind is MoveKind.ADD_SHARD:
                    executor.start(active)  # resume it
                    return active.to_json()
                raise ReshardError(f"move {active.id} ({active.group}) is in progress")
            if group not in current.groups:
                known = ", ".join(sorted(current.groups))
                raise ReshardError(f"unknown group {group!r} (groups: {known})")
            # validated by planning first (nothing started): a dry run of the same checks
            await self._validate(executor, group)
            node, replicas = await self._new_shard(group, self._next_number(group))
            rec = await executor.plan(
                MoveKind.ADD_SHARD,
                group,
                new_endpoint=_endpoint(node),
                new_replicas=tuple(map(_endpoint, replicas)),
            )
            executor.start(rec)
            return rec.to_json()

    def _next_number(self, group: str) -> int:
        """The number a new shard's node names carry: above every number the group's nodes have
        had, retired ones included (a removed middle shard's number is never reused: its data
        directory still exists, and a name must not come back as another shard)."""
        pattern = re.compile(rf"^{re.escape(group)}-(\d+)-")
        names = [*self._supervisor.nodes, *retired_storage_nodes(self._data_root)]
        numbers = [int(m.group(1)) for n in names if (m := pattern.match(n))]
        return max(numbers, default=0) + 1

    async def remove_shard(self, group: str, shard: str) -> dict[str, Any]:
        """Plan and start emptying ``group``'s shard number ``shard`` (1-based). Raises
        ReshardError for an unknown group or shard, the last shard, a move in progress."""
        async with self._lock:
            executor = self.executor()
            active = await executor.active()
            if active is not None:
                if active.group == group and active.kind is MoveKind.REMOVE_SHARD:
                    self._run_and_retire(active)  # resume it
                    return active.to_json()
                raise ReshardError(f"move {active.id} ({active.group}) is in progress")
            try:
                number = int(shard)
            except ValueError:
                raise ReshardError(f"shard must be a number, got {shard!r}") from None
            rec = await executor.plan(MoveKind.REMOVE_SHARD, group, shard=number)
            self._run_and_retire(rec)
            return rec.to_json()

    def _run_and_retire(self, rec: MoveRecord) -> None:
        """Run ``rec`` in the background; when a remove-shard is done, retire its nodes."""
        task = asyncio.create_task(self._retire_when_done(rec), name=f"reshard-retire-{rec.id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_when_done(self, rec: MoveRecord) -> None:
        done = await self.executor().start(rec)
        if done.state is MoveState.DONE and done.kind is MoveKind.REMOVE_SHARD:
            await self._retire(done)

    async def _retire(self, rec: MoveRecord) -> None:
        """Record the emptied shard's nodes as retired (so no ``up`` starts them), then stop
        them. Idempotent: a supervisor restarted in between does it again."""
        names = rec.retired_nodes()
        if not names:
            return
        record_retired(self._data_root, names)
        for name in names:
            if name in self._supervisor.nodes:
                with contextlib.suppress(CommandRefused):
                    await self._supervisor.stop(name)
        log.info("reshard move %d: retired %s", rec.id, ", ".join(names))

    async def _validate(self, executor: ReshardExecutor, group: str) -> None:
        check_supported(group)
        if template_primary(list(self._supervisor.nodes.values()), group) is None:
            raise ReshardError(f"no {group} primary to copy a new shard from")

    async def _new_shard(self, group: str, shard: int) -> tuple[ManagedNode, list[ManagedNode]]:
        """Start shard number ``shard`` of ``group``: its primary, then the group's replicas
        streaming from it (a base backup needs the primary running), then create its database
        and tables (replicated: a synchronous primary waits for its standbys)."""
        template = template_primary(list(self._supervisor.nodes.values()), group)
        assert template is not None
        replication = self._replication.get(group, GroupReplication())
        primary_name, replica_names = member_names(group, shard, replication.replicas)
        spec = NodeSpec(primary_name, Role.STORAGE, template.spec.host, 0, group, shard)
        primary = await self._start_member(template, spec, replica_names, template.name)
        # in the replicas' phase: every later `up` (and shutdown) orders them after primaries
        like = next(
            (n.name for n in self._supervisor.nodes.values() if n.spec.replica_of),
            primary.name,
        )
        replicas = []
        for name in replica_names:
            spec = NodeSpec(name, Role.STORAGE, template.spec.host, 0, group, shard, primary_name)
            replicas.append(await self._start_member(template, spec, replica_names, like))
        await ensure_database(primary.spec.host, primary.spec.port, _DATABASE)
        await prepare_storage(group, _endpoint(primary).dsn)
        return primary, replicas

    async def _start_member(
        self, template: ManagedNode, spec: NodeSpec, replicas: list[str], like: str
    ) -> ManagedNode:
        """Create (once: a retried add-shard reuses it), record and start one member of a new
        shard on the next free port; wait until it is ready."""
        node = self._supervisor.nodes.get(spec.name)
        if node is None:
            port = await asyncio.to_thread(self._free_port, template.spec.host)
            primary = self._supervisor.nodes.get(spec.replica_of or "")
            mode = self._replication.get(template.spec.group or "", GroupReplication()).mode
            node = storage_member(
                template,
                dataclasses.replace(spec, port=port),
                replicas,
                mode,
                primary.spec.port if primary is not None else None,
            )
            self._supervisor.add_node(node, like=like)
            record_node(self._data_root, node)
        if node.lifecycle.state is not NodeState.READY:
            if node.lifecycle.state in (NodeState.PENDING, NodeState.STOPPED, NodeState.FAILED):
                await self._supervisor.start(node.name)
            deadline = time.monotonic() + _READY_S
            while not _ready(node):
                if time.monotonic() > deadline:
                    raise ReshardError(f"{node.name} did not become ready (log: {node.log_path})")
                await asyncio.sleep(0.2)  # polling the supervisor's view under a deadline
        return node

    def _free_port(self, host: str) -> int:
        port = max(n.spec.port for n in self._supervisor.nodes.values()) + 1
        for candidate in range(port, min(port + 50, 65536)):
            try:
                ensure_port_free(host, candidate)
            except EngineError:
                continue
            return candidate
        raise ReshardError(f"no free port above {port} for a new shard")

    async def hot_shard(self, group: str) -> dict[str, Any]:
        async with self._lock:
            executor = self.executor()
            await self._validate(executor, group)
            load = await self._load(group)
            rec = await executor.plan(MoveKind.HOT_SHARD, group, loads=load["tps"])
            executor.start(rec)
            return {**rec.to_json(), "load": load}

    async def _load(self, group: str) -> dict[str, Any]:
        current = await self.executor().current_map()
        if group not in current.groups:
            raise ReshardError(f"unknown group {group!r}")
        dsns = [s.primary.dsn for s in current.group(group).shards]
        return (await sample_loads(group, dsns, 1.0)).to_json()

    async def shard_skew(self, tracker: SkewTracker | None = None) -> dict[str, Any]:
        """Per product group: rows and tx/s (since the previous call) per physical shard, and
        their std / mean (docs/resharding.md). A group whose shards cannot be read is reported
        with its error; the others are still answered."""
        current = await self.executor().current_map()
        groups = [g for g in sorted(current.groups) if g in GROUP_TABLES]

        async def one(group: str) -> dict[str, Any]:
            dsns = [s.primary.dsn for s in current.group(group).shards]
            try:
                rows, xacts = await asyncio.wait_for(sample_group(group, dsns), 5.0)
            except _SAMPLE_ERRORS as exc:
                return {"group": group, "error": repr(exc)[:200]}
            names = [s.primary.name for s in current.group(group).shards]
            figures = (tracker or self._skew).observe(group, dsns, rows, xacts)
            return {**figures.to_json(), "shards": names}

        return {
            "map_version": current.version,
            "groups": list(await asyncio.gather(*map(one, groups))),
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Gauges the control API's ``/metrics`` exports, set by :meth:`update_metrics`."""
        self._gauges = (
            Gauge(
                "photostack_shard_skew",
                "std/mean of rows per physical shard of a storage group (0 is even)",
                ["group"],
                registry=registry,
            ),
            Gauge(
                "photostack_shard_load_skew",
                "std/mean of transactions/s per physical shard since the previous sample",
                ["group"],
                registry=registry,
            ),
            Gauge(
                "photostack_shard_rows",
                "rows of the group's tables on a physical shard (1-based, map order)",
                ["group", "shard"],
                registry=registry,
            ),
        )

    async def update_metrics(self) -> None:
        """Sample every group's shards into the gauges (a cluster without a directory, or an
        unreachable one, leaves them as they were)."""
        if self._gauges is None:
            return
        rows_skew, load_skew, rows = self._gauges
        try:
            figures = await self.shard_skew(self._metrics_skew)
        except _RESUME_ERRORS:
            return
        for group in figures["groups"]:
            if "error" in group:
                continue
            rows_skew.labels(group["group"]).set(group["rows_skew"])
            if group["load_skew"] is not None:
                load_skew.labels(group["group"]).set(group["load_skew"])
            for number, count in enumerate(group["rows"], 1):
                rows.labels(group["group"], str(number)).set(count)

    async def sample_metrics_forever(self) -> None:
        """Watcher: refresh the shard gauges every few seconds (``/metrics`` stays instant)."""
        while True:
            await self.update_metrics()
            await asyncio.sleep(_METRICS_EVERY_S)  # the sampling period

    async def cancel(self) -> dict[str, Any] | None:
        executor = self.executor()
        active = await executor.active()
        if active is None:
            return None
        return (await executor.cancel(active)).to_json()

    async def status(self) -> dict[str, Any]:
        executor = self.executor()
        current = await executor.current_map()
        loads = await asyncio.gather(
            *(self._load(g) for g in sorted(current.groups) if g != "directory"),
            return_exceptions=True,
        )
        return {
            "map_version": current.version,
            "moves": [m.to_json() for m in await executor.moves()],
            "load": [x for x in loads if isinstance(x, dict)],
        }

    async def resume(self) -> None:
        """Watcher: once the cluster is up, continue a move a stopped supervisor left."""
        try:
            executor = self.executor()
            active = await executor.active()
        except _RESUME_ERRORS as exc:
            log.info("no reshard to resume: %r", exc)
            return
        if active is not None:
            log.info("resuming reshard move %d (%s, %s)", active.id, active.group, active.state)
            await self._retire_when_done(active)
            return
        # a remove-shard finished while its supervisor stopped before retiring the nodes
        with contextlib.suppress(*_RESUME_ERRORS):
            for move in await executor.moves(limit=1):
                retired = retired_storage_nodes(self._data_root)
                if (
                    move.kind is MoveKind.REMOVE_SHARD
                    and move.state is MoveState.DONE
                    and not set(move.retired_nodes()) <= retired
                ):
                    await self._retire(move)


def reshard_routes(control: ReshardControl) -> list[Route]:
    async def answer(call: Any, status: int = 202, refused: int = 400) -> Response:
        try:
            body = await call
        except ReshardError as exc:
            return _error(refused, "bad_reshard", str(exc))
        except RETRYABLE as exc:
            return _error(503, "storage_unavailable", f"a shard or the directory: {exc!r}")
        if body is None:
            return _error(404, "no_move", "no reshard is in progress")
        return _JSON(body, status_code=status)

    async def add_shard(request: Request) -> Response:
        return await answer(control.add_shard(request.path_params["group"]))

    async def remove_shard(request: Request) -> Response:
        params = request.path_params
        return await answer(control.remove_shard(params["group"], params["shard"]))

    async def hot_shard(request: Request) -> Response:
        return await answer(control.hot_shard(request.path_params["group"]))

    async def cancel(request: Request) -> Response:
        return await answer(control.cancel(), 200, refused=409)  # 409: past the cut-over

    async def status(request: Request) -> Response:
        return await answer(control.status(), 200)

    async def shards(request: Request) -> Response:
        return await answer(control.shard_skew(), 200)

    return [
        Route("/v1/reshard", status),
        Route("/v1/shards", shards),
        Route("/v1/reshard/cancel", cancel, methods=["POST"]),
        Route("/v1/reshard/{group}/add-shard", add_shard, methods=["POST"]),
        Route("/v1/reshard/{group}/hot-shard", hot_shard, methods=["POST"]),
        Route("/v1/reshard/{group}/remove-shard/{shard}", remove_shard, methods=["POST"]),
    ]
