"""Run-time membership of the balancing pools: the supervisor pushes changes to running nodes.

Two pools: ``web`` (the web nodes, balanced by every edge) and ``app`` (the app nodes, balanced
by every web node's smart client). Each holder node serves its balancer's admin endpoint on a
Unix socket in the run directory (``plan.admin_socket_path``); a change is pushed to every
running holder and written into the holders' specs, so a holder restarted later starts with the
current members. Push, not watch: the supervisor already knows every node and its state, a
change takes effect as soon as the call returns, and nodes need no route back to the control
API (see docs/balancing.md).

Nodes created at run time (``photostack start web-3``) are copies of an existing node of the
role with a new name and the next free internal port; they join their pool once ready. ``stop``
of a web or app node drains it in its pool first and waits for its requests to finish; a web
node also closes its SSE and WebSocket streams at once (with a reconnect hint) rather than
having them waited for as requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from photostack.blocks.balancer import BalancerConfigError, parse_settings
from photostack.cluster.engines import EngineError, ensure_port_free
from photostack.cluster.nodes import PhotostackNodeEngine
from photostack.cluster.state import NodeLifecycle, NodeState
from photostack.cluster.supervisor import ManagedNode, Supervisor
from photostack.cluster.topology import NodeSpec, Role

__all__ = ["POOLS", "Membership", "MembershipError", "parse_new_node_name", "pool_routes"]

log = logging.getLogger("photostack.membership")


@dataclass(frozen=True)
class _Pool:
    member: Role  # who is balanced
    holder: Role  # who balances (and holds the admin endpoint)
    settings_key: str  # where the holder's spec lists the members


POOLS = {
    "web": _Pool(Role.WEB, Role.EDGE, "backends"),
    "app": _Pool(Role.APP, Role.WEB, "app_nodes"),
}
_NEW_NODE = re.compile(r"^(web|app)-([1-9][0-9]{0,2})$")
_PUSH_TIMEOUT_S = 15.0
_DRAIN_WAIT_S = 10.0
_LIVE = (NodeState.READY, NodeState.UNHEALTHY, NodeState.STARTING)
_SIGNALLABLE = (NodeState.READY, NodeState.UNHEALTHY)  # started: the drain handler is installed
_DRAIN_SIGNAL = signal.SIGUSR1  # a web node drains its streams on it and keeps serving


class MembershipError(Exception):
    """A membership command that cannot be done. ``status`` is the HTTP answer for it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def parse_new_node_name(name: str) -> Role:
    """The role of a node name that may be created at run time. Raises MembershipError."""
    match = _NEW_NODE.match(name)
    if match is None:
        raise MembershipError(
            404,
            "not_found",
            f"no node named {name!r}; a new node must be named web-N or app-N (e.g. web-3)",
        )
    return Role(match.group(1))


class Membership:
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._drained_for_stop: set[str] = set()
        self._lock = asyncio.Lock()

    # -- admin pushes --------------------------------------------------------------------------

    def _pool(self, pool: str) -> _Pool:
        try:
            return POOLS[pool]
        except KeyError:
            raise MembershipError(
                404, "unknown_pool", f"no pool {pool!r} (pools: {', '.join(POOLS)})"
            ) from None

    def _holders(self, pool: _Pool) -> list[ManagedNode]:
        return [n for n in self._supervisor.nodes.values() if n.spec.role is pool.holder]

    async def _push(
        self, pool_name: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send one admin request to every running holder; {holder: answer or error}."""
        pool = self._pool(pool_name)
        holders = [n for n in self._holders(pool) if n.lifecycle.state in _LIVE]
        answers = await asyncio.gather(
            *(self._call(n, method, f"/pools/{pool_name}{path}", body) for n in holders)
        )
        return dict(zip((n.name for n in holders), answers, strict=True))

    async def _call(
        self, node: ManagedNode, method: str, path: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        engine = node.engine
        if not isinstance(engine, PhotostackNodeEngine):
            return {"error": "not a photostack node"}
        socket = engine.config.settings.get("admin_socket")
        if not socket:
            return {"error": "no admin endpoint"}
        transport = httpx.AsyncHTTPTransport(uds=str(socket))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://admin", timeout=_PUSH_TIMEOUT_S
            ) as client:
                response = await client.request(method, path, json=body)
            answer: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("admin push to %s failed: %r", node.name, exc)
            return {"error": f"unreachable: {exc!r}"}
        if response.status_code >= 400:
            return {"error": answer.get("error", {}).get("message", str(response.status_code))}
        return answer

    def _set_members(self, pool: _Pool, update: Any) -> None:
        """Rewrite the member list in every holder's spec (used at its next start)."""
        for node in self._holders(pool):
            engine = node.engine
            if isinstance(engine, PhotostackNodeEngine):
                settings = dict(engine.config.settings)
                settings[pool.settings_key] = update(list(settings.get(pool.settings_key, [])))
                engine.config = dataclasses.replace(engine.config, settings=settings)

    # -- commands ------------------------------------------------------------------------------

    async def view(self, pool_name: str) -> dict[str, Any]:
        return {"pool": pool_name, "holders": await self._push(pool_name, "GET", "")}

    async def add(
        self, pool_name: str, name: str, host: str, port: int, weight: float = 1.0
    ) -> dict[str, Any]:
        pool = self._pool(pool_name)
        member = {"name": name, "host": host, "port": port}

        def update(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [m for m in members if m.get("name") != name] + [member]

        self._set_members(pool, update)
        body = {**member, "weight": weight}
        return {
            "pool": pool_name,
            "holders": await self._push(pool_name, "POST", "/backends", body),
        }

    async def remove(self, pool_name: str, name: str) -> dict[str, Any]:
        pool = self._pool(pool_name)
        self._set_members(pool, lambda members: [m for m in members if m.get("name") != name])
        answers = await self._push(pool_name, "DELETE", f"/backends/{name}")
        return {"pool": pool_name, "holders": answers}

    async def set_strategy(self, pool_name: str, strategy: str) -> dict[str, Any]:
        """Switch every holder of the pool to ``strategy`` (and their specs, for restarts)."""
        pool = self._pool(pool_name)
        try:
            parse_settings({"strategy": strategy})
        except BalancerConfigError as exc:
            raise MembershipError(400, "bad_strategy", str(exc)) from None
        for node in self._holders(pool):
            engine = node.engine
            if isinstance(engine, PhotostackNodeEngine):
                settings = dict(engine.config.settings)
                settings["balancing"] = {**settings.get("balancing", {}), "strategy": strategy}
                engine.config = dataclasses.replace(engine.config, settings=settings)
        answers = await self._push(pool_name, "PUT", "/strategy", {"strategy": strategy})
        return {"pool": pool_name, "holders": answers}

    async def drain(self, pool_name: str, name: str) -> dict[str, Any]:
        answers = await self._push(pool_name, "POST", f"/backends/{name}/drain")
        return {"pool": pool_name, "holders": answers}

    async def restore(self, pool_name: str, name: str) -> dict[str, Any]:
        answers = await self._push(pool_name, "POST", f"/backends/{name}/restore")
        return {"pool": pool_name, "holders": answers}

    # -- node lifecycle ------------------------------------------------------------------------

    async def create_node(self, name: str) -> ManagedNode:
        """A new web-N or app-N node, like an existing one of the role, on the next port."""
        role = parse_new_node_name(name)
        async with self._lock:
            if name in self._supervisor.nodes:
                return self._supervisor.nodes[name]
            template = next(
                (n for n in self._supervisor.nodes.values() if n.spec.role is role), None
            )
            if template is None or not isinstance(template.engine, PhotostackNodeEngine):
                raise MembershipError(409, "invalid_state", f"no {role} node to copy")
            port = await asyncio.to_thread(self._free_port, template.spec.host)
            config = template.engine.config
            settings = dict(config.settings)
            settings["name"] = name
            if "admin_socket" in settings:
                socket = str(settings["admin_socket"])
                settings["admin_socket"] = socket.replace(template.name, name)
            engine = PhotostackNodeEngine(
                dataclasses.replace(
                    config,
                    name=name,
                    port=port,
                    spec_path=config.spec_path.with_name(f"{name}.json"),
                    log_path=config.log_path.with_name(f"{name}.log"),
                    settings=settings,
                )
            )
            node = ManagedNode(
                spec=NodeSpec(name, role, template.spec.host, port),
                engine=engine,
                log_path=engine.config.log_path,
                lifecycle=NodeLifecycle(name),
            )
            self._supervisor.add_node(node, like=template.name)
        log.info("created %s on port %s (like %s)", name, port, template.name)
        return node

    def _free_port(self, host: str) -> int:
        port = max(n.spec.port for n in self._supervisor.nodes.values()) + 1
        for candidate in range(port, min(port + 50, 65536)):
            try:
                ensure_port_free(host, candidate)
            except EngineError:
                continue
            return candidate
        raise MembershipError(409, "no_port", f"no free port above {port} for a new node")

    async def drain_for_stop(self, node: ManagedNode) -> None:
        """Before a graceful stop: drain the node in its pool, wait for its requests.

        A web node is then told to drain at once (``_close_streams``): its SSE and WebSocket
        streams close with a reconnect hint, so the wait is for ordinary requests only (an SSE
        stream through the edge counts as a request in flight until it ends).
        """
        pool_name = _pool_of(node.spec.role)
        if pool_name is None or node.lifecycle.state not in _LIVE:
            return
        self._drained_for_stop.add(node.name)
        await self.drain(pool_name, node.name)
        if node.spec.role is Role.WEB:
            _close_streams(node)
        deadline = time.monotonic() + _DRAIN_WAIT_S
        while time.monotonic() < deadline:
            if await self._in_flight(pool_name, node.name) == 0:
                return
            await asyncio.sleep(0.1)  # polling the holders under a deadline
        log.warning(
            "%s still had requests in flight after %.0fs of draining", node.name, _DRAIN_WAIT_S
        )

    async def _in_flight(self, pool_name: str, name: str) -> int:
        total = 0
        for answer in (await self._push(pool_name, "GET", "")).values():
            for row in answer.get("backends", []):
                if row.get("name") == name:
                    total += int(row.get("in_flight", 0))
        return total

    async def on_ready(self, node: ManagedNode) -> None:
        """A node became ready: a new one joins its pool, a drained one is restored."""
        pool_name = _pool_of(node.spec.role)
        if pool_name is None:
            return
        pool = POOLS[pool_name]
        listed = all(
            any(m.get("name") == node.name for m in _members(holder, pool))
            for holder in self._holders(pool)
        )
        if not listed:
            result = await self.add(pool_name, node.name, node.spec.host, node.spec.port)
            log.info("%s joined pool %s: %s", node.name, pool_name, json.dumps(result)[:300])
        elif node.name in self._drained_for_stop:
            self._drained_for_stop.discard(node.name)
            await self.restore(pool_name, node.name)


def _close_streams(node: ManagedNode) -> None:
    """Ask a ready web node to drain now (SIGUSR1, see ``cluster/node.py``): its streams close
    with a reconnect hint and it refuses new ones, while ordinary requests go on."""
    process = node.process
    if (
        node.lifecycle.state not in _SIGNALLABLE
        or process is None
        or process.returncode is not None
    ):
        return  # still starting (no handler yet: the signal would kill it) or already gone
    try:
        process.send_signal(_DRAIN_SIGNAL)
    except ProcessLookupError:
        return


def _pool_of(role: Role) -> str | None:
    return next((name for name, pool in POOLS.items() if pool.member is role), None)


def _members(holder: ManagedNode, pool: _Pool) -> list[dict[str, Any]]:
    engine = holder.engine
    if not isinstance(engine, PhotostackNodeEngine):
        return []
    members = engine.config.settings.get(pool.settings_key, [])
    return list(members) if isinstance(members, list) else []


def pool_routes(membership: Membership) -> list[Route]:
    """The control API's ``/v1/pools/...`` routes (answers 202 with every holder's view)."""

    async def view(request: Request) -> Response:
        return await _answer(membership.view(request.path_params["pool"]))

    async def add(request: Request) -> Response:
        body = await _json_body(request)
        try:
            member = (str(body["name"]), str(body["host"]), int(body["port"]))
            weight = float(body.get("weight", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, "bad_backend", f"need name, host and port: {exc!r}")
        return await _answer(membership.add(request.path_params["pool"], *member, weight))

    async def strategy(request: Request) -> Response:
        body = await _json_body(request)
        pool = request.path_params["pool"]
        return await _answer(membership.set_strategy(pool, str(body.get("strategy"))))

    async def remove(request: Request) -> Response:
        params = request.path_params
        return await _answer(membership.remove(params["pool"], params["name"]))

    async def act(request: Request) -> Response:
        params = request.path_params
        if params["action"] == "drain":
            return await _answer(membership.drain(params["pool"], params["name"]))
        if params["action"] == "restore":
            return await _answer(membership.restore(params["pool"], params["name"]))
        return _error(
            404, "unknown_command", f"unknown command {params['action']!r} (drain, restore)"
        )

    return [
        Route("/v1/pools/{pool}", view, methods=["GET"]),
        Route("/v1/pools/{pool}/backends", add, methods=["POST"]),
        Route("/v1/pools/{pool}/strategy", strategy, methods=["PUT"]),
        Route("/v1/pools/{pool}/backends/{name}", remove, methods=["DELETE"]),
        Route("/v1/pools/{pool}/backends/{name}/{action}", act, methods=["POST"]),
    ]


async def _answer(call: Any) -> Response:
    try:
        result = await call
    except MembershipError as exc:
        return _error(exc.status, exc.code, str(exc))
    return JSONResponse(result, status_code=200)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body
