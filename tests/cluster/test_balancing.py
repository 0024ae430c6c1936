"""Balancing through the CLI: a web node started at run time joins, strategies switch live,
a killed web node costs no client request and rejoins with slow start, stop drains first."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from photostack.cluster.topology import bundled_topology
from tests.cluster.harness import RunningCluster, cluster_from_text

pytestmark = pytest.mark.cluster

_EDGE = """[edge]
count = 1
slow_start_s = 3.0
check_interval_s = 0.5
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("balancing")
    text = bundled_topology("small").read_text(encoding="utf-8")
    assert "[edge]\ncount = 1\n" in text
    balancing = text.replace("[edge]\ncount = 1\n", _EDGE)
    with cluster_from_text(root, "balancing", balancing) as running:
        yield running


def _web_pool(control: httpx.Client) -> dict[str, dict[str, Any]]:
    view = control.get("/v1/pools/web").json()
    return {row["name"]: row for row in view["holders"]["edge-1"]["backends"]}


def _until(check: Callable[[], bool], deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s}s: {what}")
        time.sleep(0.1)  # polling a live cluster under a deadline


def _served(api: httpx.Client, path: str, count: int) -> Counter[str]:
    served: Counter[str] = Counter()
    for _ in range(count):
        response = api.get(path)
        assert response.status_code == 200, response.text
        served[response.headers["x-served-by"].split(",")[0]] += 1
    return served


def test_a_new_web_node_joins_strategies_switch_and_a_killed_one_rejoins(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    api = httpx.Client(base_url=cluster.api, timeout=10)
    control = httpx.Client(base_url=cluster.control, timeout=30)
    name = f"u_{uuid.uuid4().hex[:10]}"
    created = api.post("/v1/users", json={"username": name, "display_name": name})
    assert created.status_code == 201, created.text
    path = f"/v1/users/{created.json()['id']}"

    bad = cluster.cli("start", "cache-7", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0
    assert "web-N or app-N" in bad.stderr

    # `start web-2` on a topology with one web node: a new node that joins the edge's pool.
    assert "start: web-2" in cluster.cli("start", "web-2").stdout
    _until(lambda: "web-2" in _web_pool(control), 60, "web-2 joins the edge's pool")
    first_share = _web_pool(control)["web-2"]["share"]
    assert first_share < 1.0  # it ramps up
    _until(lambda: _web_pool(control)["web-2"]["share"] == 1.0, 20, "web-2 at full share")

    expected_even = ("round-robin", "random", "weighted-random", "least-connections")
    for strategy in (*expected_even, "power-of-two", "hash"):
        answer = control.put("/v1/pools/web/strategy", json={"strategy": strategy})
        assert answer.status_code == 200, answer.text
        served = _served(api, path, 60)
        if strategy == "round-robin":
            assert served == {"web-1": 30, "web-2": 30}
        elif strategy == "hash":
            assert len(served) == 1  # one user id, one web node (no load to bound it)
        else:
            assert set(served) == {"web-1", "web-2"}, (strategy, served)
            assert min(served.values()) >= 12, (strategy, served)
    assert control.put("/v1/pools/web/strategy", json={"strategy": "x"}).status_code == 400
    control.put("/v1/pools/web/strategy", json={"strategy": "round-robin"})

    # Kill web-1 under a GET loop: no client error; it comes back ramping.
    failures: list[str] = []
    count = 0
    done = threading.Event()

    def load() -> None:
        nonlocal count
        with httpx.Client(base_url=cluster.api, timeout=10) as client:
            end = time.monotonic() + 90
            while not done.is_set() and time.monotonic() < end:
                response = client.get(path)
                count += 1
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")

    worker = threading.Thread(target=load)
    worker.start()
    shares: list[float] = []
    try:
        _until(lambda: count > 5, 10, "the GET loop runs")
        assert "kill: web-1" in cluster.cli("kill", "web-1").stdout
        _until(lambda: _web_pool(control)["web-1"]["state"] != "up", 10, "web-1 taken out")

        def ramping() -> bool:
            row = _web_pool(control)["web-1"]
            if row["state"] == "up":
                shares.append(row["share"])
            return bool(shares) and shares[-1] == 1.0

        _until(ramping, 90, "web-1 back at full share")
    finally:
        done.set()
        worker.join()
    assert failures == []
    assert count > 20
    assert min(shares) < 1.0  # it rejoined with slow start
    assert shares == sorted(shares)

    # `stop` drains first: the edge stops sending to web-2, requests keep succeeding.
    assert "stop: web-2 is stopped" in cluster.cli("stop", "web-2").stdout
    assert _web_pool(control)["web-2"]["state"] == "draining"
    assert _served(api, path, 10) == {"web-1": 10}
    api.close()
    control.close()
