"""The directory service on a running cluster (one `up` of the small topology): the map version
in `photostack status`, directory nodes killed under load with no failed request and the map
kept across their restarts, and user deletion and jobs through the control plane."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.cluster.harness import RunningCluster

pytestmark = pytest.mark.cluster

DEADLINE_S = 60.0


def _new_user(api: httpx.Client) -> dict[str, Any]:
    response = api.post("/v1/users", json={"username": f"d_{uuid.uuid4().hex[:12]}"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _nodes(cluster: RunningCluster) -> dict[str, dict[str, Any]]:
    status = json.loads(cluster.cli("status", "--json").stdout)
    return {n["name"]: n for n in status["nodes"]}


def _wait_restarted(cluster: RunningCluster, name: str, restarts_before: int) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        node = _nodes(cluster)[name]
        if node["state"] == "ready" and node["restarts"] > restarts_before and node["figures"]:
            return node
    pytest.fail(f"{name} did not come back within {DEADLINE_S}s")


def test_status_shows_the_map_version(cluster: RunningCluster) -> None:
    nodes = _nodes(cluster)
    for name in ("directory-1", "directory-2"):
        assert nodes[name]["role"] == "directory"
        assert nodes[name]["state"] == "ready"
        assert nodes[name]["figures"]["map_version"] >= 1
    assert nodes["directory-1-primary"]["figures"]["replicas"] == {
        "directory-1-replica-1": "streaming/async"
    }
    table = cluster.cli("status").stdout
    assert "map_version" in table
    shown = cluster.cli("directory", "show").stdout
    assert shown.startswith("shard map version ")
    assert "social: logical-hash-mod, 128 logical shards" in shown


def test_killing_directory_nodes_fails_no_request_and_keeps_the_map(
    cluster: RunningCluster, api: httpx.Client
) -> None:
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)
    alice, bob = _new_user(api), _new_user(api)
    auth = {"Authorization": f"Bearer {alice['token']}"}
    failures: list[str] = []
    count = 0
    done = threading.Event()

    def load() -> None:
        nonlocal count
        with httpx.Client(base_url=cluster.api, timeout=10) as client:
            deadline = time.monotonic() + 3 * DEADLINE_S
            while not done.is_set() and time.monotonic() < deadline:
                follow = f"/v1/users/{alice['id']}/following/{bob['id']}"
                for response in (
                    client.get(f"/v1/users/{bob['id']}"),
                    client.get(f"/v1/users/{alice['id']}/photos"),
                    client.put(follow, headers=auth),
                    client.delete(follow, headers=auth),
                ):
                    count += 1
                    if response.status_code not in (200, 204):
                        failures.append(f"{response.status_code} {response.text}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for name in ("directory-1", "directory-2"):  # one at a time: the other one serves
            restarts = _nodes(cluster)[name]["restarts"]
            assert f"kill: {name}" in cluster.cli("kill", name).stdout
            node = _wait_restarted(cluster, name, restarts)
            assert node["figures"]["map_version"] == before["version"]
    finally:
        done.set()
        worker.join()
    assert failures == []
    assert count > 20
    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    assert after == before


def test_deleting_a_user_through_the_control_plane(
    cluster: RunningCluster, api: httpx.Client
) -> None:
    gone, stays = _new_user(api), _new_user(api)
    response = api.put(
        f"/v1/users/{gone['id']}/following/{stays['id']}",
        headers={"Authorization": f"Bearer {gone['token']}"},
    )
    assert response.status_code == 204
    assert api.get(f"/v1/users/{stays['id']}").json()["followers_count"] == 1

    result = cluster.cli("users", "delete", gone["id"])
    assert f"delete: user {gone['id']} recorded" in result.stdout
    assert api.get(f"/v1/users/{gone['id']}").status_code == 404
    report = json.loads(cluster.cli("jobs", "run", "user-cleanup").stdout)
    assert report["job"] == "user-cleanup"
    deadline = time.monotonic() + DEADLINE_S
    while api.get(f"/v1/users/{stays['id']}").json()["followers_count"] != 0:
        assert time.monotonic() < deadline, "the deleted user's edges were not cleaned up"
        cluster.cli("jobs", "run", "user-cleanup", check=False)
    assert api.get(f"/v1/users/{stays['id']}/followers").json()["items"] == []

    sweep = json.loads(cluster.cli("jobs", "run", "orphan-sweep").stdout)
    assert sweep["shards"]["complete"] is True
    assert sweep["dangling"]["following"] == 0
    reconcile = json.loads(cluster.cli("jobs", "run", "reconcile-follows").stdout)
    assert reconcile["shards"]["complete"] is True

    unknown = cluster.cli("jobs", "run", "nope", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().count("\n") == 0
    assert "unknown_job" in unknown.stderr
    missing = cluster.cli("users", "delete", "nobody0000000000", check=False)
    assert missing.returncode == 1
    assert "user_not_found" in missing.stderr
