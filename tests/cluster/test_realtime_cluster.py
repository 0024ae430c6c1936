"""Real-time events on a real cluster: a client on web-1, web-1 killed, resume on web-2 through
the edge with nothing lost; the events are fanned out through Redis on two cache nodes."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.cluster.harness import ONE_SHARD_STORES, RunningCluster, cluster_from_text, new_user

pytestmark = pytest.mark.cluster

TOPOLOGY = (
    """
[cluster]
name = "photostack-realtime"
host = "127.0.0.1"

[edge]
count = 1

[web]
count = 2

[app]
count = 1

[cache]
count = 2
engine = "redis"
"""
    + ONE_SHARD_STORES
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    root = tmp_path_factory.mktemp("realtime")
    with cluster_from_text(root, "realtime", TOPOLOGY) as running:
        yield running


def _follow(api: httpx.Client, who: dict[str, Any], target: dict[str, Any]) -> None:
    r = api.put(
        f"/v1/users/{who['id']}/following/{target['id']}",
        headers={"Authorization": f"Bearer {who['token']}"},
    )
    assert r.status_code == 204, r.text


def _events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """The next ``count`` SSE events (data lines) from a line iterator."""
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
            if len(out) == count:
                return out
    raise AssertionError(f"stream ended after {len(out)} of {count} events")


@contextlib.contextmanager
def _stream_on(
    api: httpx.Client, token: str, node: str, headers: dict[str, str] | None = None
) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """An SSE stream through the edge that landed on ``node`` (reconnects, bounded, until so)."""
    for _ in range(20):
        with api.stream(
            "GET", f"/v1/events/stream?access_token={token}", headers=headers or {}
        ) as response:
            assert response.status_code == 200
            if response.headers["x-served-by"].split(",")[0] == node:
                yield response, response.iter_lines()
                return
    raise AssertionError(f"the edge never sent the stream to {node}")


def test_a_client_on_a_killed_web_node_resumes_on_the_other_with_nothing_lost(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    with httpx.Client(base_url=cluster.api, timeout=30.0) as api:
        owner = new_user(api)
        followers = [new_user(api) for _ in range(6)]
        with _stream_on(api, owner["token"], "web-1") as (_, lines):
            for follower in followers[:3]:
                _follow(api, follower, owner)
            before = _events(lines, 3)
            assert [e["seq"] for e in before] == [1, 2, 3]
            cluster.cli("kill", "web-1")
            with pytest.raises((httpx.HTTPError, AssertionError)):
                _events(lines, 1)  # the stream is cut
        for follower in followers[3:]:
            _follow(api, follower, owner)  # while the client is away
        headers = {"Last-Event-ID": str(before[-1]["seq"])}
        with api.stream(
            "GET", f"/v1/events/stream?access_token={owner['token']}", headers=headers
        ) as response:
            assert response.status_code == 200
            assert response.headers["x-served-by"].split(",")[0] == "web-2"
            after = _events(response.iter_lines(), 3)
        assert [e["seq"] for e in after] == [4, 5, 6]
        got = [e["data"]["follower"]["id"] for e in before + after]
        assert got == [f["id"] for f in followers]
        r = api.get("/v1/events?after=0", headers={"Authorization": f"Bearer {owner['token']}"})
        assert [e["seq"] for e in r.json()["events"]] == [1, 2, 3, 4, 5, 6]


def test_stopping_a_web_node_closes_its_streams_with_a_reconnect_hint(
    cluster: RunningCluster,
) -> None:
    """``stop`` closes the node's streams at once (SSE close frame, WebSocket 1012) instead of
    waiting for them as requests in flight: it finishes well inside the 10 s request drain."""
    address = httpx.get(f"{cluster.control}/v1/nodes/web-2", timeout=10.0).json()["address"]
    with httpx.Client(base_url=cluster.api, timeout=30.0) as api:
        owner, follower = new_user(api), new_user(api)
        _follow(api, follower, owner)
        ws_url = f"ws://{address}/v1/ws?access_token={owner['token']}"
        with (
            _stream_on(api, owner["token"], "web-2") as (_, lines),
            ws_connect(ws_url, open_timeout=10.0) as ws,
        ):
            assert [e["seq"] for e in _events(lines, 1)] == [1]
            assert json.loads(ws.recv(timeout=10.0))["seq"] == 1
            started = time.monotonic()
            stopped = cluster.cli("stop", "web-2", check=False)  # drain, then SIGTERM
            took_s = time.monotonic() - started
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            rest = list(lines)  # the stream ends instead of being cut
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10.0)
        try:
            assert took_s < 6.0, f"stop took {took_s:.1f}s: streams were waited for"
            assert "event: close" in rest
            assert "retry: 1000" in rest
            data = next(line for line in rest if line.startswith("data: "))
            assert json.loads(data[6:]) == {"reason": "draining", "resume_after": 1}
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012  # service restart: reconnect elsewhere
        finally:
            cluster.cli("start", "web-2")
