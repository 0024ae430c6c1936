"""`reshard add-shard` on a group with a synchronous replica: the new shard gets the group's
replica, streaming from the new primary as its synchronous standby, listed in the map and watched
by the failover coordinator, which can switch the shard over to it; the next `up` starts it again
in the replicas' phase; and `remove-shard` retires it with the shard's primary (docs/resharding.md,
"The new shard")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.harness import RunningCluster, free_port_base, new_user, running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TOPOLOGY = """
[cluster]
name = "photostack-reshard-replicas"
host = "127.0.0.1"

[web]
count = 1

[app]
count = 1

[cache]
count = 1

[storage.users]
shards = 1
replicas = 1
replication = "sync"

[storage.social]
shards = 1
replicas = 0

[storage.photos]
shards = 1
replicas = 0

[directory]
count = 1
replicas = 0

[queue]
replicas = 0
"""

DEADLINE_S = 120.0


def _json(cluster: RunningCluster, *args: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(cluster.cli(*args, "--json").stdout)
    return body


def _wait_move(cluster: RunningCluster) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        move: dict[str, Any] = _json(cluster, "reshard", "status")["moves"][0]
        if move["state"] in ("done", "cancelled", "failed"):
            return move
        assert time.monotonic() < deadline, move
        time.sleep(0.5)  # polling the move's persisted state under a deadline


def _nodes(cluster: RunningCluster) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in _json(cluster, "status")["nodes"]}


def _wait_streaming(cluster: RunningCluster, primary: str, replica: str) -> None:
    """pg_stat_replication on ``primary`` (its `status` figures) shows ``replica`` as its
    synchronous standby; ``replica`` is in recovery."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        nodes = _nodes(cluster)
        if nodes[primary]["figures"].get("replicas") == {replica: "streaming/sync"}:
            break
        assert time.monotonic() < deadline, nodes[primary]
        time.sleep(0.5)  # polling pg_stat_replication under a deadline
    assert nodes[replica]["figures"]["in_recovery"] is True


def _users_readable(api: httpx.Client, users: list[dict[str, Any]]) -> None:
    for user in users:
        answer = api.get(f"/v1/users/{user['id']}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["username"] == user["username"]


def test_added_shard_has_a_sync_replica_that_restarts_and_retires(tmp_path: Path) -> None:
    topology = tmp_path / "reshard-replicas.toml"
    topology.write_text(TOPOLOGY, encoding="utf-8")
    data_dir, base = tmp_path / "data", free_port_base()
    with (
        running_cluster(data_dir, base, topology=topology, discard=False) as first,
        httpx.Client(base_url=first.api, timeout=10) as api,
    ):
        users = [new_user(api) for _ in range(20)]
        started = first.cli("reshard", "add-shard", "users")
        assert "add-shard users -> users-2-primary" in started.stdout
        assert _wait_move(first)["state"] == "done"
        added = _json(first, "directory", "show")["groups"]["users"]["shards"][1]
        assert added["primary"]["name"] == "users-2-primary"
        assert [r["name"] for r in added["replicas"]] == ["users-2-replica-1"]
        _wait_streaming(first, "users-2-primary", "users-2-replica-1")
        # the coordinator watches the new shard with the group's mode
        deadline = time.monotonic() + DEADLINE_S
        while True:
            answer = httpx.get(f"{first.control}/v1/replication", timeout=10)
            view = answer.json().get("shards", {}).get("users-2", {})
            replica = view.get("replicas", {}).get("users-2-replica-1", {})
            if replica.get("sync_state") == "sync":
                break
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)  # the coordinator samples its shards every round
        assert (view["primary"], view["replication"]) == ("users-2-primary", "sync")
        # writes on both shards are acknowledged (the new one's by its sync standby)
        users += [new_user(api) for _ in range(20)]
        _users_readable(api, users)

    with running_cluster(data_dir, base, topology=topology) as second:
        _wait_streaming(second, "users-2-primary", "users-2-replica-1")  # `up` restarted both
        with httpx.Client(base_url=second.api, timeout=10) as api:
            _users_readable(api, users)
            # the coordinator can fail the new shard over: a planned switchover to its replica
            deadline = time.monotonic() + DEADLINE_S
            while True:
                done = second.cli("failover", "users-2", check=False)
                if done.returncode == 0:
                    break
                assert time.monotonic() < deadline, done.stderr  # e.g. 503 while it settles
                time.sleep(1.0)  # the coordinator's Retry-After
            shards = _json(second, "directory", "show")["groups"]["users"]["shards"]
            assert shards[1]["primary"]["name"] == "users-2-replica-1"
            assert [r["name"] for r in shards[1]["replicas"]] == ["users-2-primary"]
            _wait_streaming(second, "users-2-replica-1", "users-2-primary")  # old one rejoined
            users += [new_user(api) for _ in range(20)]
            _users_readable(api, users)
            second.cli("reshard", "remove-shard", "users", "2")
            assert _wait_move(second)["state"] == "done"
            retired = data_dir / "reshard-retired.json"
            members = ("users-2-primary", "users-2-replica-1")  # retired together
            deadline = time.monotonic() + DEADLINE_S
            while True:
                nodes = _nodes(second)
                names = json.loads(retired.read_text("utf-8")) if retired.exists() else []
                states = {nodes[n]["state"] for n in members}
                if set(members) <= set(names) and states == {"stopped"}:
                    break
                assert time.monotonic() < deadline, (names, states)
                time.sleep(0.5)  # retiring runs once the move is done
            assert len(_json(second, "directory", "show")["groups"]["users"]["shards"]) == 1
            _users_readable(api, users)
