"""[edge.proxy] settings, the micro-cache store, request keys and the access-log format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer.testing import ManualClock
from photostack.blocks.proxy import (
    Buffered,
    MicroCache,
    ProxyConfig,
    ProxyConfigError,
    format_entry,
    new_request_id,
    parse_proxy_settings,
    request_key,
)

BASE = ProxyConfig(backends=())


def test_everything_is_off_by_default() -> None:
    config = parse_proxy_settings({}, BASE)
    assert config.filter is None
    assert config.headers is None
    assert config.access_log_path is None
    assert config.tls is None
    assert config.gzip is None
    assert config.cache is None
    assert not config.collapse


def test_features_switch_on() -> None:
    config = parse_proxy_settings(
        {
            "deny_methods": ["trace"],
            "deny_paths": ["/admin"],
            "request_headers_add": {"X-Edge": "1"},
            "response_headers_remove": ["Server"],
            "access_log": "-",
            "tls": {"port": 8443, "cert": "/c", "key": "/k"},
            "gzip": True,
            "gzip_min_bytes": 10,
            "collapse": True,
            "cache_ttl_s": 2,
            "stale_if_error_s": 30,
            "header_timeout_s": 5,
            "max_body_bytes": 100,
        },
        BASE,
    )
    assert config.filter is not None
    assert config.filter.deny_methods == frozenset({"TRACE"})
    assert config.headers is not None
    assert config.headers.response_remove == frozenset({"server"})
    assert config.access_log_path == Path("-")
    assert config.tls is not None
    assert config.tls.port == 8443
    assert config.gzip is not None
    assert config.gzip.min_bytes == 10
    assert config.collapse
    assert config.cache is not None
    assert config.cache.max_ttl_s == 2
    assert config.cache.stale_if_error_s == 30
    assert config.header_timeout_s == 5
    assert config.max_body_bytes == 100


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gzipp": True}, "unknown proxy key 'gzipp'"),
        ({"gzip": "yes"}, "gzip must be true or false"),
        ({"deny_paths": ["admin"]}, "must start with '/'"),
        ({"request_headers_add": {"X Bad": "1"}}, "not a header name"),
        ({"request_headers_add": {"X-A": "a\r\nb"}}, "one-line string"),
        ({"tls": True}, "tls must be false or a table"),
        ({"stale_if_error_s": 5}, "needs the micro-cache"),
        ({"header_timeout_s": 0}, "must be positive"),
        ({"max_body_bytes": -1}, "non-negative integer"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ProxyConfigError, match=message):
        parse_proxy_settings(settings, BASE)


def test_micro_cache_freshness_staleness_and_lru() -> None:
    clock = ManualClock(100.0)
    cache = MicroCache(2, clock)
    response = Buffered(200, (), b"x", "web-1")
    cache.store("a", response, fresh_s=1.0, stale_s=10.0)
    assert cache.fresh("a") is response
    clock.advance(1.5)
    assert cache.fresh("a") is None
    assert cache.stale("a") is response
    clock.advance(10.0)
    assert cache.stale("a") is None
    cache.store("b", response, 5, 0)
    cache.store("c", response, 5, 0)
    cache.store("d", response, 5, 0)
    assert len(cache) == 2
    assert cache.fresh("b") is None  # least recently used went first


def test_request_key_separates_credentials_and_methods() -> None:
    base = [("Host", "h"), ("Accept", "*/*")]
    assert request_key("GET", "/x", base) == request_key("GET", "/x", [*base, ("X-Other", "1")])
    assert request_key("GET", "/x", base) != request_key("HEAD", "/x", base)
    assert request_key("GET", "/x", base) != request_key(
        "GET", "/x", [*base, ("Authorization", "Bearer a")]
    )
    assert request_key("GET", "/x", base) != request_key("GET", "/x", [*base, ("Cookie", "s=1")])


@given(st.text(max_size=40), st.text(max_size=40))
def test_access_log_lines_are_json(path: str, client: str) -> None:
    line = format_entry(
        time_s=1.5,
        request_id="rid",
        client=client,
        method="GET",
        path=path,
        backend=None,
        status=200,
        bytes_in=10,
        bytes_out=20,
        upstream_connect_s=None,
        upstream_first_byte_s=0.001,
        total_s=0.002,
        cache="HIT",
    )
    assert line.endswith("\n")
    entry = json.loads(line)
    assert entry["path"] == path
    assert entry["client"] == client
    assert entry["cache"] == "HIT"


def test_request_ids_are_unique_32_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert len(rid) == 32
        int(rid, 16)
