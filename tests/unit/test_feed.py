"""The feed's policy: hybrid fan-out threshold and the read-time merge (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.service._feed import (
    SENTINEL,
    FanoutMode,
    FeedConfig,
    cursor_of,
    entry_after,
    fanout_mode,
    merge_entries,
    micros_of,
)

entries = st.lists(
    st.tuples(st.integers(0, 10**15), st.text("abcdef", min_size=1, max_size=3)), max_size=30
)


def test_hybrid_threshold() -> None:
    assert fanout_mode(0, 1000) is FanoutMode.PUSH
    assert fanout_mode(1000, 1000) is FanoutMode.PUSH
    assert fanout_mode(1001, 1000) is FanoutMode.PULL
    assert fanout_mode(1, 0) is FanoutMode.PULL


def test_merge_interleaves_by_time_and_drops_duplicates_and_the_sentinel() -> None:
    timeline = [(50, "b"), (30, "d"), (10, "f"), (10**18, SENTINEL)]
    celeb = [(60, "a"), (40, "c"), (30, "d"), (20, "e")]
    page, more = merge_entries([timeline, celeb], None, 4)
    assert page == [(60, "a"), (50, "b"), (40, "c"), (30, "d")]
    assert more
    rest, more = merge_entries([timeline, celeb], page[-1], 4)
    assert rest == [(20, "e"), (10, "f")]
    assert not more


def test_ties_on_time_are_ordered_by_id_and_paged_without_loss() -> None:
    same = [(5, "a"), (5, "c"), (5, "b")]
    first, more = merge_entries([same], None, 2)
    assert first == [(5, "c"), (5, "b")]
    assert more
    second, more = merge_entries([same], first[-1], 2)
    assert second == [(5, "a")]
    assert not more


@given(st.lists(entries, max_size=4), st.integers(1, 7))
def test_paging_the_merge_yields_the_union_once_newest_first(
    sources: list[list[tuple[int, str]]], limit: int
) -> None:
    best: dict[str, int] = {}
    for source in sources:
        for score, photo in source:
            best[photo] = max(best.get(photo, -1), score)
    expected = sorted(((s, p) for p, s in best.items()), reverse=True)
    seen: list[tuple[int, str]] = []
    after = None
    for _ in range(100):
        page, more = merge_entries(sources, after, limit)
        assert len(page) <= limit
        seen += page
        if not more:
            break
        after = page[-1]
    assert seen == expected


def test_cursor_round_trip_is_exact_to_the_microsecond() -> None:
    moment = datetime(2026, 11, 27, 23, 5, 0, 123456, tzinfo=UTC)
    entry = (micros_of(moment), "u1_0000000000000000")
    assert entry_after(cursor_of(entry)) == entry
    assert cursor_of(entry).created_at == moment


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="feed sizes"):
        FeedConfig(max_items=0)
    with pytest.raises(ValueError, match="fanout_limit"):
        FeedConfig(fanout_limit=-1)
