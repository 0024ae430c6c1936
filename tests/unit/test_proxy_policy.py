"""Pure decisions of the proxy features: filter, header rules, gzip negotiation, caching."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.proxy import (
    CacheConfig,
    FilterRules,
    GzipConfig,
    Refusal,
    accepts_gzip,
    apply_header_rules,
    cache_directives,
    check_filter,
    compress,
    freshness_s,
    is_compressible,
    is_shareable,
    stale_window_s,
)

JSON = ("Content-Type", "application/json")


def test_filter_methods_and_paths() -> None:
    rules = FilterRules(
        allow_methods=frozenset({"GET", "POST"}),
        deny_methods=frozenset({"POST"}),
        deny_paths=("/admin",),
        allow_paths=("/v1/", "/docs"),
    )
    assert check_filter(rules, "GET", "/v1/users") is None
    assert check_filter(rules, "GET", "/docs") is None
    assert check_filter(rules, "PUT", "/v1/users") == Refusal(
        405, "method_not_allowed", "method PUT is not allowed here"
    )
    assert check_filter(rules, "POST", "/v1/users") is not None  # deny wins over allow
    assert check_filter(rules, "GET", "/admin").status == 403  # type: ignore[union-attr]
    assert check_filter(rules, "GET", "/admin/x").status == 403  # type: ignore[union-attr]
    assert check_filter(rules, "GET", "/v2/x").status == 403  # type: ignore[union-attr]
    # A prefix is a path segment, not a string prefix.
    assert check_filter(FilterRules(deny_paths=("/admin",)), "GET", "/administrator") is None


def test_header_rules_replace_and_remove_case_insensitively() -> None:
    headers = [("X-Edge", "spoofed"), ("Cookie", "a=1"), ("Accept", "*/*")]
    out = apply_header_rules(headers, (("x-edge", "photostack"),), frozenset({"cookie"}))
    assert out == [("Accept", "*/*"), ("x-edge", "photostack")]
    assert apply_header_rules(headers, (), frozenset()) is headers  # off: untouched, no copy


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, *;q=1", False),  # an explicit refusal beats the wildcard
        ("*", True),
        ("*;q=0", False),
        ("br", False),
        ("identity", False),
        ("x-gzip", True),
        ("gzip;q=bogus", False),
    ],
)
def test_accepts_gzip_honours_q_values(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


@given(st.text(max_size=60))
def test_accepts_gzip_never_raises(header: str) -> None:
    accepts_gzip(header)


def test_compressibility() -> None:
    config = GzipConfig(min_bytes=100, max_buffer_bytes=1000)
    assert is_compressible(200, [JSON], 500, config)
    assert not is_compressible(200, [JSON], 50, config)  # too small
    assert not is_compressible(200, [JSON], 5000, config)  # too large to buffer
    assert not is_compressible(200, [("Content-Type", "image/jpeg")], 500, config)
    assert not is_compressible(200, [JSON, ("Content-Encoding", "br")], 500, config)
    assert not is_compressible(200, [JSON, ("Cache-Control", "no-transform")], 500, config)
    assert not is_compressible(206, [JSON], 500, config)
    assert is_compressible(200, [("content-type", "text/html; charset=utf-8")], 500, config)


@given(st.binary(max_size=4096))
def test_compress_round_trips_as_gzip(body: bytes) -> None:
    assert gzip.decompress(compress(body, 5)) == body


def test_cache_control_parsing() -> None:
    d = cache_directives('public, max-age=60, s-maxage="30", stale-if-error=600, private="x"')
    assert d.public
    assert d.private
    assert d.max_age_s == 60
    assert d.s_maxage_s == 30
    assert d.stale_if_error_s == 600
    assert cache_directives(None).max_age_s is None
    assert cache_directives("no-store").no_store


@pytest.mark.parametrize(
    ("headers", "credentials", "expected"),
    [
        ([("Cache-Control", "max-age=60")], False, 5.0),  # capped
        ([("Cache-Control", "max-age=2")], False, 2.0),
        ([("Cache-Control", "s-maxage=3, max-age=60")], False, 3.0),
        ([], False, 0.0),  # no explicit permission: not stored
        ([("Cache-Control", "no-store, max-age=60")], False, 0.0),
        ([("Cache-Control", "no-cache, max-age=60")], False, 0.0),
        ([("Cache-Control", "private, max-age=60")], False, 0.0),
        ([("Cache-Control", "max-age=60"), ("Set-Cookie", "a=1")], False, 0.0),
        ([("Cache-Control", "max-age=60"), ("Vary", "Cookie")], False, 0.0),
        ([("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")], False, 5.0),
        ([("Cache-Control", "max-age=60")], True, 0.0),  # Authorization needs public
        ([("Cache-Control", "public, max-age=60")], True, 5.0),
    ],
)
def test_freshness(headers: list[tuple[str, str]], credentials: bool, expected: float) -> None:
    config = CacheConfig(max_ttl_s=5.0)
    assert freshness_s(200, headers, config, request_has_credentials=credentials) == expected


def test_freshness_only_for_cacheable_statuses_and_stale_window() -> None:
    config = CacheConfig(max_ttl_s=5.0, stale_if_error_s=30.0)
    headers = [("Cache-Control", "max-age=60")]
    assert freshness_s(500, headers, config, request_has_credentials=False) == 0.0
    assert freshness_s(404, headers, config, request_has_credentials=False) == 5.0
    assert stale_window_s(headers, config) == 30.0
    assert stale_window_s([("Cache-Control", "max-age=1, stale-if-error=7")], config) == 7.0


def test_shareable_responses_for_collapsed_forwarding() -> None:
    assert is_shareable([JSON])
    assert is_shareable([("Cache-Control", "private")])  # the key carries the credentials
    assert not is_shareable([("Set-Cookie", "session=1")])
    assert not is_shareable([("Cache-Control", "no-store")])
