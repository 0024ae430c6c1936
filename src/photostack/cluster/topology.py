"""The cluster's shape: one TOML file names every role, its count and its storage groups.

`load_topology` turns the file into frozen values and refuses anything it does not understand
(an unknown key is a typo until proven otherwise); `layout` turns a topology and a port base into
the concrete list of nodes with names and ports. Both are pure: no sockets, no processes.
"""

from __future__ import annotations

from photostack.cluster._layout import layout
from photostack.cluster._topology_model import (
    CACHE_ENGINES,
    CONTROL_PORT_OFFSET,
    DIRECTORY_GROUP,
    EDGE_ENGINES,
    INTERNAL_PORT_OFFSET,
    PRODUCT_GROUPS,
    QUEUE_GROUP,
    STATIC_PORT_OFFSET,
    TLS_PORT_OFFSET,
    ChaosLinkSpec,
    Layout,
    NodeSpec,
    Role,
    StorageGroup,
    Topology,
    TopologyError,
)
from photostack.cluster._topology_parse import (
    CDN_ENGINES,
    CHAOS_LINK_KINDS,
    bundled_topology,
    load_topology,
    parse_topology,
)

__all__ = [
    "CACHE_ENGINES",
    "CDN_ENGINES",
    "CHAOS_LINK_KINDS",
    "CONTROL_PORT_OFFSET",
    "DIRECTORY_GROUP",
    "EDGE_ENGINES",
    "INTERNAL_PORT_OFFSET",
    "PRODUCT_GROUPS",
    "QUEUE_GROUP",
    "STATIC_PORT_OFFSET",
    "TLS_PORT_OFFSET",
    "ChaosLinkSpec",
    "Layout",
    "NodeSpec",
    "Role",
    "StorageGroup",
    "Topology",
    "TopologyError",
    "bundled_topology",
    "layout",
    "load_topology",
    "parse_topology",
]
