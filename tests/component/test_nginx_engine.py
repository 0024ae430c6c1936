"""nginx as the edge: every rendered config passes `nginx -t`; balancing and retry semantics."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from photostack.blocks.balancer.testing import FakeAction, FakeBackend, FakeReply, RecordedRequest
from photostack.cluster.engines.nginx import (
    NGINX_STRATEGIES,
    NginxBackend,
    NginxConfig,
    NginxEngine,
)
from photostack.cluster.engines.testing import free_port
from tests.component.test_proxy_features import http_client, run, start_edge

pytestmark = pytest.mark.component


@pytest.mark.parametrize("strategy", sorted(NGINX_STRATEGIES))
def test_every_strategy_renders_a_config_nginx_accepts(strategy: str, tmp_path: Path) -> None:
    engine = NginxEngine(
        NginxConfig(
            name="edge-1",
            host="127.0.0.1",
            port=free_port(),
            backends=(NginxBackend("web-1", "127.0.0.1", 1), NginxBackend("web-2", "127.0.0.1", 2)),
            prefix=tmp_path / "nginx",
            log_path=tmp_path / "nginx.log",
            strategy=strategy,
            hash_key="path:2",
            gzip=True,
            collapse=True,
            cache_ttl_s=1,
            stale_if_error_s=5,
        )
    )
    engine.prepare()  # runs `nginx -t` and raises EngineError with nginx's reason
    assert engine.conf_path.is_file()
    spec = engine.process_spec()
    assert spec.argv[1:3] == ["-p", f"{(tmp_path / 'nginx').absolute()}/"]


def test_killed_backend_costs_no_failed_get_and_posts_are_not_retried(tmp_path: Path) -> None:
    async def reset_posts(backend: FakeBackend, request: RecordedRequest) -> FakeReply:
        if request.method == "POST":
            return FakeReply(action=FakeAction.RESET)
        return FakeReply(200, (("X-Backend", backend.name),), b"ok")

    async def main() -> None:
        async with AsyncExitStack() as stack:
            fakes = [FakeBackend("web-1", reset_posts), FakeBackend("web-2", reset_posts)]
            edge = await start_edge(stack, "nginx", fakes, tmp_path)
            http = await http_client(stack, edge)
            served = [(await http.get(f"/warm/{i}")).headers["x-backend"] for i in range(4)]
            assert sorted(set(served)) == ["web-1", "web-2"]
            await fakes[0].kill()
            responses = await asyncio.gather(*(http.get(f"/after/{i}") for i in range(20)))
            assert [r.status_code for r in responses] == [200] * 20
            before = len(fakes[1].requests)
            response = await http.post("/v1/photos", content=b"payload")
            assert response.status_code == 502
            posts = [r for r in fakes[1].requests[before:] if r.method == "POST"]
            assert len(posts) == 1  # sent once, never passed to another backend

    run(main())
