"""Uploads on a real cluster (ONE `photostack up`): through the edge -> 202 -> a supervised
worker makes the thumbnail -> the follower's feed; a worker SIGKILLed mid-task loses nothing
(its task is redelivered after the visibility timeout); with every worker stopped uploads are
still accepted and complete when the workers come back. The queue has its own database with a
streaming replica."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from PIL import Image

from photostack.cluster.engines import postgres_dsn
from photostack.cluster.plan import DATABASE
from photostack.cluster.topology import layout, parse_topology
from tests.cluster.harness import ONE_SHARD_STORES, RunningCluster, cluster_from_text, new_user

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TOPOLOGY = (
    """
[cluster]
name = "photostack-uploads"
host = "127.0.0.1"

[web]
count = 1

[app]
count = 1

[cache]
count = 1
"""
    + ONE_SHARD_STORES
    + """
[directory]
count = 1
replicas = 0

[queue]
replicas = 1

[workers]
count = 2
concurrency = 2
visibility_timeout_s = 3
"""
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("uploads")
    with cluster_from_text(root, "uploads", TOPOLOGY) as running:
        yield running


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


def _jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def _upload(api: httpx.Client, user: dict[str, Any], data: bytes) -> dict[str, Any]:
    r = api.post(
        "/v1/photos", headers=_auth(user), files={"file": ("p.jpg", data)}, data={"caption": "c"}
    )
    assert r.status_code == 202, r.text
    return dict(r.json())


def _task(api: httpx.Client, user: dict[str, Any], task_id: str) -> dict[str, Any]:
    r = api.get(f"/v1/tasks/{task_id}", headers=_auth(user))
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_succeeded(
    api: httpx.Client, user: dict[str, Any], task_ids: list[str], deadline_s: float = 90.0
) -> list[dict[str, Any]]:
    end = time.monotonic() + deadline_s
    while True:
        found = [_task(api, user, t) for t in task_ids]
        if all(t["status"] == "succeeded" for t in found):
            return found
        assert time.monotonic() < end, f"tasks not done: {found}"
        time.sleep(0.2)


def _queue_dsn(cluster: RunningCluster) -> str:
    node = layout(parse_topology(TOPOLOGY), cluster.port_base).node("queue-1-primary")
    return postgres_dsn(node.host, node.port, DATABASE)


def _status(cluster: RunningCluster) -> dict[str, dict[str, Any]]:
    out = json.loads(cluster.cli("status", "--json").stdout)
    nodes = out["nodes"] if isinstance(out, dict) else out
    return {n["name"]: n for n in nodes}


def _wait_state(cluster: RunningCluster, name: str, state: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while _status(cluster)[name]["state"] != state:
        assert time.monotonic() < end, f"{name} never {state}"
        time.sleep(0.2)


def test_upload_through_the_edge_reaches_a_followers_feed(cluster: RunningCluster) -> None:
    with httpx.Client(base_url=cluster.api, timeout=30.0) as api:
        alice, bob = new_user(api), new_user(api)
        r = api.put(f"/v1/users/{bob['id']}/following/{alice['id']}", headers=_auth(bob))
        assert r.status_code == 204
        made = _upload(api, alice, _jpeg((800, 600)))
        assert made["photo"]["status"] == "processing"
        (done,) = _wait_succeeded(api, alice, [made["task"]["id"]])
        _wait_succeeded(api, alice, [done["result"]["fanout_task"]])
        photo = api.get(f"/v1/photos/{made['photo']['id']}").json()
        assert photo["status"] == "ready"
        # both files are served by the CDN edge on the static host, from the media origins
        for url in (photo["urls"]["thumbnail"], photo["urls"]["original"]):
            first, again = httpx.get(url, timeout=30.0), httpx.get(url, timeout=30.0)
            assert first.status_code == 200
            assert first.headers["content-type"] == "image/jpeg"
            assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
            assert again.content == first.content
        feed = api.get("/v1/feed", headers=_auth(bob)).json()
        assert [p["id"] for p in feed["items"]] == [made["photo"]["id"]]

    nodes = _status(cluster)
    for worker in ("worker-1", "worker-2"):
        assert nodes[worker]["state"] == "ready"
        figures = nodes[worker].get("figures", nodes[worker])
        assert "queue_depth" in json.dumps(figures), nodes[worker]
    assert "streaming" in json.dumps(nodes["queue-1-primary"])  # the queue's replica


def test_a_worker_killed_mid_task_loses_nothing(cluster: RunningCluster) -> None:
    cluster.cli("stop", "worker-2")  # one worker: the tasks we catch running are worker-1's
    with httpx.Client(base_url=cluster.api, timeout=30.0) as api:
        alice = new_user(api)
        data = _jpeg((6000, 4000))  # 24 MP: each thumbnail takes long enough to be caught
        made = [_upload(api, alice, data + bytes([i])) for i in range(12)]
        ids = [m["task"]["id"] for m in made]

        async def kill_while_running() -> list[str]:
            """SIGKILL worker-1 (through the control API: no CLI start-up delay) as soon as
            it holds a task; the tasks its dead leases still hold are the victims."""
            conn = await asyncpg.connect(_queue_dsn(cluster))
            running = (
                "SELECT id::text FROM queue_tasks WHERE state = 'running' "
                "AND worker = 'worker-1' AND id = ANY($1::uuid[])"
            )
            try:
                end = time.monotonic() + 60
                async with httpx.AsyncClient(base_url=cluster.control, timeout=10) as control:
                    while time.monotonic() < end:
                        if await conn.fetch(running, ids):
                            r = await control.post("/v1/nodes/worker-1/kill")
                            assert r.status_code == 202, r.text
                            return [row[0] for row in await conn.fetch(running, ids)]
                raise AssertionError("no task was ever seen running on worker-1")
            finally:
                await conn.close()

        victims = asyncio.run(kill_while_running())
        assert victims, "worker-1 finished its tasks before the kill landed"
        cluster.cli("start", "worker-2")
        done = _wait_succeeded(api, alice, ids)
        assert {t["id"] for t in done} == set(ids)  # every task done, none lost

        async def redeliveries() -> list[int]:
            conn = await asyncpg.connect(_queue_dsn(cluster))
            try:
                rows = await conn.fetch(
                    "SELECT redeliveries FROM queue_tasks WHERE id = ANY($1::uuid[])", victims
                )
                return [int(r[0]) for r in rows]
            finally:
                await conn.close()

        assert all(n >= 1 for n in asyncio.run(redeliveries()))  # redelivered after the timeout
        for m in made:
            assert api.get(f"/v1/photos/{m['photo']['id']}").json()["status"] == "ready"
    _wait_state(cluster, "worker-1", "ready")  # the supervisor restarted it


def test_with_every_worker_stopped_uploads_are_accepted_and_complete_later(
    cluster: RunningCluster,
) -> None:
    for worker in ("worker-1", "worker-2"):
        cluster.cli("stop", worker)
    with httpx.Client(base_url=cluster.api, timeout=30.0) as api:
        alice = new_user(api)
        made = _upload(api, alice, _jpeg((300, 200)))
        assert _task(api, alice, made["task"]["id"])["status"] == "queued"
        for worker in ("worker-1", "worker-2"):
            cluster.cli("start", worker)
        _wait_succeeded(api, alice, [made["task"]["id"]])
        assert api.get(f"/v1/photos/{made['photo']['id']}").json()["status"] == "ready"


def test_the_topology_file_is_used(tmp_path: Path) -> None:
    topo = parse_topology(TOPOLOGY)
    assert (topo.worker_count, topo.worker_concurrency, topo.queue_replicas) == (2, 2, 1)
