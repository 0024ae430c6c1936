"""The directory service on a running cluster (one `up` of the small topology): the map version
in `photostack status`, directory nodes killed under load with no failed request and the map
kept across their restarts, and user deletion and jobs through the control plane."""

from __future__ import annotations

import contextlib
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
        "directory-1-replica-1": "streaming/sync"
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


def _directory_db(cluster: RunningCluster) -> list[dict[str, Any]]:
    """Every directory node's ``GET /v1/directory-db`` (the directory database's failover)."""
    views = []
    for node in _nodes(cluster).values():
        if node["role"] == "directory" and node["state"] == "ready":
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(f"http://{node['address']}/v1/directory-db", timeout=2)
                if answer.status_code == 200:
                    views.append(answer.json())
    return views


def _directory_db_healthy(cluster: RunningCluster) -> bool:
    """Both directory nodes name the same primary, and a standby streams from it."""
    views = _directory_db(cluster)
    if len(views) != 2 or len({(v["primary"], v["generation"]) for v in views}) != 1:
        return False
    members = views[0]["members"]
    return any(m["in_recovery"] and m["streaming"] for m in members)


def test_killing_the_directory_primary_keeps_the_map_and_the_cluster_writable(
    cluster: RunningCluster, api: httpx.Client
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not _directory_db_healthy(cluster):
        assert time.monotonic() < deadline, _directory_db(cluster)
        time.sleep(0.2)
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)
    primary = _directory_db(cluster)[0]["primary"]
    assert f"kill: {primary}" in cluster.cli("kill", primary).stdout
    # restarted in place by the supervisor, or failed over by the directory nodes (the old
    # primary then rejoins as a standby): either way one primary, a streaming standby again
    deadline = time.monotonic() + 2 * DEADLINE_S
    while not _directory_db_healthy(cluster):
        assert time.monotonic() < deadline, _directory_db(cluster)
        time.sleep(0.2)
    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    assert after["version"] >= before["version"]  # no map version lost
    writer = _new_user(api)  # writes work again (the coordinator leads, fences renewed)
    deadline = time.monotonic() + DEADLINE_S
    while api.get(f"/v1/users/{writer['id']}").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_stopped_directory_primary_is_failed_over_and_rejoins_as_a_standby(
    cluster: RunningCluster, api: httpx.Client
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not _directory_db_healthy(cluster):
        assert time.monotonic() < deadline, _directory_db(cluster)
        time.sleep(0.2)
    first = _directory_db(cluster)[0]
    old, generation = first["primary"], first["generation"]
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)
    cluster.cli("stop", old)  # stays down: the directory nodes promote the standby

    def moved() -> bool:
        views = _directory_db(cluster)
        return len(views) == 2 and all(
            v["generation"] == generation + 1 and v["primary"] != old for v in views
        )

    deadline = time.monotonic() + DEADLINE_S
    while not moved():
        assert time.monotonic() < deadline, _directory_db(cluster)
        time.sleep(0.2)
    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    assert after["version"] >= before["version"]  # no map version lost
    # the coordinator leads again from the new primary: writes work (503 + Retry-After while
    # its lease moves over)
    deadline = time.monotonic() + DEADLINE_S
    while (
        created := api.post("/v1/users", json={"username": f"d_{uuid.uuid4().hex[:12]}"})
    ).status_code != 201:
        assert created.status_code == 503, created.text
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert api.get(f"/v1/users/{created.json()['id']}").status_code == 200
    cluster.cli("start", old)  # rejoined (pg_rewind or base backup), never a primary again
    deadline = time.monotonic() + 2 * DEADLINE_S
    while not _directory_db_healthy(cluster):
        assert time.monotonic() < deadline, _directory_db(cluster)
        time.sleep(0.2)
    members = {m["name"]: m for m in _directory_db(cluster)[0]["members"]}
    assert members[old]["in_recovery"]
    assert members[old]["streaming"]


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
