"""The [edge] engine and [edge.proxy] keys of a topology file."""

from __future__ import annotations

import pytest

from photostack.cluster.topology import TLS_PORT_OFFSET, TopologyError, layout, parse_topology

STORAGE = """
[storage.users]
shards = 1
[storage.social]
shards = 1
[storage.photos]
shards = 1
"""


def topo(edge: str) -> str:
    return f"[edge]\ncount = 1\n{edge}\n{STORAGE}"


def test_defaults() -> None:
    t = parse_topology(topo(""))
    assert t.edge_engine == "photostack"
    assert t.edge_proxy == {}


def test_engine_and_features() -> None:
    t = parse_topology(
        topo(
            'engine = "nginx"\nstrategy = "least-connections"\n'
            "[edge.proxy]\ngzip = true\ntls = true\naccess_log = true\ncollapse = true\n"
            'deny_paths = ["/admin"]\n[edge.proxy.response_headers_add]\nX-Frame-Options = "DENY"'
        )
    )
    assert t.edge_engine == "nginx"
    assert t.edge_proxy["gzip"] is True
    assert t.edge_proxy["response_headers_add"] == {"X-Frame-Options": "DENY"}
    assert t.edge_balancing["strategy"] == "least-connections"
    assert layout(t, 9000).tls_port == 9000 + TLS_PORT_OFFSET


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        ('engine = "haproxy"', "engine must be one of"),
        ("[edge.proxy]\ngzipp = true", "unknown proxy key 'gzipp'"),
        ('[edge.proxy]\ntls = "yes"', "proxy.tls must be true or false"),
        ('engine = "nginx"\n[edge.proxy]\nallow_paths = ["/v1/"]', "allow_paths"),
        ("proxy = 3", "must be a table"),
    ],
)
def test_refused(edge: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_topology(topo(edge))
