"""The chaos node's admin API (what the control API relays ``/v1/chaos/...`` to)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from photostack.blocks.chaos import ChaosProxy, LinkConfig, create_chaos_app

pytestmark = pytest.mark.component


def test_links_and_toxics_through_the_admin_api() -> None:
    asyncio.run(_exercise())


async def _exercise() -> None:
    proxy = ChaosProxy([LinkConfig("storage.db-1", "127.0.0.1", 0, "127.0.0.1", 9)])
    await proxy.start()  # the app's lifespan does this in the chaos node
    transport = httpx.ASGITransport(app=create_chaos_app(proxy))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://chaos") as client:
            await _calls(client)
    finally:
        await proxy.aclose()


async def _calls(client: httpx.AsyncClient) -> None:
    toxics = "/v1/links/storage.db-1/toxics"
    assert (await client.get("/healthz")).json() == {"status": "ok", "links": 1}
    (link,) = (await client.get("/v1/links")).json()["links"]
    assert link["name"] == "storage.db-1"
    assert link["state"] == "up"
    port = int(link["listen"].rsplit(":", 1)[1])

    latency = {"type": "latency", "direction": "upstream", "attributes": {"latency_ms": 5}}
    r = await client.post(toxics, json=latency)
    assert r.status_code == 201
    assert r.json()["id"] == "latency-1"
    down = (await client.post(toxics, json={"type": "down"})).json()
    assert (await client.get("/v1/links/storage.db-1")).json()["state"] == "down"
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
    metrics = (await client.get("/metrics")).text
    assert 'photostack_chaos_toxics{link="storage.db-1"} 2.0' in metrics

    assert (await client.delete(f"{toxics}/{down['id']}")).status_code == 204
    with socket.socket() as sock:
        sock.connect(("127.0.0.1", port))  # listening again
    assert (await client.delete(toxics)).status_code == 204
    assert (await client.get("/v1/links/storage.db-1")).json()["toxics"] == []

    bad = await client.post(toxics, json={"type": "lag"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_toxic"
    assert (await client.post(toxics, content=b"{nope")).status_code == 400
    assert (await client.post("/v1/links/nope/toxics", json={"type": "down"})).status_code == 404
    gone = await client.delete(f"{toxics}/latency-9")
    assert gone.json()["error"]["code"] == "unknown_toxic"
    assert (await client.get("/v1/links/nope")).status_code == 404
