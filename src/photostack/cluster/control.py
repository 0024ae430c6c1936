"""The control API and dashboard, served by the supervisor on the dashboard port.

Everything `photostack status|kill|stop|start` (and later drills and benches) does to a running
cluster goes through here, so the CLI never touches processes itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from photostack.cluster._roles import RoleKeeper, replication_routes
from photostack.cluster.membership import Membership, MembershipError, pool_routes
from photostack.cluster.ops_routes import ops_routes
from photostack.cluster.reshard_ops import GroupReplication, ReshardControl, reshard_routes
from photostack.cluster.state import NodeState
from photostack.cluster.supervisor import CommandRefused, ManagedNode, Supervisor

__all__ = ["ClusterInfo", "ControlServer", "create_control_app"]

FiguresFn = Callable[[ManagedNode], Awaitable[dict[str, Any]]]


@dataclass
class ClusterInfo:
    name: str
    port_base: int
    data_dir: str
    urls: dict[str, str]
    ready: bool = False
    # per product group, what `reshard add-shard` gives a new shard (plan.group_replication)
    replication: dict[str, GroupReplication] = field(default_factory=dict)


class _JSON(JSONResponse):
    media_type = "application/json; charset=utf-8"


def _error(status: int, code: str, message: str) -> _JSON:
    return _JSON({"error": {"code": code, "message": message}}, status_code=status)


def create_control_app(supervisor: Supervisor, info: ClusterInfo, figures: FiguresFn) -> Starlette:
    registry = CollectorRegistry()
    node_up = Gauge(
        "photostack_node_ready",
        "1 when the node answers its readiness probe",
        ["node", "role"],
        registry=registry,
    )
    restarts = Gauge(
        "photostack_node_restarts",
        "Restarts of the node by the supervisor",
        ["node", "role"],
        registry=registry,
    )
    commands = Counter(
        "photostack_control_commands", "Control commands received", ["command"], registry=registry
    )
    membership = Membership(supervisor)
    supervisor.on_ready = membership.on_ready
    roles = RoleKeeper(supervisor, lambda: info.ready)  # failover: follow the map (_roles.py)
    supervisor.before_launch = roles.before_launch
    supervisor.watchers.append(roles.run)
    # docs/resharding.md; photostack_shard_skew{group} in the registry, sampled by a watcher
    reshard = ReshardControl(supervisor, Path(info.data_dir), registry, info.replication)
    supervisor.watchers += [reshard.resume, reshard.sample_metrics_forever]

    def node_or_404(name: str) -> ManagedNode:
        node = supervisor.nodes.get(name)
        if node is None:
            raise HTTPException(404, f"no node named {name!r}")
        return node

    async def describe(node: ManagedNode) -> dict[str, Any]:
        body: dict[str, Any] = dict(node.describe())
        body["figures"] = await figures(node) if node.lifecycle.state is NodeState.READY else {}
        return body

    async def healthz(request: Request) -> Response:
        if info.ready:
            return _JSON({"status": "ok"})
        return _JSON({"status": "starting"}, status_code=503)

    async def cluster(request: Request) -> Response:
        nodes = await asyncio.gather(*(describe(n) for n in supervisor.nodes.values()))
        return _JSON(
            {
                "name": info.name,
                "ready": info.ready,
                "port_base": info.port_base,
                "data_dir": info.data_dir,
                "urls": info.urls,
                "nodes": list(nodes),
            }
        )

    async def node_detail(request: Request) -> Response:
        return _JSON(await describe(node_or_404(request.path_params["name"])))

    async def node_command(request: Request) -> Response:
        command = request.path_params["command"]
        name = request.path_params["name"]
        if command == "start" and name not in supervisor.nodes:
            try:  # `photostack start web-3`: a new node of a stateless role
                await membership.create_node(name)
            except MembershipError as exc:
                return _error(exc.status, exc.code, str(exc))
        node = node_or_404(name)
        commands.labels(command).inc()
        try:
            if command == "kill":
                supervisor.kill(node.name)
            elif command == "stop":
                await membership.drain_for_stop(node)  # web/app: out of its pool first
                await supervisor.stop(node.name)
            elif command == "start":
                await supervisor.start(node.name)
            else:
                return _error(
                    404, "unknown_command", f"unknown command {command!r} (kill|stop|start)"
                )
        except CommandRefused as exc:
            return _error(409, "invalid_state", str(exc))
        return _JSON(node.describe(), status_code=202)

    async def metrics(request: Request) -> Response:
        for node in supervisor.nodes.values():
            labels = (node.name, node.spec.role.value)
            node_up.labels(*labels).set(1 if node.lifecycle.state is NodeState.READY else 0)
            restarts.labels(*labels).set(node.restarts)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(_DASHBOARD.replace("{{name}}", info.name))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(exc.status_code, code, str(exc.detail))

    return Starlette(
        routes=[
            Route("/", dashboard),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            Route("/v1/cluster", cluster),
            Route("/v1/nodes/{name}", node_detail),
            Route("/v1/nodes/{name}/{command}", node_command, methods=["POST"]),
            *pool_routes(membership),
            *ops_routes(supervisor),
            *replication_routes(roles),
            *reshard_routes(reshard),
        ],
        exception_handlers={HTTPException: http_error},
    )


class ControlServer(uvicorn.Server):
    """uvicorn inside the supervisor's loop; the supervisor, not uvicorn, owns the signals."""

    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


_DASHBOARD = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{name}} - photostack</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
.ready{color:#080}.unhealthy,.backoff,.failed{color:#c00}.stopped,.stopping,.starting{color:#a60}
code{font-size:12px;color:#555}
</style></head>
<body><h1>{{name}}</h1><p id="summary">loading...</p>
<table><thead><tr><th>node</th><th>role</th><th>address</th><th>pid</th><th>state</th>
<th>restarts</th><th>figures</th><th></th></tr></thead><tbody id="nodes"></tbody></table>
<script>
async function act(name, cmd){await fetch(`/v1/nodes/${name}/${cmd}`,{method:'POST'});refresh();}
async function refresh(){
  const r = await fetch('/v1/cluster'); const c = await r.json();
  document.getElementById('summary').textContent =
    (c.ready ? 'ready' : 'starting') + ' - ' +
    Object.entries(c.urls).map(([k,v])=>k+'='+v).join(' ');
  const rows = c.nodes.map(n => `<tr><td>${n.name}</td><td>${n.role}</td><td>${n.address}</td>
    <td>${n.pid ?? ''}</td><td class="${n.state}">${n.state}</td><td>${n.restarts}</td>
    <td><code>${Object.entries(n.figures).map(([k,v])=>k+'='+JSON.stringify(v))
      .join(' ')}</code></td>
    <td><button onclick="act('${n.name}','kill')">kill</button>
    <button onclick="act('${n.name}','stop')">stop</button>
    <button onclick="act('${n.name}','start')">start</button></td></tr>`);
  document.getElementById('nodes').innerHTML = rows.join('');
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
