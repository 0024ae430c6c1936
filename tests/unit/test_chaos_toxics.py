"""The chaos block's pure toxic logic: parsing, how toxics combine, and the per-chunk arithmetic
(jitter, ordering, pacing, reset budgets) with scripted randomness and plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks import chaos
from photostack.blocks.chaos import (
    Direction,
    Flow,
    LinkToxics,
    OrderedDelay,
    Pacer,
    ResetBudget,
    ToxicConfigError,
    ToxicKind,
    ToxicNotFound,
    jittered_delay_s,
    parse_toxic,
    split_for_rate,
)
from photostack.blocks.chaos.testing import ScriptedRandom


def test_every_export_imports() -> None:
    for name in chaos.__all__:
        assert getattr(chaos, name) is not None


def test_parse_applies_defaults_and_keeps_only_the_kinds_attributes() -> None:
    toxic = parse_toxic({"type": "latency", "attributes": {"latency_ms": 20}}, "t1")
    assert toxic.kind is ToxicKind.LATENCY
    assert toxic.direction is Direction.BOTH
    assert dict(toxic.attributes) == {"latency_ms": 20.0, "jitter_ms": 0.0}
    assert toxic.to_json() == {
        "id": "t1",
        "type": "latency",
        "direction": "both",
        "attributes": {"latency_ms": 20.0, "jitter_ms": 0.0},
    }
    assert dict(parse_toxic({"type": "reset"}, "r").attributes) == {"after_bytes": 0.0}
    assert dict(parse_toxic({"type": "down"}, "d").attributes) == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "lag"}, "unknown toxic type"),
        ({"type": "latency"}, "needs attribute 'latency_ms'"),
        ({"type": "latency", "attributes": {"latency_ms": -1}}, "outside"),
        ({"type": "latency", "attributes": {"latency_ms": True}}, "must be a number"),
        ({"type": "latency", "attributes": {"latency_ms": 1, "rate": 2}}, "no attribute 'rate'"),
        ({"type": "bandwidth", "attributes": {"rate_bytes_per_s": 0}}, "outside"),
        ({"type": "down", "direction": "sideways"}, "direction must be"),
        ({"type": "down", "attributes": {"x": 1}}, "allowed: none"),
        ({"type": "down", "extra": 1}, "unknown toxic field"),
        ({"type": "down", "attributes": [1]}, "attributes must be"),
    ],
)
def test_parse_refuses_what_it_does_not_understand(body: dict[str, object], message: str) -> None:
    with pytest.raises(ToxicConfigError, match=message):
        parse_toxic(body, "t")


def test_toxics_combine_per_flow() -> None:
    toxics = LinkToxics()
    toxics.add({"type": "latency", "direction": "downstream", "attributes": {"latency_ms": 30}})
    toxics.add({"type": "latency", "attributes": {"latency_ms": 20}})
    toxics.add({"type": "bandwidth", "attributes": {"rate_bytes_per_s": 1000}})
    toxics.add(
        {"type": "bandwidth", "direction": "upstream", "attributes": {"rate_bytes_per_s": 500}}
    )
    toxics.add({"type": "blackhole", "direction": "upstream"})
    rand = ScriptedRandom([0.5])
    assert toxics.latency_s(Flow.DOWNSTREAM, rand) == pytest.approx(0.05)
    assert toxics.latency_s(Flow.UPSTREAM, rand) == pytest.approx(0.02)
    assert toxics.rate_bytes_per_s(Flow.UPSTREAM) == 500
    assert toxics.rate_bytes_per_s(Flow.DOWNSTREAM) == 1000
    assert toxics.is_blackholed(Flow.UPSTREAM)
    assert not toxics.is_blackholed(Flow.DOWNSTREAM)
    assert not toxics.is_down
    assert len(toxics) == 5


def test_down_is_link_wide_and_removal_restores() -> None:
    toxics = LinkToxics()
    down = toxics.add({"type": "down", "direction": "upstream"})
    assert toxics.is_down
    assert down.applies_to(Flow.DOWNSTREAM)  # a link is down both ways, whatever was said
    assert toxics.remove(down.id) == down
    assert not toxics.is_down
    with pytest.raises(ToxicNotFound):
        toxics.remove(down.id)


def test_ids_are_unique_and_name_the_type() -> None:
    toxics = LinkToxics()
    ids = [toxics.add({"type": "reset"}).id for _ in range(3)]
    assert ids == ["reset-1", "reset-2", "reset-3"]
    assert [t.id for t in toxics.clear()] == ids
    assert toxics.active() == ()


def test_reset_at_once_and_slow_close_delay() -> None:
    toxics = LinkToxics()
    toxics.add({"type": "reset", "attributes": {"after_bytes": 10}})
    assert not toxics.resets_at_once()
    toxics.add({"type": "reset", "direction": "downstream"})
    assert toxics.resets_at_once()
    toxics.add({"type": "slow_close", "direction": "downstream", "attributes": {"delay_ms": 250}})
    toxics.add({"type": "slow_close", "attributes": {"delay_ms": 100}})
    assert toxics.close_delay_s(Flow.DOWNSTREAM) == pytest.approx(0.25)
    assert toxics.close_delay_s(Flow.UPSTREAM) == pytest.approx(0.1)


def test_jitter_draws_are_uniform_around_the_latency_and_never_negative() -> None:
    assert jittered_delay_s(100, 0, ScriptedRandom([0.9])) == pytest.approx(0.1)
    assert jittered_delay_s(100, 20, ScriptedRandom([0.0])) == pytest.approx(0.08)
    assert jittered_delay_s(100, 20, ScriptedRandom([0.5])) == pytest.approx(0.1)
    assert jittered_delay_s(100, 20, ScriptedRandom([0.75])) == pytest.approx(0.11)
    assert jittered_delay_s(10, 50, ScriptedRandom([0.0])) == 0.0


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 5)), min_size=1, max_size=50))
def test_ordered_delay_never_reorders_and_never_delivers_early(
    reads: list[tuple[float, float]],
) -> None:
    order = OrderedDelay()
    now, last = 0.0, float("-inf")
    for gap, delay in reads:
        now += gap
        due = order.due(now, delay)
        assert due >= now + delay
        assert due >= last
        last = due


def test_pacer_spaces_slices_at_the_rate_and_saves_no_burst() -> None:
    pacer = Pacer()
    starts = [pacer.start_at(0.0, 100, 1000) for _ in range(5)]
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # after an idle second the next slice goes at once, and the one after waits again
    assert pacer.start_at(2.0, 100, 1000) == 2.0
    assert pacer.start_at(2.0, 100, 1000) == pytest.approx(2.1)
    pacer.reset()
    assert pacer.start_at(2.0, 100, 1000) == 2.0


@given(st.integers(0, 65536), st.floats(1, 10**7))
def test_split_for_rate_keeps_every_byte_in_small_slices(nbytes: int, rate: float) -> None:
    slices = split_for_rate(nbytes, rate)
    assert sum(slices) == nbytes
    assert all(0 < s <= max(1, int(rate / 20)) for s in slices)


def test_reset_budget_lets_exactly_that_many_bytes_through() -> None:
    budget = ResetBudget(10)
    assert budget.consume(4) == (4, False)
    assert budget.consume(4) == (4, False)
    assert budget.consume(4) == (2, True)
    assert ResetBudget(0).consume(5) == (0, True)


def test_scripted_random_refuses_values_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        ScriptedRandom([1.0])
    rand = ScriptedRandom([0.1, 0.2])
    assert [rand(), rand(), rand()] == [0.1, 0.2, 0.2]
