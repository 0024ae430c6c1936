"""Drills on a real cluster (ONE `photostack up` of a drill topology with [chaos] links):
`photostack drill app-node --json` passes, and a toxic switched through the control API slows a
request path measurably, then the path recovers when it is removed."""

from __future__ import annotations

import json
import socket
import statistics
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from photostack.cluster.topology import layout, parse_topology
from tests.cluster.harness import RunningCluster, cluster_from_text

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

TOPOLOGY = """
[cluster]
name = "photostack-drill"
host = "127.0.0.1"

[web]
count = 2

[app]
count = 2

[cache]
count = 1

[storage.users]
shards = 1
replicas = 1

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

[workers]
count = 1
concurrency = 2

[chaos]
links = ["storage", "replication", "web-app"]
"""


def _free_base() -> int:
    """A port base whose every node and chaos-link port is free now."""
    topo = parse_topology(TOPOLOGY)
    for base in range(31000, 40000, 200):
        lay = layout(topo, base)
        ports = [base, base + 1, base + 10] + [n.port for n in lay.nodes]
        ports += [link.port for link in lay.links]
        if all(_is_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range for the drill cluster")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("drill")
    with cluster_from_text(root, "drill", TOPOLOGY, _free_base()) as running:
        yield running


def test_the_app_node_drill_passes(cluster: RunningCluster) -> None:
    done = cluster.cli("drill", "app-node", "--json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    (scenario,) = report["scenarios"]
    assert scenario["name"] == "app-node"
    assert scenario["outcome"] == "passed", scenario
    figures = scenario["figures"]
    assert figures["requests"] > 50
    assert figures["requests_failed"] == 0
    assert figures["acknowledged_writes"] > 0
    assert figures["acknowledged_writes_missing"] == 0
    assert set(report["capabilities"]["netns"]) == {"available", "reason"}


def _median_ms(api: httpx.Client, path: str, n: int = 9) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        assert api.get(path).status_code == 200
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def test_a_toxic_switched_through_the_control_api_slows_a_request_path(
    cluster: RunningCluster,
) -> None:
    with (
        httpx.Client(base_url=cluster.api, timeout=15.0) as api,
        httpx.Client(base_url=cluster.control, timeout=15.0) as control,
    ):
        links = {link["name"] for link in control.get("/v1/chaos/links").json()["links"]}
        assert {
            "storage.social-1-primary",
            "web-app.app-1",
            "replication.users-1-replica-1",
        } <= links
        user = api.post("/v1/users", json={"username": f"t_{uuid.uuid4().hex[:12]}"}).json()
        path = f"/v1/users/{user['id']}/following?limit=10"  # not cached: one social shard read
        before = _median_ms(api, path)
        added = control.post(
            "/v1/chaos/links/storage.social-1-primary/toxics",
            json={"type": "latency", "direction": "downstream", "attributes": {"latency_ms": 150}},
        )
        assert added.status_code == 201, added.text
        try:
            slowed = _median_ms(api, path)
        finally:
            removed = control.delete(
                f"/v1/chaos/links/storage.social-1-primary/toxics/{added.json()['id']}"
            )
        assert removed.status_code == 204
        after = _median_ms(api, path)
    assert slowed >= before + 140, (before, slowed)
    assert after < before + 50, (before, after)


def test_unknown_links_and_scenarios_are_refused(cluster: RunningCluster) -> None:
    with httpx.Client(base_url=cluster.control, timeout=15.0) as control:
        bad = control.post("/v1/chaos/links/nope/toxics", json={"type": "down"})
    assert bad.status_code == 404
    assert bad.json()["error"]["code"] == "unknown_link"
    unknown = cluster.cli("drill", "nope", check=False)
    assert unknown.returncode == 2
    assert "unknown scenario 'nope'" in unknown.stdout
