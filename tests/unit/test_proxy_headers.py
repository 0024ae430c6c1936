"""Header rules of the proxy hop (pure)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks import proxy
from photostack.blocks.proxy import (
    HOP_BY_HOP,
    downstream_headers,
    error_body,
    is_valid_request_id,
    request_id_of,
    upstream_headers,
)


def test_upstream_headers_strip_hop_by_hop_and_add_forwarding() -> None:
    headers = [
        ("Host", "example"),
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Request-Id", "old"),
        ("Accept", "*/*"),
    ]
    out = upstream_headers(headers, client_ip="127.0.0.1", proto="http", request_id="rid")
    assert out == [
        ("Host", "example"),
        ("Accept", "*/*"),
        ("X-Forwarded-For", "10.0.0.1, 127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Request-Id", "rid"),
    ]


def test_downstream_headers_strip_and_keep_request_id() -> None:
    out = downstream_headers(
        [("Connection", "close"), ("Upgrade", "h2c"), ("X-Request-Id", "r1"), ("ETag", '"1"')],
        request_id="ignored",
    )
    assert out == [("X-Request-Id", "r1"), ("ETag", '"1"')]
    assert downstream_headers([], request_id="r2") == [("X-Request-Id", "r2")]


@given(st.sampled_from(sorted(HOP_BY_HOP)), st.text(min_size=1, max_size=5))
def test_no_hop_by_hop_name_survives(name: str, value: str) -> None:
    for variant in (name, name.upper(), name.title()):
        out = upstream_headers([(variant, value)], client_ip="c", proto="http", request_id="r")
        assert all(k.lower() != name for k, _ in out)
        assert downstream_headers([(variant, value)], request_id="r") == [("X-Request-Id", "r")]


def test_request_id_validation() -> None:
    assert request_id_of([("x-request-id", "abc")]) == "abc"
    assert request_id_of([("X-Request-Id", "bad\x01")]) is None
    assert request_id_of([]) is None
    assert not is_valid_request_id("x" * 129)
    assert not is_valid_request_id("")


def test_error_body_shape() -> None:
    assert json.loads(error_body("no_backend", "down")) == {
        "error": {"code": "no_backend", "message": "down"}
    }


def test_every_export_imports() -> None:
    for name in proxy.__all__:
        assert getattr(proxy, name) is not None, name
