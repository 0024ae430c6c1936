"""The web node's contract with a scripted app tier: validation, auth, errors, headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from photostack.service._tokens import TokenSigner
from photostack.service.settings import WebSettings
from photostack.service.testing import (
    AppUnavailableError,
    RecordedRequest,
    ScriptedAppClient,
    running,
)
from photostack.service.web import AppResponse, create_app

SECRET = b"k" * 32
ALICE = "06h1yhmv0zsct9qn"
BOB = "06h1yhmv1greyq8h"
JSON_CT = "application/json; charset=utf-8"
APP_HEADERS = [("x-served-by", "app-7"), ("content-type", JSON_CT)]


def default_respond(req: RecordedRequest) -> AppResponse | BaseException:
    if req.method == "POST":
        body = json.loads(req.body)
        user = {**body, "id": ALICE, "created_at": "2026-11-27T23:05:00.123456Z"}
        return AppResponse(201, APP_HEADERS, json.dumps(user).encode(), "app-7")
    if req.method in {"PUT", "DELETE"}:
        return AppResponse(204, [("x-served-by", "app-7")], b"", "app-7")
    return AppResponse(200, APP_HEADERS, b'{"items": [], "next_cursor": null}', "app-7")


Scenario = Callable[[httpx.AsyncClient, ScriptedAppClient], Awaitable[None]]


def run(
    tmp_path: Path,
    scenario: Scenario,
    respond: Callable[[RecordedRequest], AppResponse | BaseException] = default_respond,
    **settings: Any,
) -> ScriptedAppClient:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    fake = ScriptedAppClient(respond)
    web = create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret, **settings),
        fake,
        unavailable_errors=(AppUnavailableError,),
    )

    async def main() -> None:
        async with running(web):
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
                await scenario(client, fake)

    asyncio.run(main())
    return fake


def auth(user_id: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {TokenSigner(SECRET).issue(user_id)}"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == JSON_CT
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert response.headers["x-request-id"]
    assert response.headers["x-served-by"].startswith("web-1")


def test_create_user_returns_token_for_the_new_id(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.post("/v1/users", json={"username": "alice", "display_name": "A"})
        assert r.status_code == 201
        assert r.headers["content-type"] == JSON_CT
        assert r.headers["x-served-by"] == "web-1,app-7"
        body = r.json()
        assert TokenSigner(SECRET).verify(body["token"]) == ALICE
        assert body["username"] == "alice"
        sent = fake.requests[0]
        assert (sent.method, sent.path) == ("POST", "/internal/v1/users")
        assert json.loads(sent.body) == {"username": "alice", "display_name": "A"}

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "malformed_json"),
        (b"", "application/json", 400, "malformed_json"),
        (b"\xff\xfe", "application/json", 400, "malformed_json"),
        (b"[1, 2]", "application/json", 400, "malformed_body"),
        (b'{"username": "ab"}', "application/json", 422, "invalid_username"),
        (b'{"username": "Alice"}', "application/json", 422, "invalid_username"),
        (b'{"username": 42}', "application/json", 422, "invalid_username"),
        (b"{}", "application/json", 422, "invalid_username"),
        (
            json.dumps({"username": "alice", "display_name": "x" * 65}).encode(),
            "application/json",
            422,
            "invalid_display_name",
        ),
        (b'{"username": "alice"}', "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_create_user_rejects_bad_input_without_calling_the_app(
    tmp_path: Path, body: bytes, content_type: str, status: int, code: str
) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.post("/v1/users", content=body, headers={"content-type": content_type})
        assert_error(r, status, code)
        assert r.headers["x-served-by"] == "web-1"
        assert fake.requests == []

    run(tmp_path, scenario)


def test_body_too_large(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        big = json.dumps({"username": "alice", "pad": "x" * 200}).encode()
        r = await client.post(
            "/v1/users", content=big, headers={"content-type": "application/json"}
        )
        assert_error(r, 413, "payload_too_large")

        async def chunks() -> Any:  # no Content-Length: counted while streaming
            yield big

        r = await client.post(
            "/v1/users", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(r, 413, "payload_too_large")

    run(tmp_path, scenario, max_body_bytes=100)


def test_app_errors_are_relayed(tmp_path: Path) -> None:
    taken = b'{"error": {"code": "username_taken", "message": "taken"}}'

    def respond(req: RecordedRequest) -> AppResponse:
        return AppResponse(409, APP_HEADERS, taken, "app-7")

    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.post("/v1/users", json={"username": "alice"})
        assert_error(r, 409, "username_taken")
        assert r.headers["x-served-by"] == "web-1,app-7"

    run(tmp_path, scenario, respond)


def test_app_unavailable_is_503_with_retry_after(tmp_path: Path) -> None:
    def respond(req: RecordedRequest) -> BaseException:
        return AppUnavailableError("all app nodes down")

    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.get(f"/v1/users/{ALICE}")
        assert_error(r, 503, "app_unavailable")
        assert r.headers["retry-after"] == "1"
        assert r.headers["x-served-by"] == "web-1"
        metrics = (await client.get("/metrics")).text
        assert "photostack_web_app_unavailable_total 1.0" in metrics

    run(tmp_path, scenario, respond)


def test_unexpected_failure_is_500_in_the_error_shape(tmp_path: Path) -> None:
    def respond(req: RecordedRequest) -> BaseException:
        return RuntimeError("boom")

    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.get(f"/v1/users/{ALICE}", headers={"x-request-id": "req-42"})
        assert_error(r, 500, "internal_error")
        assert r.headers["x-request-id"] == "req-42"

    run(tmp_path, scenario, respond)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_token"),
        ({"Authorization": "Basic abc"}, 401, "invalid_token"),
        ({"Authorization": "Bearer "}, 401, "invalid_token"),
        ({"Authorization": "Bearer not.a.token"}, 401, "invalid_token"),
        (
            {"Authorization": "Bearer " + TokenSigner(b"z" * 32).issue(ALICE)},
            401,
            "invalid_token",
        ),
        (auth(BOB), 403, "forbidden"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_follow_requires_the_users_own_token(
    tmp_path: Path, method: str, headers: dict[str, str], status: int, code: str
) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.request(method, f"/v1/users/{ALICE}/following/{BOB}", headers=headers)
        assert_error(r, status, code)
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        assert fake.requests == []

    run(tmp_path, scenario)


def test_follow_and_unfollow_forward_to_the_app(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        for method in ("PUT", "DELETE"):
            r = await client.request(method, f"/v1/users/{ALICE}/following/{BOB}", headers=auth())
            assert r.status_code == 204
            assert r.content == b""
            assert r.headers["x-served-by"] == "web-1,app-7"
        assert [(q.method, q.path) for q in fake.requests] == [
            ("PUT", f"/internal/v1/users/{ALICE}/following/{BOB}"),
            ("DELETE", f"/internal/v1/users/{ALICE}/following/{BOB}"),
        ]

    run(tmp_path, scenario)


def test_self_follow_is_422(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.put(f"/v1/users/{ALICE}/following/{ALICE}", headers=auth())
        assert_error(r, 422, "self_follow")
        assert fake.requests == []

    run(tmp_path, scenario)


def test_implausible_ids_are_404_without_an_app_call(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        assert_error(await client.get("/v1/users/" + "x" * 65), 404, "user_not_found")
        assert_error(await client.get("/v1/users/by-username/NoSuch"), 404, "user_not_found")
        r = await client.put(f"/v1/users/{ALICE}/following/{'y' * 70}", headers=auth())
        assert_error(r, 404, "user_not_found")
        r = await client.delete(f"/v1/users/{ALICE}/following/{'y' * 70}", headers=auth())
        assert r.status_code == 204
        assert fake.requests == []

    run(tmp_path, scenario)


@pytest.mark.parametrize("which", ["following", "followers"])
@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("limit=0", 422, "invalid_limit"),
        ("limit=101", 422, "invalid_limit"),
        ("limit=ten", 422, "invalid_limit"),
        ("cursor=%21%21", 400, "invalid_cursor"),
        ("cursor=bm90LWEtY3Vyc29y", 400, "invalid_cursor"),
    ],
)
def test_list_parameters_are_validated(
    tmp_path: Path, which: str, query: str, status: int, code: str
) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        assert_error(await client.get(f"/v1/users/{ALICE}/{which}?{query}"), status, code)
        assert fake.requests == []

    run(tmp_path, scenario)


def test_list_forwards_limit_and_cursor(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.get(f"/v1/users/{ALICE}/followers")
        assert r.json() == {"items": [], "next_cursor": None}
        r = await client.get(f"/v1/users/{ALICE}/following?limit=100&cursor=MTIzLmFiYw")
        assert r.status_code == 200
        assert [q.path for q in fake.requests] == [
            f"/internal/v1/users/{ALICE}/followers?limit=20",
            f"/internal/v1/users/{ALICE}/following?limit=100&cursor=MTIzLmFiYw",
        ]

    run(tmp_path, scenario)


def test_request_id_is_echoed_or_made_and_forwarded(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.get(f"/v1/users/{ALICE}", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert ("x-request-id", "abc-123") in fake.requests[0].headers
        r = await client.get(f"/v1/users/{ALICE}", headers={"X-Request-Id": "has space"})
        assert len(r.headers["x-request-id"]) == 32
        r = await client.get("/healthz")
        assert len(r.headers["x-request-id"]) == 32
        assert r.headers["x-served-by"] == "web-1"

    run(tmp_path, scenario)


def test_unknown_route_and_method_use_the_error_shape(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        assert_error(await client.get("/v2/nothing"), 404, "not_found")
        r = await client.patch(f"/v1/users/{ALICE}")
        assert_error(r, 405, "method_not_allowed")
        assert "GET" in r.headers["allow"]

    run(tmp_path, scenario)


def test_health_metrics_and_docs(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, fake: ScriptedAppClient) -> None:
        r = await client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        await client.get(f"/v1/users/{ALICE}")
        metrics = await client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'route="/v1/users/{user_id}",status="200"' in metrics.text
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/users/{user_id}/following/{target_id}" in spec["paths"]

    run(tmp_path, scenario)


def test_health_is_503_before_start_and_after_stop(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    web: FastAPI = create_app(
        WebSettings(name="web-1", app_nodes=(), token_secret_path=secret),
        ScriptedAppClient(default_respond),
    )

    async def health() -> int:
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            return (await client.get("/healthz")).status_code

    async def main() -> list[int]:
        seen = [await health()]
        async with running(web):
            seen.append(await health())
        seen.append(await health())
        return seen

    assert asyncio.run(main()) == [503, 200, 503]


def test_two_apps_in_one_process_have_separate_metrics(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    settings = WebSettings(name="web-1", app_nodes=(), token_secret_path=secret)
    a = create_app(settings, ScriptedAppClient(default_respond))
    b = create_app(settings, ScriptedAppClient(default_respond))
    assert a.state.node.registry is not b.state.node.registry
