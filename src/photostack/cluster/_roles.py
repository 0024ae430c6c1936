"""The supervisor's side of failover: never fight the coordinator.

The coordinator (in the directory nodes) decides which node of a shard is primary; the shard map
says so. The supervisor only starts processes, so :class:`RoleKeeper` makes it follow the map:

- before a storage node is restarted (crash, ``start``), it reads the map: a node the map lists
  as a replica is started as one — its PGDATA, if it is a primary's, is rejoined with pg_rewind
  or rebuilt with a fresh base backup (``PostgresEngine.follow``), so an old primary never comes
  back as a primary. A crashed primary of a replicated shard is held back while the coordinator
  fails it over (up to ``hold_s``; at once when the coordinator says it will not);
- every second it reconciles running nodes: a node running as a primary that the map demoted
  (a planned switchover, a healed partition) is stopped and rejoined as a replica; a replica the
  leading coordinator marks ``action: rebuild`` (it points at its primary but cannot stream from
  it: a diverged timeline, WAL gone) is stopped, rebuilt from a fresh base backup of the primary
  and restarted — redundancy restored;
- the directory database's members follow the directory nodes (``GET /v1/directory-db``, the
  highest generation): a member they do not name primary is started, or rejoined, as a standby
  of the one they name (docs/replication.md, "The directory's own database");
- control routes: ``POST /v1/failover/{shard}`` (``photostack failover SHARD``) and
  ``GET /v1/replication`` (the leader coordinator's view, for ``photostack status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.cluster.engines import EngineError, PostgresEngine
from photostack.cluster.state import NodeState
from photostack.cluster.supervisor import CommandRefused, ManagedNode, Supervisor
from photostack.cluster.topology import DIRECTORY_GROUP, PRODUCT_GROUPS, Role

__all__ = ["RoleKeeper", "desired_role", "replicas_to_rebuild", "replication_routes"]

log = logging.getLogger("photostack.roles")

_TIMEOUT_S = 1.0
_FAILOVER_TIMEOUT_S = 30.0


class _JSON(JSONResponse):
    media_type = "application/json; charset=utf-8"


def desired_role(shard_map: dict[str, Any], name: str) -> tuple[str, str, str, int] | None:
    """``(role, primary name, shard name, replica count)`` of node ``name`` in a map's JSON
    (role ``primary`` or ``replica``), or None when the map does not list it."""
    for group, body in shard_map.get("groups", {}).items():
        for shard in body.get("shards", ()):
            primary = shard["primary"]["name"]
            replicas = [r["name"] for r in shard.get("replicas", ())]
            key = f"{group}-{int(shard['index']) + 1}"
            if name == primary:
                return "primary", primary, key, len(replicas)
            if name in replicas:
                return "replica", primary, key, len(replicas)
    return None


def replicas_to_rebuild(leader_view: dict[str, Any] | None) -> dict[str, str]:
    """``replica -> primary`` for every replica the leading coordinator marks for a rebuild."""
    if not leader_view or not leader_view.get("leader"):
        return {}
    out = {}
    for shard in leader_view.get("shards", {}).values():
        for name, replica in shard.get("replicas", {}).items():
            if replica.get("action") == "rebuild" and shard.get("primary_reachable"):
                out[name] = str(shard["primary"])
    return out


class RoleKeeper:
    def __init__(
        self, supervisor: Supervisor, is_ready: Callable[[], bool], *, hold_s: float = 15.0
    ) -> None:
        self.supervisor = supervisor
        self.is_ready = is_ready
        self.hold_s = hold_s
        self.rejoin_deadline_s = 120.0
        self.background: set[asyncio.Task[list[str]]] = set()
        self._reconciling = asyncio.Lock()
        self._mismatched: dict[str, int] = {}  # node -> rounds in a row it ran demoted
        self.rejoins = 0
        self.rebuilds = 0
        self.rebuild_interval_s = 60.0  # one rebuild per node per interval, whatever it says
        self._rebuilt_at: dict[str, float] = {}

    async def _newest_map(self) -> dict[str, Any] | None:
        """The newest map any ready directory node serves: a node refreshes from the database
        every 0.5 s, and acting on a stale map would demote the primary just promoted."""
        nodes = [
            n
            for n in self.supervisor.nodes.values()
            if n.spec.role is Role.DIRECTORY and n.lifecycle.state is NodeState.READY
        ]
        best: dict[str, Any] | None = None
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
            for node in nodes:
                try:
                    answer = await client.get(f"http://{node.spec.address}/v1/map")
                    body = answer.json()
                except (httpx.HTTPError, ValueError):
                    continue
                if answer.status_code == 200 and (
                    best is None or int(body["version"]) > int(best["version"])
                ):
                    best = body
        return best

    async def _leader_view(self) -> dict[str, Any] | None:
        """The leading coordinator's ``GET /v1/coordinator`` (followers keep no shard phases)."""
        views = []
        for node in self.supervisor.nodes.values():
            if node.spec.role is not Role.DIRECTORY or node.lifecycle.state is not NodeState.READY:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
                    answer = await client.get(f"http://{node.spec.address}/v1/coordinator")
                if answer.status_code == 200:
                    views.append(answer.json())
        return next((v for v in views if v.get("leader")), None)

    async def _ask(self, method: str, path: str, timeout_s: float = _TIMEOUT_S) -> Any:
        """The first ready directory node's JSON answer (any status), or None."""
        nodes = [
            n
            for n in self.supervisor.nodes.values()
            if n.spec.role is Role.DIRECTORY and n.lifecycle.state is NodeState.READY
        ]
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            for node in nodes:
                try:
                    answer = await client.request(method, f"http://{node.spec.address}{path}")
                    body = answer.json()
                except (httpx.HTTPError, ValueError):
                    continue
                if answer.status_code == 200 or method != "GET":
                    return {"status": answer.status_code, "body": body}
        return None

    def _storage(self, node: ManagedNode) -> PostgresEngine | None:
        engine = node.engine
        if node.spec.role is not Role.STORAGE or node.spec.group not in PRODUCT_GROUPS:
            return None
        return engine if isinstance(engine, PostgresEngine) else None

    def _directory_member(self, node: ManagedNode) -> PostgresEngine | None:
        engine = node.engine
        if node.spec.role is not Role.STORAGE or node.spec.group != DIRECTORY_GROUP:
            return None
        return engine if isinstance(engine, PostgresEngine) else None

    async def _directory_primary(self) -> str | None:
        """The member of the directory database that the directory nodes name primary (the
        highest generation any of them reports), or None when none answers."""
        best: tuple[int, str] | None = None
        for node in self.supervisor.nodes.values():
            if node.spec.role is not Role.DIRECTORY or node.lifecycle.state is not NodeState.READY:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
                    answer = await client.get(f"http://{node.spec.address}/v1/directory-db")
                body = answer.json()
                if answer.status_code == 200 and body["primary"]:
                    found = (int(body["generation"]), str(body["primary"]))
                    best = found if best is None or found > best else best
        return None if best is None else best[1]

    def _follow(self, engine: PostgresEngine, primary: str) -> bool:
        """Point ``engine`` at ``primary``; True when its PGDATA must be rejoined."""
        target = self.supervisor.nodes.get(primary)
        if target is None:
            return False
        address = (target.spec.host, target.spec.port)
        if engine.config.primary != address or not engine.standby_on_disk:
            engine.follow(*address)
        return not engine.standby_on_disk

    async def _rejoin(
        self, node: ManagedNode, engine: PostgresEngine, primary: str, *, rebuild: bool = False
    ) -> bool:
        """Rebuild ``node``'s PGDATA as a standby of ``primary`` (pg_rewind, else a base
        backup), retried while the new primary comes up; True when done."""
        deadline = time.monotonic() + self.rejoin_deadline_s
        while time.monotonic() < deadline:
            target = self.supervisor.nodes.get(primary)
            if target is not None and target.lifecycle.state is NodeState.READY:
                try:
                    await asyncio.to_thread(engine.prepare)
                except EngineError as exc:
                    log.warning("%s: rejoin failed (%s); retrying", node.name, exc)
                    if rebuild:  # prepare cleared the flag; set it again
                        engine.rebuild(target.spec.host, target.spec.port)
                    else:
                        self._follow(engine, primary)
                else:
                    self.rejoins += 1
                    log.warning(
                        "%s rejoined as a replica of %s (%s)",
                        node.name,
                        primary,
                        engine.rejoined_by or "base backup",
                    )
                    return True
            await asyncio.sleep(0.5)  # the new primary is (re)starting
        return False

    async def before_launch(self, node: ManagedNode) -> None:
        """Make a restarting storage node take the role the map gives it (see the module)."""
        member = self._directory_member(node)
        if member is not None and self.is_ready():
            primary = await self._directory_primary()
            if primary is not None and primary != node.name and self._follow(member, primary):
                log.warning("%s rejoins the directory database as a standby", node.name)
                await self._rejoin(node, member, primary)
            return
        engine = self._storage(node)
        if engine is None or not self.is_ready():
            return
        deadline = time.monotonic() + self.hold_s
        while True:
            newest = await self._newest_map()
            wanted = desired_role(newest, node.name) if newest else None
            if wanted is None:
                return
            role, primary, shard, replicas = wanted
            if role == "replica":
                if self._follow(engine, primary):
                    log.warning("%s rejoins %s as a replica of %s", node.name, shard, primary)
                    await self._rejoin(node, engine, primary)
                return
            if replicas == 0 or engine.standby_on_disk or time.monotonic() > deadline:
                return
            state = await self._leader_view()
            phase = (state or {}).get("shards", {}).get(shard, {}).get("phase")
            if state is None or phase == "no_candidate":
                return
            await asyncio.sleep(0.2)  # the coordinator is failing the shard over

    async def reconcile_once(self) -> list[str]:
        """Rejoin every running node the map demoted; the names rejoined."""
        async with self._reconciling:
            return await self._reconcile()

    async def _reconcile(self) -> list[str]:
        newest = await self._newest_map()
        if newest is None:
            return []
        done = await self._rebuild_stuck(newest)
        mismatched: dict[str, int] = {}
        for node in list(self.supervisor.nodes.values()):
            engine = self._storage(node)
            if engine is None or node.lifecycle.state is not NodeState.READY:
                continue
            wanted = desired_role(newest, node.name)
            if wanted is None or wanted[0] != "replica" or engine.standby_on_disk:
                continue
            # A replica being promoted right now is a primary on disk before the map says so:
            # act only on a mismatch seen in two rounds in a row (a failover takes < 0.5 s).
            mismatched[node.name] = self._mismatched.get(node.name, 0) + 1
            if mismatched[node.name] < 2 or not self._follow(engine, wanted[1]):
                continue
            log.warning("%s runs as a primary but the map says replica: rejoining", node.name)
            with contextlib.suppress(CommandRefused):
                await self.supervisor.stop(node.name)
                await self._rejoin(node, engine, wanted[1])
                await self.supervisor.start(node.name)
                done.append(node.name)
                mismatched.pop(node.name, None)
        done += await self._reconcile_directory(mismatched)
        self._mismatched = mismatched
        return done

    async def _reconcile_directory(self, mismatched: dict[str, int]) -> list[str]:
        """Rejoin a member of the directory database running as a primary that the directory
        nodes do not name (an old primary restarted with its own data after a promotion)."""
        members = [
            (n, e)
            for n in list(self.supervisor.nodes.values())
            if (e := self._directory_member(n)) is not None
            and n.lifecycle.state is NodeState.READY
            and not e.standby_on_disk
        ]
        primary = await self._directory_primary() if members else None
        done = []
        for node, engine in members:
            if primary is None or primary == node.name:
                continue
            mismatched[node.name] = self._mismatched.get(node.name, 0) + 1
            if mismatched[node.name] < 2 or not self._follow(engine, primary):
                continue
            log.warning("%s runs as a directory primary the directory does not name", node.name)
            with contextlib.suppress(CommandRefused):
                await self.supervisor.stop(node.name)
                await self._rejoin(node, engine, primary)
                await self.supervisor.start(node.name)
                done.append(node.name)
                mismatched.pop(node.name, None)
        return done

    async def _rebuild_stuck(self, newest: dict[str, Any]) -> list[str]:
        """Rebuild the replicas the coordinator marks (see the module); the names rebuilt."""
        done = []
        for name, primary in replicas_to_rebuild(await self._leader_view()).items():
            node = self.supervisor.nodes.get(name)
            target = self.supervisor.nodes.get(primary)
            engine = self._storage(node) if node is not None else None
            wanted = desired_role(newest, name)
            if (
                node is None
                or target is None
                or engine is None
                or wanted is None
                or wanted[:2] != ("replica", primary)  # the map moved on since the view
                or time.monotonic() - self._rebuilt_at.get(name, -1e9) < self.rebuild_interval_s
            ):
                continue
            self._rebuilt_at[name] = time.monotonic()
            log.warning("%s cannot stream from %s: rebuilding it from a base backup", name, primary)
            with contextlib.suppress(CommandRefused):
                await self.supervisor.stop(name)
                engine.rebuild(target.spec.host, target.spec.port)
                if await self._rejoin(node, engine, primary, rebuild=True):
                    self.rebuilds += 1
                await self.supervisor.start(name)
                done.append(name)
        return done

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.is_ready():
                try:
                    await self.reconcile_once()
                except Exception:
                    log.exception("role reconciliation failed")


def replication_routes(keeper: RoleKeeper) -> list[Route]:
    async def failover(request: Request) -> Response:
        shard = request.path_params["shard"]
        answer = await keeper._ask("POST", f"/v1/coordinator/failover/{shard}", _FAILOVER_TIMEOUT_S)
        if answer is None:
            return _JSON(
                {"error": {"code": "unavailable", "message": "no directory node answered"}},
                status_code=503,
            )
        if answer["status"] == 200:  # rejoin the old primary now (in the background)
            task = asyncio.create_task(keeper.reconcile_once())
            keeper.background.add(task)
            task.add_done_callback(keeper.background.discard)
        return _JSON(answer["body"], status_code=answer["status"])

    async def replication(request: Request) -> Response:
        views = []
        nodes = [
            n
            for n in keeper.supervisor.nodes.values()
            if n.spec.role is Role.DIRECTORY and n.lifecycle.state is NodeState.READY
        ]
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
            for node in nodes:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    answer = await client.get(f"http://{node.spec.address}/v1/coordinator")
                    if answer.status_code == 200:
                        views.append(answer.json())
        leader = next((v for v in views if v.get("leader")), views[0] if views else None)
        if leader is None:
            return _JSON(
                {"error": {"code": "unavailable", "message": "no coordinator answered"}},
                status_code=503,
            )
        leader["rejoins"] = keeper.rejoins
        leader["rebuilds"] = keeper.rebuilds
        return _JSON(leader)

    return [
        Route("/v1/failover/{shard}", failover, methods=["POST"]),
        Route("/v1/replication", replication),
    ]
