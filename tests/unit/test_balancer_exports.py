from __future__ import annotations

from photostack.blocks import balancer
from photostack.blocks.balancer import testing


def test_every_export_imports() -> None:
    for module in (balancer, testing):
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_errors_share_one_root() -> None:
    errors = [
        balancer.NoBackendAvailable,
        balancer.UpstreamTimeout,
        balancer.UpstreamConnectError,
        balancer.UpstreamProtocolError,
        balancer.PoolTimeout,
        balancer.IllegalTransition,
    ]
    assert all(issubclass(e, balancer.BalancerError) for e in errors)
