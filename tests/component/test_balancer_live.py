"""The balancer core on real sockets: active checks, ejection, drain, live membership."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from photostack.blocks.balancer import (
    ActiveCheckConfig,
    AdminServer,
    Backend,
    BackendState,
    BalancerMetrics,
    ClientConfig,
    HealthConfig,
    RetryBudgetConfig,
    SlowStart,
    SmartClient,
    UpstreamConnectError,
)
from photostack.blocks.balancer.testing import (
    FakeAction,
    FakeBackend,
    FakeReply,
    RecordedRequest,
    echo_handler,
)

pytestmark = pytest.mark.component

CHECK_INTERVAL_S = 0.2
CHECKED = ClientConfig(
    health=HealthConfig(
        checks=ActiveCheckConfig(
            enabled=True, interval_s=CHECK_INTERVAL_S, timeout_s=0.2, rise=1, fall=1
        ),
        slow_start=SlowStart(window_s=2.0),
    ),
)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


async def start(stack: AsyncExitStack, *fakes: FakeBackend) -> list[Backend]:
    backends = []
    for fake in fakes:
        backends.append(await fake.start())
        stack.push_async_callback(fake.aclose)
    return backends


async def client_for(
    stack: AsyncExitStack, backends: list[Backend], config: ClientConfig = CHECKED
) -> SmartClient:
    client = SmartClient(backends, config)
    stack.push_async_callback(client.aclose)
    await client.start()
    return client


async def until(predicate: Any, deadline_s: float, what: str) -> float:
    """Poll ``predicate`` under a deadline; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def state(client: SmartClient, name: str) -> BackendState:
    return client.upstream.pool.health(name).state


def test_killed_backend_during_a_get_loop_fails_no_request() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b, c = FakeBackend("app-1"), FakeBackend("app-2"), FakeBackend("app-3")
            client = await client_for(stack, await start(stack, a, b, c))
            statuses: list[int] = []
            killed_at = 0.0
            for i in range(300):
                if i == 100:
                    await b.kill()
                    killed_at = time.monotonic()
                statuses.append((await client.request("GET", f"/loop/{i}")).status)
                if i > 100 and state(client, "app-2") is not BackendState.UP:
                    break
            assert statuses == [200] * len(statuses)
            await until(lambda: state(client, "app-2") is not BackendState.UP, 2.0, "ejection")
            assert time.monotonic() - killed_at <= CHECK_INTERVAL_S * 1.5
            served = Counter([(await client.request("GET", "/after")).backend for _ in range(20)])
            assert set(served) == {"app-1", "app-3"}

    run(main())


def test_dead_backend_is_found_by_active_checks_alone_and_rejoins_slowly() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = FakeBackend("app-1")
            healthy = True

            async def flaky(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
                if request.target == "/healthz" and not healthy:
                    return FakeReply(503)
                return await echo_handler(backend, request)

            b = FakeBackend("app-2", flaky)
            client = await client_for(stack, await start(stack, a, b))
            healthy = False
            await until(lambda: state(client, "app-2") is BackendState.UNHEALTHY, 2.0, "fall")
            assert {(await client.request("GET", "/x")).backend for _ in range(6)} == {"app-1"}
            healthy = True
            await until(lambda: state(client, "app-2") is BackendState.UP, 2.0, "rise")
            share = client.upstream.pool.health("app-2").share(
                time.monotonic(), CHECKED.health.slow_start
            )
            assert share < 0.5  # ramping, not at full share at once
            served = Counter([(await client.request("GET", "/y")).backend for _ in range(20)])
            assert served["app-2"] < served["app-1"]

    run(main())


def test_post_without_key_is_not_retried_after_send() -> None:
    async def reset_posts(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        if request.method == "POST":
            return FakeReply(action=FakeAction.RESET)
        return await echo_handler(backend, request)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = FakeBackend("app-1", reset_posts), FakeBackend("app-2", reset_posts)
            client = await client_for(stack, await start(stack, a, b))
            with pytest.raises(UpstreamConnectError):
                await client.request("POST", "/v1/photos", body=b"{}")
            assert len([r for r in a.requests + b.requests if r.method == "POST"]) == 1
            # With an Idempotency-Key the same failure goes to the other backend.
            with pytest.raises(UpstreamConnectError):
                await client.request(
                    "POST", "/v1/photos", headers=[("Idempotency-Key", "k1")], body=b"{}"
                )
            assert len([r for r in a.requests + b.requests if r.method == "POST"]) == 3

    run(main())


def test_retry_budget_caps_retries_and_counts_exhaustion() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = FakeBackend("app-1", lambda fb, r: _reset())
            b = FakeBackend("app-2", lambda fb, r: _reset())
            metrics = BalancerMetrics("test_lb")
            config = ClientConfig(
                health=HealthConfig(max_ejection_percent=0.0, eject_after_failures=1000)
            )
            config = replace(
                config, retry_budget=RetryBudgetConfig(budget_percent=0, min_retries_per_s=0.5)
            )
            client = SmartClient(await start(stack, a, b), config, hooks=metrics)
            stack.push_async_callback(client.aclose)
            for _ in range(10):
                with pytest.raises(UpstreamConnectError):
                    await client.request("GET", "/x")
            assert len(a.requests) + len(b.requests) == 15  # 10 tries + 5 budgeted retries
            text = metrics.registry.get_sample_value(
                "test_lb_retry_budget_exhausted_total", {"reason": "reset"}
            )
            assert text == 5.0

    run(main())


async def _reset() -> FakeReply:
    return FakeReply(action=FakeAction.RESET)


def test_drain_lets_in_flight_finish_and_takes_no_new_requests() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            release = asyncio.Event()

            async def slow(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
                if request.target == "/slow":
                    await release.wait()
                return await echo_handler(backend, request)

            a, b = FakeBackend("app-1", slow), FakeBackend("app-2", slow)
            client = await client_for(stack, await start(stack, a, b), ClientConfig())
            pending = asyncio.create_task(client.request("GET", "/slow"))
            pool = client.upstream.pool
            await until(lambda: pool.health("app-1").in_flight == 1, 2.0, "in flight")
            removal = asyncio.create_task(client.upstream.remove_backend("app-1", timeout_s=5))
            await until(lambda: pool.health("app-1").state is BackendState.DRAINING, 2.0, "drain")
            served = {(await client.request("GET", "/fast")).backend for _ in range(4)}
            assert served == {"app-2"}
            assert not removal.done()
            release.set()
            assert (await pending).backend == "app-1"
            assert await removal is True
            assert "app-1" not in pool

    run(main())


def test_membership_through_the_admin_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a, b = FakeBackend("app-1"), FakeBackend("app-2")
            backends = await start(stack, a, b)
            client = await client_for(stack, backends[:1], ClientConfig())
            admin = AdminServer({"app": client.upstream})
            socket = tmp_path / "admin.sock"
            await admin.start_unix(socket)
            stack.push_async_callback(admin.aclose)
            transport = httpx.AsyncHTTPTransport(uds=str(socket))
            http = httpx.AsyncClient(transport=transport, base_url="http://admin")
            stack.push_async_callback(http.aclose)

            added = await http.post(
                "/pools/app/backends",
                json={"name": "app-2", "host": "127.0.0.1", "port": b.backend.port},
            )
            assert added.status_code == 201, added.text
            assert [r["name"] for r in added.json()["backends"]] == ["app-1", "app-2"]
            served = {(await client.request("GET", "/x")).backend for _ in range(40)}
            assert served == {"app-1", "app-2"}  # the newcomer serves, ramping

            changed = await http.put("/pools/app/strategy", json={"strategy": "least-connections"})
            assert changed.json()["strategy"] == "least-connections"
            bad = await http.put("/pools/app/strategy", json={"strategy": "fastest"})
            assert bad.status_code == 400
            assert "known" in bad.json()["error"]["message"]

            drained = await http.post("/pools/app/backends/app-1/drain")
            assert drained.status_code == 200
            assert {(await client.request("GET", "/y")).backend for _ in range(6)} == {"app-2"}

            removed = await http.delete("/pools/app/backends/app-1")
            assert removed.json()["removed"] == "app-1"
            assert [r["name"] for r in removed.json()["backends"]] == ["app-2"]
            assert (await http.delete("/pools/app/backends/app-1")).status_code == 404
            assert (await http.get("/pools/nope")).status_code == 404
            view = json.loads((await http.get("/pools")).text)
            assert list(view) == ["app"]

    run(main())
