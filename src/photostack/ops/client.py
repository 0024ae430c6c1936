"""How ops commands reach a running cluster: only through its control API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from photostack.cluster.topology import CONTROL_PORT_OFFSET

__all__ = ["ClusterNotFound", "ControlClient", "ControlError", "find_control_url"]


class ControlError(Exception):
    """The control API refused a command or could not be reached. One line for the user."""


class ClusterNotFound(ControlError):
    pass


def find_control_url(data_dir: Path, port_base: int | None, host: str = "127.0.0.1") -> str:
    """The control URL of the cluster named by ``--port-base`` or running from ``--data-dir``."""
    if port_base is not None:
        return f"http://{host}:{port_base + CONTROL_PORT_OFFSET}"
    state_file = data_dir / "cluster.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        url = state["control_url"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterNotFound(
            f"no running cluster found in {data_dir} (start one with `photostack up`, "
            "or pass --data-dir/--port-base)"
        ) from exc
    if not isinstance(url, str):
        raise ClusterNotFound(f"{state_file} is damaged: control_url is not a string")
    return url


class ControlClient:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url
        self._client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def cluster(self) -> dict[str, Any]:
        return self._call("GET", "/v1/cluster")

    def command(self, node: str, command: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/nodes/{node}/{command}")

    def request(self, method: str, path: str) -> dict[str, Any]:
        """Any other control API call (jobs, user deletion, the directory's map)."""
        return self._call(method, path)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            response = self._client.request(method, path)
        except httpx.HTTPError as exc:
            raise ClusterNotFound(
                f"cannot reach the control API at {self.base_url}: {exc}"
            ) from exc
        try:
            body: dict[str, Any] = response.json()
        except ValueError as exc:
            raise ControlError(f"control API answered {response.status_code} without JSON") from exc
        if response.status_code >= 400:
            error = body.get("error", {})
            raise ControlError(
                f"{error.get('message', 'refused')} ({error.get('code', response.status_code)})"
            )
        return body
