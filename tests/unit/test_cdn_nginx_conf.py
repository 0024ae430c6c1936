"""The nginx CDN config rendered from the topology (pure text checks; nginx -t runs in the
component test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from photostack.cluster.engines.base import EngineError
from photostack.cluster.engines.nginx_cdn import NginxCdnConfig, render_nginx_cdn_conf
from photostack.cluster.topology import TopologyError, layout, load_topology, parse_topology


def config(**overrides: object) -> NginxCdnConfig:
    values: dict[str, object] = {
        "name": "cdn-1",
        "host": "127.0.0.1",
        "port": 8081,
        "purge_port": 8127,
        "origins": (("media-1", "127.0.0.1", 8125), ("media-2", "127.0.0.1", 8126)),
        "prefix": Path("/p"),
        "log_path": Path("/p/log"),
        "cache_bytes": 64 << 20,
    }
    values.update(overrides)
    return NginxCdnConfig(**values)  # type: ignore[arg-type]


def test_the_cdn_contract_is_rendered() -> None:
    text = render_nginx_cdn_conf(config(), Path("/t"), user=None)
    for directive in (
        f"max_size={64 << 20}",
        "server 127.0.0.1:8125 ",
        "server 127.0.0.1:8126 ",
        "proxy_cache_lock on;",
        "proxy_cache_background_update on;",
        "proxy_cache_use_stale error timeout updating",
        "proxy_next_upstream error timeout http_404",
        "proxy_next_upstream_tries 2;",
        "add_header X-Cache $upstream_cache_status always;",
        "listen 127.0.0.1:8081 ",
        "listen 127.0.0.1:8127;",
        "proxy_cache_bypass 1;",
        "error_page 418 = /_purge$uri;",
    ):
        assert directive in text, directive
    assert text.count("proxy_cache_key $media_uri;") == 2  # public and purge share the key


def test_without_a_purge_port_there_is_no_purge_server() -> None:
    text = render_nginx_cdn_conf(config(purge_port=None), Path("/t"), user="photostack")
    assert "proxy_cache_bypass" not in text
    assert "user photostack;" in text


def test_no_origin_is_refused() -> None:
    with pytest.raises(EngineError):
        render_nginx_cdn_conf(config(origins=()), Path("/t"), user=None)


MINIMAL = """
[storage.users]
[storage.social]
[storage.photos]
"""


def test_topology_media_and_cdn_defaults_and_layout() -> None:
    topo = parse_topology(MINIMAL)
    assert (topo.media_count, topo.cdn_engine, topo.cdn_cache_bytes) == (2, "photostack", 256 << 20)
    lay = layout(load_topology(), 8080)
    cdn = lay.node("cdn-1")
    assert cdn.port == lay.static_port == 8081
    assert cdn.admin_port is not None
    assert cdn.admin_port > 8080 + 20
    assert [n.name for n in lay.nodes if n.name.startswith("media-")] == ["media-1", "media-2"]


def test_the_cdn_disk_tier_keys() -> None:
    topo = parse_topology(MINIMAL)
    assert (topo.cdn_disk_cache_bytes, topo.cdn_disk_max_entry_bytes) == (1 << 30, 64 << 20)
    set_ = parse_topology(MINIMAL + "[cdn]\ndisk_cache_bytes = 5000000\n")
    assert (set_.cdn_disk_cache_bytes, set_.cdn_disk_max_entry_bytes) == (5_000_000, 5_000_000)
    off = parse_topology(MINIMAL + "[cdn]\ndisk_cache_bytes = 0\n")
    assert off.cdn_disk_cache_bytes == 0  # memory only


@pytest.mark.parametrize(
    "extra",
    [
        "[cdn]\nengine = 'varnish'\n",
        "[cdn]\ncount = 2\n",
        "[cdn]\ncache_bytes = 10\n",
        "[cdn]\ncache_bytes = 2000000\nmax_entry_bytes = 3000000\n",
        "[cdn]\nttl = 3\n",
        "[cdn]\ndisk_cache_bytes = -1\n",
        "[cdn]\ndisk_cache_bytes = 2000000\ndisk_max_entry_bytes = 3000000\n",
        "[media]\ncount = 0\n",
        "[media]\nreplicas = 2\n",
    ],
)
def test_bad_media_and_cdn_tables_are_refused(extra: str) -> None:
    with pytest.raises(TopologyError):
        parse_topology(MINIMAL + extra)
