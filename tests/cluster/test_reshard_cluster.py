"""Online resharding on a running cluster (one `up` of the small topology): `photostack reshard
add-shard social` under a read/write loop through the edge, with no failed request, every edge
readable afterwards both ways, and the keys moved within 1.05 x the ideal k/(n+1); then
`remove-shard social 2`, and `add-shard users` under sign-ups, profile reads, follows and
event polls (every user readable by id and name afterwards, each user's events 1..n; the new
shard has the group's replica, streaming from its primary and watched by the coordinator)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.cluster.harness import RunningCluster

pytestmark = pytest.mark.cluster

USERS = 30
EDGES = 240
MOVE_DEADLINE_S = 240.0


def _new_user(api: httpx.Client) -> dict[str, Any]:
    response = api.post("/v1/users", json={"username": f"r_{uuid.uuid4().hex[:12]}"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _following(api: httpx.Client, user_id: str) -> set[str]:
    response = api.get(f"/v1/users/{user_id}/following", params={"limit": 100})
    assert response.status_code == 200, response.text
    return {u["id"] for u in response.json()["items"]}


def _followers(api: httpx.Client, user_id: str) -> set[str]:
    response = api.get(f"/v1/users/{user_id}/followers", params={"limit": 100})
    assert response.status_code == 200, response.text
    return {u["id"] for u in response.json()["items"]}


Reads = Callable[[httpx.Client, str, str], list[httpx.Response]]


def _following_reads(client: httpx.Client, a: str, b: str) -> list[httpx.Response]:
    return [
        client.get(f"/v1/users/{a}/following", params={"limit": 100}),
        client.get(f"/v1/users/{b}"),
    ]


def _followers_reads(client: httpx.Client, a: str, b: str) -> list[httpx.Response]:
    return [
        client.get(f"/v1/users/{b}/followers", params={"limit": 100}),
        client.get(f"/v1/users/{a}"),
    ]


class FollowLoad:
    """A thread that, while the ``with`` block runs, follows or unfollows a random pair of
    ``ids`` through the edge and makes two ``reads`` after each, keeping ``expected`` (the
    edges as written) and recording every answer that is not 200/204. Bounded by the move's
    deadline as well as by the block."""

    def __init__(
        self,
        api: str,
        ids: list[str],
        tokens: dict[str, dict[str, str]],
        expected: set[tuple[str, str]],
        *,
        seed: int,
        reads: Reads,
    ) -> None:
        self.api, self.ids, self.tokens, self.expected = api, ids, tokens, expected
        self.seed, self.reads = seed, reads
        self.failures: list[str] = []
        self.ops = 0
        self._done = threading.Event()
        self._worker = threading.Thread(target=self._run)

    def __enter__(self) -> FollowLoad:
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._worker.join()

    def _run(self) -> None:
        local = random.Random(self.seed)
        with httpx.Client(base_url=self.api, timeout=10) as client:
            deadline = time.monotonic() + MOVE_DEADLINE_S + 60
            while not self._done.is_set() and time.monotonic() < deadline:
                a, b = local.sample(self.ids, 2)
                path = f"/v1/users/{a}/following/{b}"
                if (a, b) in self.expected and local.random() < 0.4:
                    response = client.delete(path, headers=self.tokens[a])
                    self.expected.discard((a, b))
                else:
                    response = client.put(path, headers=self.tokens[a])
                    self.expected.add((a, b))
                for answer in (response, *self.reads(client, a, b)):
                    self.ops += 1
                    if answer.status_code not in (200, 204):
                        url, status = answer.request.url, answer.status_code
                        self.failures.append(f"{url} {status} {answer.text}")


def _status(cluster: RunningCluster) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(cluster.cli("reshard", "status", "--json").stdout)
    return body


def test_add_shard_under_load(cluster: RunningCluster, api: httpx.Client) -> None:
    users = [_new_user(api) for _ in range(USERS)]
    tokens = {u["id"]: {"Authorization": f"Bearer {u['token']}"} for u in users}
    ids = [u["id"] for u in users]
    rng = random.Random(11)
    expected: set[tuple[str, str]] = set()
    while len(expected) < EDGES:
        a, b = rng.sample(ids, 2)
        response = api.put(f"/v1/users/{a}/following/{b}", headers=tokens[a])
        assert response.status_code == 204, response.text
        expected.add((a, b))
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)

    # bad input: one line, nothing changed
    for args, reason in (
        (("add-shard", "nope"), "unknown group 'nope'"),
        (("remove-shard", "users", "1"), "users has one shard; it cannot be removed"),
    ):
        refused = cluster.cli("reshard", *args, check=False)
        assert refused.returncode == 1
        assert reason in refused.stderr
        assert refused.stderr.strip().count("\n") == 0
    assert "no reshard is in progress" in cluster.cli("reshard", "cancel", check=False).stderr
    assert json.loads(cluster.cli("directory", "show", "--json").stdout) == before

    load = FollowLoad(cluster.api, ids, tokens, expected, seed=5, reads=_following_reads)
    with load:
        started = cluster.cli("reshard", "add-shard", "social", check=False)
        assert started.returncode == 0, started.stderr
        assert "add-shard social -> social-3-primary" in started.stdout
        deadline = time.monotonic() + MOVE_DEADLINE_S
        move: dict[str, Any] = {}
        while time.monotonic() < deadline:
            move = _status(cluster)["moves"][0]
            if move["state"] in ("done", "cancelled"):
                break
            time.sleep(0.5)  # polling the move's persisted state under a deadline
        assert move.get("state") == "done", move
    assert load.failures == []
    assert load.ops > 50

    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    social = after["groups"]["social"]
    assert after["version"] > before["version"]
    assert [s["primary"]["name"] for s in social["shards"]][-1] == "social-3-primary"
    logical = social["partitioner"]["logical_shards"]
    moved = move["moves"]
    assert moved / logical <= 1.05 / 3  # keys (logical shards) moved vs the ideal k/(n+1)
    progress = move["progress"]
    print(  # noqa: T201 - the figures, for the report
        f"reshard: {moved}/{logical} logical moved; rows moved {progress['rows_moved']} "
        f"of {progress['rows_total']} (x{progress['moved_vs_ideal']} the ideal); "
        f"cut-over {progress['cutover_s']}s; {progress['duration_s']}s; "
        f"{load.ops} requests, 0 failed"
    )

    # every row readable afterwards, both ways, from its one owner
    for user_id in ids:
        assert _following(api, user_id) == {b for a, b in expected if a == user_id}
        assert _followers(api, user_id) == {a for a, b in expected if b == user_id}

    status = cluster.cli("reshard", "status").stdout
    assert "load skew (std/mean)" in status
    assert "cannot" not in status
    nodes = {n["name"]: n for n in json.loads(cluster.cli("status", "--json").stdout)["nodes"]}
    assert nodes["social-3-primary"]["state"] == "ready"


def _wait_done(cluster: RunningCluster) -> dict[str, Any]:
    deadline = time.monotonic() + MOVE_DEADLINE_S
    move: dict[str, Any] = {}
    while time.monotonic() < deadline:
        move = _status(cluster)["moves"][0]
        if move["state"] in ("done", "cancelled"):
            break
        time.sleep(0.5)  # polling the move's persisted state under a deadline
    return move


def test_remove_shard_under_load(cluster: RunningCluster, api: httpx.Client) -> None:
    users = [_new_user(api) for _ in range(USERS)]
    tokens = {u["id"]: {"Authorization": f"Bearer {u['token']}"} for u in users}
    ids = [u["id"] for u in users]
    rng = random.Random(13)
    expected: set[tuple[str, str]] = set()
    while len(expected) < EDGES:
        a, b = rng.sample(ids, 2)
        response = api.put(f"/v1/users/{a}/following/{b}", headers=tokens[a])
        assert response.status_code == 204, response.text
        expected.add((a, b))
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)
    names_before = [s["primary"]["name"] for s in before["groups"]["social"]["shards"]]
    assert names_before[1] == "social-2-primary"
    moves_before = len(_status(cluster)["moves"])

    # bad input: one line, non-zero exit, nothing changed (no move recorded, same map)
    for args, reason in (
        (("remove-shard", "nope", "1"), "unknown group 'nope'"),
        (("remove-shard", "social", "9"), f"social has no shard 9 (shards 1..{len(names_before)})"),
        (("remove-shard", "social", "0"), "social has no shard 0"),
        (("remove-shard", "social", "two"), "shard must be a number"),
        (("remove-shard", "photos", "1"), "photos has one shard; it cannot be removed"),
    ):
        refused = cluster.cli("reshard", *args, check=False)
        assert refused.returncode == 1, refused.stdout
        assert reason in refused.stderr
        assert refused.stderr.strip().count("\n") == 0
    assert json.loads(cluster.cli("directory", "show", "--json").stdout) == before
    assert len(_status(cluster)["moves"]) == moves_before

    load = FollowLoad(cluster.api, ids, tokens, expected, seed=8, reads=_followers_reads)
    with load:
        started = cluster.cli("reshard", "remove-shard", "social", "2", check=False)
        assert started.returncode == 0, started.stderr
        assert "remove-shard social shard 2 (social-2-primary)" in started.stdout
        move = _wait_done(cluster)
        assert move.get("state") == "done", move
        assert move["kind"] == "remove-shard"
    assert load.failures == []
    assert load.ops > 50
    print(  # noqa: T201 - the figures, for the report
        f"remove-shard: {move['moves']} logical shards, rows moved "
        f"{move['progress']['rows_moved']}, cut-over {move['progress']['cutover_s']}s, "
        f"{move['progress']['duration_s']}s; {load.ops} requests, 0 failed"
    )

    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    social = after["groups"]["social"]
    assert after["version"] > before["version"]
    assert [s["primary"]["name"] for s in social["shards"]] == [
        n for n in names_before if n != "social-2-primary"
    ]
    assert [s["index"] for s in social["shards"]] == list(range(len(names_before) - 1))
    assert set(social["placement"]) == set(range(len(names_before) - 1))

    # every row readable afterwards, both ways, from its one owner
    for user_id in ids:
        assert _following(api, user_id) == {b for a, b in expected if a == user_id}
        assert _followers(api, user_id) == {a for a, b in expected if b == user_id}

    # the emptied shard's node is retired: stopped, and the directory no longer lists it
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        nodes = {n["name"]: n for n in json.loads(cluster.cli("status", "--json").stdout)["nodes"]}
        state = nodes["social-2-primary"]["state"]
        if state == "stopped":
            break
        time.sleep(0.5)  # the retirement follows the move's end; polled under a deadline
    assert state == "stopped"
    shown = cluster.cli("directory", "show").stdout
    for number, name in enumerate((n for n in names_before if n != "social-2-primary"), 1):
        assert f"shard {number}: {name}" in shown  # renumbered: positions follow the map


def _cv(values: list[int]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean


def test_shard_skew_in_status_and_metrics(cluster: RunningCluster, api: httpx.Client) -> None:
    """`photostack status` shows each group's rows per shard and their std/mean; the control
    API's /metrics exports it as photostack_shard_skew{group=...}."""
    users = [_new_user(api) for _ in range(6)]
    for a in users:
        for b in users:
            if a is not b:
                headers = {"Authorization": f"Bearer {a['token']}"}
                response = api.put(f"/v1/users/{a['id']}/following/{b['id']}", headers=headers)
                assert response.status_code == 204, response.text
    first = json.loads(cluster.cli("status", "--json").stdout)["shard_skew"]
    groups = {g["group"]: g for g in first["groups"]}
    assert set(groups) == {"users", "social", "photos"}
    social = groups["social"]
    assert len(social["rows"]) == len(social["shards"]) >= 1
    assert sum(social["rows"]) > 0
    if len(social["rows"]) > 1:
        assert social["rows_skew"] == pytest.approx(_cv(social["rows"]), abs=1e-3)
    assert groups["photos"]["rows_skew"] == 0.0  # one shard: nothing to compare
    # a second sample has tx/s per shard since the first
    second = json.loads(cluster.cli("status", "--json").stdout)["shard_skew"]
    assert all(g["tps"] is not None and g["load_skew"] >= 0 for g in second["groups"])
    text = cluster.cli("status").stdout
    assert "shard skew (map version" in text
    assert "social: rows per shard" in text

    # the gauge is sampled every few seconds: poll until a sample matches the rows read now
    deadline = time.monotonic() + 30
    gauge: float | None = None
    expected: float | None = None
    with httpx.Client(base_url=cluster.control, timeout=10) as control:
        while time.monotonic() < deadline:
            gauge = next(
                (
                    float(line.split()[-1])
                    for line in control.get("/metrics").text.splitlines()
                    if line.startswith('photostack_shard_skew{group="social"}')
                ),
                None,
            )
            rows = json.loads(cluster.cli("status", "--json").stdout)["shard_skew"]["groups"]
            expected = _cv(next(g for g in rows if g["group"] == "social")["rows"])
            if gauge is not None and gauge == pytest.approx(expected, abs=0.02):
                break
            time.sleep(0.5)  # polled against a deadline, not a synchronisation
    assert gauge is not None
    assert gauge == pytest.approx(expected, abs=0.02)


def _new_shard_streams(cluster: RunningCluster, shards: list[dict[str, Any]]) -> None:
    """The shard add-shard created (the map's last) has the group's replica (the small
    topology: users has 1, async): listed in the map, streaming from the new primary
    (pg_stat_replication, in `status`), and watched by the failover coordinator."""
    added = shards[-1]
    primary = added["primary"]["name"]
    replica = primary.replace("-primary", "-replica-1")
    assert [r["name"] for r in added["replicas"]] == [replica]
    deadline = time.monotonic() + 60
    while True:
        status = json.loads(cluster.cli("status", "--json").stdout)
        nodes = {n["name"]: n for n in status["nodes"]}
        if nodes[primary]["figures"].get("replicas") == {replica: "streaming/async"}:
            break
        assert time.monotonic() < deadline, nodes[primary]
        time.sleep(0.5)  # polling pg_stat_replication under a deadline
    assert nodes[replica]["state"] == "ready"
    assert nodes[replica]["figures"]["in_recovery"] is True
    key = f"users-{len(shards)}"
    view: dict[str, Any] = {}
    while True:
        answer = httpx.get(f"{cluster.control}/v1/replication", timeout=10)
        view = answer.json().get("shards", {}).get(key, {}) if answer.status_code == 200 else {}
        if view.get("replicas", {}).get(replica, {}).get("state") == "streaming":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.5)  # the coordinator samples every round
    assert view["primary"] == primary
    assert view["phase"] == "healthy"


def test_users_add_shard_under_load(cluster: RunningCluster, api: httpx.Client) -> None:
    """`reshard add-shard users` (names, user rows, event logs, deletions and the jobs' state all
    move) under sign-ups, profile reads by id and by name, follows (each a follower.new event to
    the followee) and event polls: no failed request; afterwards every user is readable by id
    and by name, and each user's events are seq 1..n, one per follower, no gap or duplicate."""
    users = {u["id"]: u for u in (_new_user(api) for _ in range(USERS))}
    followers: dict[str, set[str]] = {user_id: set() for user_id in users}
    lock = threading.Lock()
    before = json.loads(cluster.cli("directory", "show", "--json").stdout)
    shards_before = len(before["groups"]["users"]["shards"])

    def auth(user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {users[user_id]['token']}"}

    failures: list[str] = []
    ops = 0
    done = threading.Event()

    def load(seed: int) -> None:
        nonlocal ops
        local = random.Random(seed)
        with httpx.Client(base_url=cluster.api, timeout=10) as client:
            deadline = time.monotonic() + MOVE_DEADLINE_S + 60
            while not done.is_set() and time.monotonic() < deadline:
                with lock:
                    ids = list(users)
                roll = local.random()
                answers: list[httpx.Response] = []
                if roll < 0.15:
                    name = f"m_{uuid.uuid4().hex[:12]}"
                    answer = client.post("/v1/users", json={"username": name})
                    answers.append(answer)
                    if answer.status_code == 201:
                        with lock:
                            users[answer.json()["id"]] = answer.json()
                            followers[answer.json()["id"]] = set()
                elif roll < 0.45:
                    user = users[local.choice(ids)]
                    answers.append(client.get(f"/v1/users/{user['id']}"))
                    answers.append(client.get(f"/v1/users/by-username/{user['username']}"))
                elif roll < 0.75:
                    a, b = local.sample(ids, 2)
                    with lock:
                        fresh = a not in followers[b]
                        followers[b].add(a)  # before the call: no other loop repeats the pair
                    if fresh:
                        path = f"/v1/users/{a}/following/{b}"
                        answers.append(client.put(path, headers=auth(a)))
                else:
                    who = local.choice(ids)
                    answers.append(client.get("/v1/events", headers=auth(who)))
                with lock:
                    for answer in answers:
                        ops += 1
                        if answer.status_code not in (200, 201, 204):
                            failures.append(
                                f"{answer.request.method} {answer.request.url} "
                                f"{answer.status_code} {answer.text}"
                            )

    workers = [threading.Thread(target=load, args=(seed,)) for seed in (21, 22, 23)]
    for worker in workers:
        worker.start()
    try:
        started = cluster.cli("reshard", "add-shard", "users", check=False)
        assert started.returncode == 0, started.stderr
        assert "add-shard users -> users-" in started.stdout
        move = _wait_done(cluster)
        assert move.get("state") == "done", move
        assert move["group"] == "users"
    finally:
        done.set()
        for worker in workers:
            worker.join()
    assert failures == []
    assert ops > 50
    progress = move["progress"]
    print(  # noqa: T201 - the figures, for the report
        f"users add-shard: {move['moves']}/{move['logical_shards']} logical shards, "
        f"rows moved {progress['rows_moved']} of {progress['rows_total']}, "
        f"cut-over {progress['cutover_s']}s, {progress['duration_s']}s; {ops} requests, 0 failed"
    )

    after = json.loads(cluster.cli("directory", "show", "--json").stdout)
    assert len(after["groups"]["users"]["shards"]) == shards_before + 1
    assert move["moves"] / after["groups"]["users"]["partitioner"]["logical_shards"] <= 1.05 / (
        shards_before + 1
    )
    _new_shard_streams(cluster, after["groups"]["users"]["shards"])
    for user_id, user in users.items():  # every user readable, by id and by name
        response = api.get(f"/v1/users/{user_id}")
        assert response.status_code == 200, response.text
        assert response.json()["username"] == user["username"]
        assert response.json()["followers_count"] == len(followers[user_id])
        response = api.get(f"/v1/users/by-username/{user['username']}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == user_id
        response = api.get("/v1/events", headers=auth(user_id))
        assert response.status_code == 200, response.text
        seqs = [event["seq"] for event in response.json()["events"]]
        assert seqs == list(range(1, len(followers[user_id]) + 1)), user_id
