"""The walking skeleton end to end: `photostack up` on the small topology, used like a client."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import psutil
import pytest

from tests.cluster.harness import (
    READY_DEADLINE_S,
    RunningCluster,
    free_port_base,
    photostack,
    running_cluster,
    start_cluster,
)

pytestmark = pytest.mark.cluster


def _new_user(api: httpx.Client, prefix: str = "u") -> dict[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    response = api.post("/v1/users", json={"username": name, "display_name": name.upper()})
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body


def _auth(user: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


def test_users_and_follows_through_the_edge(api: httpx.Client) -> None:
    alice, bob = _new_user(api, "alice"), _new_user(api, "bob")
    assert set(alice) == {"id", "username", "display_name", "created_at", "token"}
    response = api.put(f"/v1/users/{alice['id']}/following/{bob['id']}", headers=_auth(alice))
    assert response.status_code == 204
    assert (
        api.put(f"/v1/users/{alice['id']}/following/{bob['id']}", headers=_auth(alice)).status_code
        == 204
    )

    bob_view = api.get(f"/v1/users/{bob['id']}").json()
    assert (bob_view["followers_count"], bob_view["following_count"], bob_view["photos_count"]) == (
        1,
        0,
        0,
    )
    by_name = api.get(f"/v1/users/by-username/{alice['username']}").json()
    assert by_name["id"] == alice["id"]
    assert by_name["following_count"] == 1

    followers = api.get(f"/v1/users/{bob['id']}/followers").json()
    assert [u["id"] for u in followers["items"]] == [alice["id"]]
    assert followers["next_cursor"] is None
    following = api.get(f"/v1/users/{alice['id']}/following").json()
    assert [u["id"] for u in following["items"]] == [bob["id"]]

    assert (
        api.delete(
            f"/v1/users/{alice['id']}/following/{bob['id']}", headers=_auth(alice)
        ).status_code
        == 204
    )
    assert (
        api.delete(
            f"/v1/users/{alice['id']}/following/{bob['id']}", headers=_auth(alice)
        ).status_code
        == 204
    )
    assert api.get(f"/v1/users/{bob['id']}").json()["followers_count"] == 0


def test_every_error_has_the_contract_shape(api: httpx.Client) -> None:
    alice, bob = _new_user(api), _new_user(api)
    cases = [
        (
            api.post("/v1/users", content=b"{nope", headers={"Content-Type": "application/json"}),
            400,
        ),
        (api.post("/v1/users", json={"username": "A!"}), 422),
        (api.post("/v1/users", json={"username": alice["username"]}), 409),
        (api.get("/v1/users/doesnotexist"), 404),
        (api.get("/v1/users/by-username/nobody_here_at_all"), 404),
        (api.put(f"/v1/users/{alice['id']}/following/{bob['id']}"), 401),
        (
            api.put(
                f"/v1/users/{alice['id']}/following/{bob['id']}",
                headers={"Authorization": "Bearer forged.token.value"},
            ),
            401,
        ),
        (api.put(f"/v1/users/{bob['id']}/following/{alice['id']}", headers=_auth(alice)), 403),
        (api.put(f"/v1/users/{alice['id']}/following/nobody", headers=_auth(alice)), 404),
        (api.put(f"/v1/users/{alice['id']}/following/{alice['id']}", headers=_auth(alice)), 422),
        (api.get(f"/v1/users/{alice['id']}/followers?limit=0"), 422),
        (api.get(f"/v1/users/{alice['id']}/followers?limit=101"), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        error = response.json()["error"]
        assert error["code"]
        assert error["message"]
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert response.headers["x-request-id"]
        assert response.headers["x-served-by"].startswith("web-")


def test_request_id_is_echoed_and_reads_reach_both_app_nodes(api: httpx.Client) -> None:
    user = _new_user(api)
    served = set()
    for _ in range(20):
        response = api.get(f"/v1/users/{user['id']}", headers={"X-Request-Id": "trace-123"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "trace-123"
        served.update(response.headers["x-served-by"].split(","))
    assert {"web-1", "app-1", "app-2"} <= served


def test_a_replica_streams_from_its_primary(cluster: RunningCluster) -> None:
    status = json.loads(cluster.cli("status", "--json").stdout)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["users-1-primary"]["figures"]["replicas"] == {
        "users-1-replica-1": "streaming/async"
    }
    assert nodes["users-1-replica-1"]["figures"]["in_recovery"] is True
    assert all(n["state"] == "ready" for n in nodes.values())
    table = cluster.cli("status").stdout
    assert "users-1-replica-1" in table
    assert "ready" in table


def test_killing_an_app_node_fails_no_request_and_it_returns(
    cluster: RunningCluster, api: httpx.Client
) -> None:
    user = _new_user(api)
    before = json.loads(cluster.cli("status", "--json").stdout)
    restarts_before = {n["name"]: n["restarts"] for n in before["nodes"]}["app-1"]
    failures: list[str] = []
    done = threading.Event()
    count = 0

    def load() -> None:
        nonlocal count
        with httpx.Client(base_url=cluster.api, timeout=10) as client:
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                response = client.get(f"/v1/users/{user['id']}")
                count += 1
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert "kill: app-1" in cluster.cli("kill", "app-1").stdout
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = {
                n["name"]: n for n in json.loads(cluster.cli("status", "--json").stdout)["nodes"]
            }
            if nodes["app-1"]["state"] == "ready" and nodes["app-1"]["restarts"] > restarts_before:
                break
        else:
            pytest.fail("app-1 did not come back within 60s")
    finally:
        done.set()
        worker.join()
    assert failures == []
    assert count > 10


def test_stop_and_start_a_node(cluster: RunningCluster) -> None:
    assert "stop: app-2 is stopped" in cluster.cli("stop", "app-2").stdout
    again = cluster.cli("stop", "app-2").stdout
    assert "stopped" in again
    assert "start: app-2" in cluster.cli("start", "app-2").stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nodes = {n["name"]: n for n in json.loads(cluster.cli("status", "--json").stdout)["nodes"]}
        if nodes["app-2"]["state"] == "ready":
            break
    else:
        pytest.fail("app-2 did not start again")


def test_unknown_node_is_a_one_line_error(cluster: RunningCluster) -> None:
    result = cluster.cli("kill", "app-9", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "app-9" in result.stderr


def test_data_survives_a_restart_and_ctrl_c_leaves_nothing_behind(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("restart")
    base = free_port_base()
    with running_cluster(data_dir, base, discard=False) as first:
        with httpx.Client(base_url=first.api, timeout=10) as client:
            user = _new_user(client)
        pids = set(
            json.loads(first.cli("status", "--json").stdout)["nodes"][i]["pid"] for i in range(3)
        )
    assert first.process.returncode == 0
    assert not any(psutil.pid_exists(pid) for pid in pids if pid)
    started = time.monotonic()
    with running_cluster(data_dir, base) as second:
        warm_s = time.monotonic() - started
        with httpx.Client(base_url=second.api, timeout=10) as client:
            again = client.get(f"/v1/users/{user['id']}")
            assert again.status_code == 200
            assert again.json()["username"] == user["username"]
    assert second.process.returncode == 0
    assert warm_s < 60  # the contract is 15 s on an idle machine; the suite's machine is busy
    leftovers = [
        p.info
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_a_port_in_use_is_a_one_line_error_leaving_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import socket

    base = free_port_base()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", base))
        blocker.listen()
        result = photostack(
            "up",
            "--data-dir",
            str(tmp_path_factory.mktemp("busy")),
            "--port-base",
            str(base),
            check=False,
        )
    assert result.returncode == 1
    assert f"port 127.0.0.1:{base} is already in use" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_bad_topology_is_a_one_line_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("topo") / "bad.toml"
    path.write_text("[web]\ncount = 0\n")
    result = photostack("up", "--topology", str(path), "--data-dir", str(path.parent), check=False)
    assert result.returncode == 2
    assert result.stdout.strip().startswith("error: ")
    assert "count = 0" in result.stdout


def test_up_after_a_killed_supervisor_stops_its_leftovers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("orphans")
    base = free_port_base()
    first = start_cluster(data_dir, base)
    try:
        first.wait_for_line("ready: ", READY_DEADLINE_S)
        nodes = json.loads(photostack("status", "--json", "--data-dir", str(data_dir)).stdout)
        orphans = [n["pid"] for n in nodes["nodes"] if n["pid"]]
        first.process.kill()  # the supervisor dies without stopping its nodes
        first.process.wait(30)
        assert all(psutil.pid_exists(pid) for pid in orphans)
        with running_cluster(data_dir, base) as second:
            assert "stopping leftover process" in "".join(second.lines)
            assert not any(_alive(pid) for pid in orphans)
    finally:
        first.stop()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
