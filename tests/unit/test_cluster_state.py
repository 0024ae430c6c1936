from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.cluster.state import IllegalTransition, NodeLifecycle, NodeState, RestartPolicy


def test_a_node_walks_its_normal_life() -> None:
    node = NodeLifecycle("app-1")
    for state in (
        NodeState.STARTING,
        NodeState.READY,
        NodeState.UNHEALTHY,
        NodeState.READY,
        NodeState.BACKOFF,
        NodeState.STARTING,
        NodeState.READY,
        NodeState.STOPPING,
        NodeState.STOPPED,
        NodeState.STARTING,
    ):
        node.become(state)
    assert node.state is NodeState.STARTING
    assert node.is_alive
    assert repr(node) == "<NodeLifecycle app-1 starting>"


@pytest.mark.parametrize(
    ("start", "illegal"),
    [
        (NodeState.PENDING, NodeState.READY),
        (NodeState.STOPPED, NodeState.READY),
        (NodeState.STOPPING, NodeState.READY),
        (NodeState.BACKOFF, NodeState.READY),
    ],
)
def test_illegal_transitions_raise(start: NodeState, illegal: NodeState) -> None:
    node = NodeLifecycle("web-1", start)
    with pytest.raises(IllegalTransition, match="is not allowed"):
        node.become(illegal)
    assert node.state is start


def test_restart_delay_grows_then_caps() -> None:
    policy = RestartPolicy(initial_delay_s=0.25, max_delay_s=2.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 2.0]


@given(previous=st.integers(0, 50), uptime_s=st.floats(0, 1000))
def test_a_stable_run_resets_the_backoff(previous: int, uptime_s: float) -> None:
    policy = RestartPolicy(stable_after_s=30.0)
    after = policy.crashes_after(previous, uptime_s)
    assert after == (1 if uptime_s >= 30.0 else previous + 1)
    assert policy.delay_s(after) <= policy.max_delay_s
