"""Fault injection: a TCP proxy with toxics in the spirit of Toxiproxy, and real partitions
between network namespaces.

- ``ChaosLink`` / ``ChaosProxy`` forward TCP from a listen port to an upstream; toxics switched
  at run time shape the traffic: ``down``, ``blackhole``, ``latency`` (with jitter),
  ``bandwidth``, ``reset`` and ``slow_close``, per flow (upstream, downstream or both).
- ``create_chaos_app`` is the proxy's HTTP admin API (the chaos node serves it).
- ``NetnsLab`` creates namespaces and veth pairs and partitions them (root and iproute2 only);
  ``netns_capability`` says whether that works here.

The toxic arithmetic (``LinkToxics``, ``OrderedDelay``, ``Pacer``, ``ResetBudget``) is pure;
the asyncio adapter only drives it. See docs/chaos.md.
"""

from photostack.blocks.chaos._admin import create_chaos_app
from photostack.blocks.chaos._errors import (
    ChaosError,
    LinkNotFound,
    NetnsError,
    NetnsUnavailable,
    ToxicConfigError,
    ToxicNotFound,
)
from photostack.blocks.chaos._netns import (
    NetnsCapability,
    NetnsLab,
    VethPair,
    netns_capability,
    pair_addresses,
    require_netns,
    run_ip,
)
from photostack.blocks.chaos._proxy import ChaosLink, ChaosProxy, LinkConfig
from photostack.blocks.chaos._toxics import (
    Direction,
    Flow,
    LinkToxics,
    OrderedDelay,
    Pacer,
    ResetBudget,
    Toxic,
    ToxicKind,
    jittered_delay_s,
    parse_toxic,
    split_for_rate,
)

__all__ = [
    "ChaosError",
    "ChaosLink",
    "ChaosProxy",
    "Direction",
    "Flow",
    "LinkConfig",
    "LinkNotFound",
    "LinkToxics",
    "NetnsCapability",
    "NetnsError",
    "NetnsLab",
    "NetnsUnavailable",
    "OrderedDelay",
    "Pacer",
    "ResetBudget",
    "Toxic",
    "ToxicConfigError",
    "ToxicKind",
    "ToxicNotFound",
    "VethPair",
    "create_chaos_app",
    "jittered_delay_s",
    "netns_capability",
    "pair_addresses",
    "parse_toxic",
    "require_netns",
    "run_ip",
    "split_for_rate",
]
