"""`photostack status`'s replication table: per shard, what replication costs and shows.

From the control API's ``GET /v1/replication`` (the leader coordinator's view): the replication
mode and the CAP choice with their cost, the epoch and phase, and each replica's lag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["COSTS", "print_replication", "replication_rows"]

COSTS = {
    "async": "commit local; a failover may lose the replica's lag",
    "sync": "commit waits for one standby's flush; none lost",
    "remote_apply": "commit waits for one standby's replay; none lost, replica reads fresh",
    "cp": "partition: 503 consistency_unavailable rather than stale/split-brained answers",
    "ap": "partition: replica reads served with X-Data-Stale: true",
}


def replication_rows(view: dict[str, Any]) -> list[list[str]]:
    """One row per replicated shard (pure: tests feed it a view)."""
    rows = []
    for name, shard in sorted(view.get("shards", {}).items()):
        lags = []
        for replica, info in shard.get("replicas", {}).items():
            if info.get("lag_bytes") is None:
                lags.append(f"{replica}: down" if not info.get("reachable") else f"{replica}: ?")
                continue
            seconds = info.get("lag_s")
            lag_s = "0s" if seconds is None else f"{float(seconds):.3f}s"
            sync = f" {info['sync_state']}" if info.get("sync_state") else ""
            lags.append(f"{replica}{sync}: {int(info['lag_bytes'])}B/{lag_s}")
        rows.append(
            [
                name,
                shard.get("primary", "?"),
                str(shard.get("epoch", "?")),
                f"{shard.get('replication')}: {COSTS.get(str(shard.get('replication')), '')}",
                f"{shard.get('consistency')}: {COSTS.get(str(shard.get('consistency')), '')}",
                str(shard.get("phase", "?")),
                "; ".join(lags) or "-",
            ]
        )
    return rows


def print_replication(console: Console, data_dir: Path, port_base: int | None) -> None:
    """Print the table, or one line saying why there is none (never fails `status`)."""
    from photostack.ops.client import ControlClient, ControlError, find_control_url

    try:
        with ControlClient(find_control_url(data_dir, port_base), timeout_s=5.0) as client:
            view = client.request("GET", "/v1/replication")
    except ControlError as exc:
        console.print(f"replication: {exc}")
        return
    table = Table(
        title=f"replication (coordinator leader {view.get('leader_name') or '?'}, "
        f"term {view.get('term')})"
    )
    for column in ("shard", "primary", "epoch", "replication", "consistency", "phase", "lag"):
        table.add_column(column)
    for row in replication_rows(view):
        table.add_row(*row)
    console.print(table)
