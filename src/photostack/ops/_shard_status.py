"""`photostack status`'s shard-skew lines: per storage group, rows and tx/s per physical shard
and their std / mean (``photostack_shard_skew{group}`` in the control API's ``/metrics``).

From the control API's ``GET /v1/shards`` (docs/resharding.md). tx/s is the rise of each shard's
transaction counter since the previous call, so the first `status` after a start shows rows only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

__all__ = ["fetch_shard_skew", "print_shard_skew", "skew_lines"]


def skew_lines(view: dict[str, Any]) -> list[str]:
    """One line per group (pure: tests feed it a view)."""
    lines = []
    for group in view.get("groups", []):
        name = group.get("group", "?")
        if "error" in group:
            lines.append(f"{name}: shards unreadable ({group['error']})")
            continue
        line = f"{name}: rows per shard {group['rows']} skew (std/mean) {group['rows_skew']:.3f}"
        if group.get("tps") is not None:
            line += f"; tx/s {group['tps']} load skew {group['load_skew']:.3f}"
        lines.append(line)
    return lines


def fetch_shard_skew(data_dir: Path, port_base: int | None) -> dict[str, Any] | None:
    """The control API's view, or None (with the reason) when it has none."""
    from photostack.ops.client import ControlClient, ControlError, find_control_url

    try:
        with ControlClient(find_control_url(data_dir, port_base), timeout_s=10.0) as client:
            return client.request("GET", "/v1/shards")
    except ControlError as exc:
        return {"error": str(exc)}


def print_shard_skew(console: Console, view: dict[str, Any] | None) -> None:
    """Print the lines, or one line saying why there are none (never fails `status`)."""
    if view is None:
        return
    if "error" in view:
        console.print(f"shard skew: unavailable ({view['error']})")
        return
    console.print(f"shard skew (map version {view.get('map_version')}):")
    for line in skew_lines(view):
        console.print(f"  {line}")
