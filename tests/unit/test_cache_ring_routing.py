"""The distributed cache's pure parts: node health transitions, routing with remap or fail
closed, invalidation targets, epoch tags and the global envelope."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.cache import (
    FailureMode,
    IllegalTransitionError,
    NodeHealth,
    NodeState,
    Stored,
    decode_envelope,
    encode_envelope,
    parse_failure_mode,
)
from photostack.blocks.cache._ring_client import tag, untag
from photostack.blocks.cache._ring_routing import TRANSITIONS, invalidation_targets, route
from photostack.blocks.ring import HashRing

NAMES = ("cache-1", "cache-2", "cache-3")


def _setup(
    modes: dict[str, FailureMode] | None = None,
) -> tuple[HashRing, dict[str, NodeHealth]]:
    ring = HashRing(dict.fromkeys(NAMES, 1.0), vnodes=256)
    modes = modes or {}
    return ring, {n: NodeHealth(n, modes.get(n, FailureMode.REMAP)) for n in NAMES}


def test_health_follows_the_transition_table() -> None:
    health = NodeHealth("cache-1", FailureMode.REMAP)
    assert health.fail() is True
    assert health.state is NodeState.DOWN
    assert health.fail() is False  # already down: no second failure counted
    with pytest.raises(IllegalTransitionError):
        health.to(NodeState.UP)  # never back without a probe
    health.to(NodeState.PROBING)
    health.to(NodeState.DOWN)
    health.to(NodeState.PROBING)
    health.to(NodeState.UP)
    assert (health.failures, health.rejoins) == (1, 1)
    for state in NodeState:
        for target in NodeState:
            if (state, target) not in TRANSITIONS:
                probe = NodeHealth("x", FailureMode.REMAP, state=state)
                with pytest.raises(IllegalTransitionError):
                    probe.to(target)


def test_failure_mode_parses_with_a_reason() -> None:
    assert parse_failure_mode("fail-closed") is FailureMode.FAIL_CLOSED
    with pytest.raises(ValueError, match="remap"):
        parse_failure_mode("failover")


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=200, unique=True))
def test_a_down_node_moves_only_its_own_keys(keys: list[str]) -> None:
    ring, health = _setup()
    before = {k: route(ring, health, k) for k in keys}
    health["cache-2"].fail()
    for key in keys:
        now = route(ring, health, key)
        if before[key].node != "cache-2":
            assert now == before[key]
        else:
            assert now.node == next(n for n in ring.walk(key) if n != "cache-2")
            assert now.remapped
            assert now.owner == "cache-2"


def test_fail_closed_sends_a_down_node_keys_nowhere() -> None:
    ring, health = _setup({"cache-2": FailureMode.FAIL_CLOSED})
    health["cache-2"].fail()
    keys = [f"k{i}" for i in range(300)]
    lost = [k for k in keys if ring.node_for(k) == "cache-2"]
    assert lost
    assert all(route(ring, health, k).node is None for k in lost)
    assert all(route(ring, health, k).node == ring.node_for(k) for k in keys if k not in lost)


def test_every_node_down_routes_nowhere() -> None:
    ring, health = _setup()
    for h in health.values():
        h.fail()
    assert route(ring, health, "k").node is None


def test_invalidation_reaches_the_owner_and_its_successor() -> None:
    ring, health = _setup()
    for i in range(100):
        key = f"k{i}"
        targets = invalidation_targets(ring, health, key)
        assert targets == ring.nodes_for(key, 2)
    health["cache-1"].fail()
    key = next(f"k{i}" for i in range(100) if ring.node_for(f"k{i}") == "cache-1")
    assert invalidation_targets(ring, health, key) == [ring.nodes_for(key, 2)[1]]


@given(st.integers(min_value=0, max_value=2**40), st.binary(max_size=64))
def test_epoch_tags_round_trip_and_reject_other_epochs(epoch: int, payload: bytes) -> None:
    raw = tag(epoch, payload)
    assert untag(raw, epoch) == payload
    assert untag(raw, epoch + 1) is None
    assert untag(payload.replace(b"\n", b""), epoch) is None  # untagged bytes: not ours


@given(
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.binary(max_size=64),
)
def test_envelope_round_trips(fresh_until: float, delta: float, payload: bytes) -> None:
    decoded = decode_envelope(encode_envelope(Stored(payload, fresh_until, delta)))
    assert decoded is not None
    assert decoded.value == payload
    assert decoded.fresh_until_s == pytest.approx(fresh_until, abs=1e-5)
    assert decoded.delta_s == pytest.approx(delta, abs=1e-5)
    assert decode_envelope(b"not an envelope") is None
    assert decode_envelope(None) is None
