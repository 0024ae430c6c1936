"""Cached reads on a real cluster: 2 app nodes, 3 cache nodes on the consistent-hash ring.

A cache node is SIGKILLed in the middle of a read loop (the supervisor restarts it, empty):
no client sees an error, the database load stays bounded by the number of keys (not the number
of reads), and a follow made after the flap shows at once on every read.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from photostack.cluster.topology import Role, layout, parse_topology
from tests.cluster.harness import ONE_SHARD_STORES, RunningCluster, cluster_from_text, new_user

pytestmark = pytest.mark.cluster

TOPOLOGY = (
    """
[cluster]
name = "photostack-caching"
host = "127.0.0.1"

[edge]
count = 1

[web]
count = 1

[app]
count = 2

[cache]
count = 3
engine = "redis"
"""
    + ONE_SHARD_STORES
)
USERS = 30
READS = 600
_GLOBAL_MISSES = re.compile(
    r'^photostack_cache_requests_total\{policy="read-through",result="miss",tier="global",'
    r'type="user"\} ([0-9.e+]+)$',
    re.M,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("caching")
    with cluster_from_text(root, "caching", TOPOLOGY) as running:
        yield running


def _app_urls(cluster: RunningCluster) -> list[str]:
    lay = layout(parse_topology(TOPOLOGY), cluster.port_base)
    return [f"http://{n.host}:{n.port}" for n in lay.by_role(Role.APP)]


def _global_misses(urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
        total += sum(float(v) for v in _GLOBAL_MISSES.findall(text))
    return total


def test_a_killed_cache_node_costs_no_error_and_bounded_database_load(
    cluster: RunningCluster,
) -> None:
    apps = _app_urls(cluster)
    with httpx.Client(base_url=cluster.api, timeout=15.0) as api:
        users = [new_user(api) for _ in range(USERS)]
        misses_before = _global_misses(apps)
        statuses: Counter[int] = Counter()
        cache_headers: Counter[str] = Counter()
        for i in range(READS):
            if i == READS // 3:
                cluster.cli("kill", "cache-2")
            r = api.get(f"/v1/users/{users[(i * 7) % USERS]['id']}")
            statuses[r.status_code] += 1
            cache_headers[r.headers.get("x-cache", "absent")] += 1
        assert statuses == Counter({200: READS})
        assert set(cache_headers) <= {"hit", "miss"}
        assert cache_headers["hit"] > READS // 2
        loads = _global_misses(apps) - misses_before
        # each user loads at most once per app node for its first read, after the kill (its
        # node's keys) and after the rejoin (the epoch bump): bounded by keys, not by reads
        assert loads <= 6 * USERS, loads

        # no stale read after the flap: a follow shows at once, whichever app node answers
        alice, bob = users[0], users[1]
        r = api.put(
            f"/v1/users/{alice['id']}/following/{bob['id']}",
            headers={"Authorization": f"Bearer {alice['token']}"},
        )
        assert r.status_code == 204, r.text
        for _ in range(6):
            assert api.get(f"/v1/users/{bob['id']}").json()["followers_count"] == 1
            assert api.get(f"/v1/users/{alice['id']}").json()["following_count"] == 1
            followers = api.get(f"/v1/users/{bob['id']}/followers").json()["items"]
            assert [u["id"] for u in followers] == [alice["id"]]
