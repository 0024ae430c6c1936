"""How a drill acts on the cluster: only through the control API (nodes, chaos links) and the
nodes' public ``/metrics``. Async, because the drill's load runs on the same loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from photostack.ops.client import ClusterNotFound, ControlError

__all__ = ["AsyncControl", "ChaosDisabled"]

_POLL_S = 0.2


class ChaosDisabled(ControlError):
    """The cluster's topology has no ``[chaos]`` links."""


class AsyncControl:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One control API call; its JSON (None for 204). Raises ControlError (one line)."""
        try:
            response = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ClusterNotFound(
                f"cannot reach the control API at {self.base_url}: {exc}"
            ) from exc
        if response.status_code == 204:
            return None
        try:
            answer = response.json()
        except ValueError as exc:
            raise ControlError(f"control API answered {response.status_code} without JSON") from exc
        if response.status_code >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            code = error.get("code", response.status_code)
            kind = ChaosDisabled if code == "chaos_disabled" else ControlError
            raise kind(f"{error.get('message', 'refused')} ({code})")
        return answer

    # -- nodes ---------------------------------------------------------------------------------

    async def cluster(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("GET", "/v1/cluster")
        return answer

    async def node(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("GET", f"/v1/nodes/{name}")
        return answer

    async def command(self, name: str, command: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("POST", f"/v1/nodes/{name}/{command}")
        return answer

    async def nodes_of(self, role: str) -> list[dict[str, Any]]:
        return [n for n in (await self.cluster())["nodes"] if n["role"] == role]

    async def wait_ready(self, name: str, deadline_s: float, *, restarts_above: int = -1) -> bool:
        """Poll until ``name`` is ready (after more than ``restarts_above`` restarts)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            node = await self.node(name)
            if node["state"] == "ready" and node["restarts"] > restarts_above:
                return True
            await asyncio.sleep(_POLL_S)  # polling the supervisor's view under a deadline
        return False

    async def metrics(self, node: dict[str, Any]) -> str:
        """A node's ``/metrics`` text (its public address, as the control API lists it)."""
        try:
            response = await self._client.get(f"http://{node['address']}/metrics")
        except httpx.HTTPError as exc:
            raise ControlError(f"{node['name']} /metrics: {type(exc).__name__}") from exc
        return response.text

    # -- chaos links ---------------------------------------------------------------------------

    async def links(self) -> list[dict[str, Any]]:
        """Every chaos link. Raises ChaosDisabled when the topology has none."""
        answer: dict[str, Any] = await self.call("GET", "/v1/chaos/links")
        links: list[dict[str, Any]] = answer["links"]
        return links

    async def add_toxic(self, link: str, toxic: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("POST", f"/v1/chaos/links/{link}/toxics", toxic)
        return answer

    async def clear_toxics(self, link: str) -> None:
        await self.call("DELETE", f"/v1/chaos/links/{link}/toxics")
