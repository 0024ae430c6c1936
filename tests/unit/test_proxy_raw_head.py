"""Forwarding the client's request head as raw bytes gives what re-serialising it gives.

``RequestEncoder`` forwards ``Request.raw`` (the client's own bytes) with only the edge's
headers appended when every header passes unchanged; otherwise it rebuilds the head. Both must
put the same request on the wire, apart from the fresh request id.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.proxy import HeaderRules
from photostack.blocks.proxy._relay import RequestEncoder
from photostack.blocks.proxy._request import Request

_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=12
)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
_ID = re.compile(rb"X-Request-Id: [0-9a-f]{32}\r\n")


def _canonical(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"{method} {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1")


def _request(method: str, headers: list[tuple[str, str]], *, raw: bool) -> Request:
    data = _canonical(method, "/v1/items?a=1", headers)
    return Request(
        method, "/v1/items?a=1", headers, b"", True, False, len(data), 0.0, None,
        data if raw else None,
    )  # fmt: skip


def _encode(encoder: RequestEncoder, request: Request) -> bytes | None:
    encoded = encoder.encode(request, client_ip="10.0.0.9", proto="https")
    return None if encoded is None else _ID.sub(b"X-Request-Id: ID\r\n", encoded[0])


@given(
    st.sampled_from(["GET", "HEAD", "DELETE", "POST", "OPTIONS"]),
    st.lists(st.tuples(_TOKEN, _VALUE), max_size=8),
    st.booleans(),
    st.booleans(),
)
def test_raw_and_rebuilt_heads_are_the_same_request(
    method: str, extra: list[tuple[str, str]], with_host: bool, with_rules: bool
) -> None:
    rules = (
        HeaderRules(request_add=(("X-Edge", "photostack"),), request_remove=frozenset({"x-debug"}))
        if with_rules
        else None
    )
    encoder = RequestEncoder(rules)
    headers = ([("Host", "edge.example")] if with_host else []) + extra
    raw = _encode(encoder, _request(method, headers, raw=True))
    rebuilt = _encode(encoder, _request(method, headers, raw=False))
    assert raw == rebuilt
    if with_host:
        assert raw is not None
        assert raw.endswith(b"\r\n\r\n")
        assert b"X-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\n" in raw
    else:
        assert raw is None  # no Host: the general path adds one


def test_a_head_with_headers_to_edit_is_rebuilt_not_copied() -> None:
    encoder = RequestEncoder(None)
    headers = [
        ("Host", "edge"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Request-Id", "client-id"),
        ("Proxy-Authorization", "Basic eA=="),
    ]
    encoded = encoder.encode(_request("GET", headers, raw=True), client_ip="10.0.0.9", proto="http")
    assert encoded is not None
    data, request_id = encoded
    assert request_id == "client-id"
    head = data.decode("latin-1").lower()
    for gone in ("connection:", "x-secret", "keep-alive", "proxy-authorization"):
        assert gone not in head
    assert "x-forwarded-for: 1.2.3.4, 10.0.0.9\r\n" in head
    assert head.count("x-request-id:") == 1
