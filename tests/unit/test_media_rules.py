"""Range parsing, conditional selection and Cache-Control terms (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.media import (
    ByteRange,
    RangeVerdict,
    etag_matches,
    parse_cache_control,
    parse_range,
    select,
)

ETAG = '"' + "a" * 64 + '"'


@pytest.mark.parametrize(
    ("header", "size", "verdict", "expected"),
    [
        ("bytes=0-9", 100, RangeVerdict.PARTIAL, ByteRange(0, 9)),
        ("bytes=90-", 100, RangeVerdict.PARTIAL, ByteRange(90, 99)),
        ("bytes=-10", 100, RangeVerdict.PARTIAL, ByteRange(90, 99)),
        ("bytes=-1000", 100, RangeVerdict.PARTIAL, ByteRange(0, 99)),
        ("bytes=50-1000", 100, RangeVerdict.PARTIAL, ByteRange(50, 99)),
        ("BYTES = 0-0", 100, RangeVerdict.PARTIAL, ByteRange(0, 0)),
        ("bytes=100-", 100, RangeVerdict.UNSATISFIABLE, None),
        ("bytes=100-200", 100, RangeVerdict.UNSATISFIABLE, None),
        ("bytes=-0", 100, RangeVerdict.UNSATISFIABLE, None),
        ("bytes=0-", 0, RangeVerdict.UNSATISFIABLE, None),
        ("bytes=0-1,5-6", 100, RangeVerdict.WHOLE, None),  # multi-range: 200 whole
        ("bytes=5-3", 100, RangeVerdict.WHOLE, None),  # invalid: ignored
        ("bytes=a-b", 100, RangeVerdict.WHOLE, None),
        ("bytes=", 100, RangeVerdict.WHOLE, None),
        ("bytes=1", 100, RangeVerdict.WHOLE, None),
        ("items=0-9", 100, RangeVerdict.WHOLE, None),
        ("0-9", 100, RangeVerdict.WHOLE, None),
        ("bytes=0-1," * 20 + "0-1", 100, RangeVerdict.WHOLE, None),
    ],
)
def test_parse_range(
    header: str, size: int, verdict: RangeVerdict, expected: ByteRange | None
) -> None:
    assert parse_range(header, size) == (verdict, expected)


@given(st.integers(0, 10_000), st.integers(0, 20_000), st.integers(0, 20_000))
def test_a_partial_range_always_lies_inside_the_body(size: int, a: int, b: int) -> None:
    for header in (f"bytes={a}-{b}", f"bytes={a}-", f"bytes=-{b}"):
        verdict, byte_range = parse_range(header, size)
        if verdict is RangeVerdict.PARTIAL:
            assert byte_range is not None
            assert 0 <= byte_range.start <= byte_range.end < size
            assert byte_range.length == byte_range.end - byte_range.start + 1
            assert byte_range.content_range(size).endswith(f"/{size}")


@given(st.text(max_size=40), st.integers(0, 1000))
def test_parse_range_never_raises(header: str, size: int) -> None:
    parse_range(header, size)


def test_etag_matching_is_weak_and_knows_lists_and_star() -> None:
    assert etag_matches(ETAG, ETAG)
    assert etag_matches(f"W/{ETAG}", ETAG)
    assert etag_matches(f'"x", {ETAG}', ETAG)
    assert etag_matches("*", ETAG)
    assert not etag_matches('"x"', ETAG)


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", {}, 200),
        ("GET", {"if-none-match": ETAG}, 304),
        ("HEAD", {"if-none-match": ETAG}, 304),
        ("GET", {"if-none-match": ETAG, "range": "bytes=0-1"}, 304),  # INM wins
        ("GET", {"range": "bytes=0-1"}, 206),
        ("HEAD", {"range": "bytes=0-1"}, 200),  # Range is for GET
        ("GET", {"range": "bytes=500-"}, 416),
        ("GET", {"range": "bytes=0-1", "if-range": ETAG}, 206),
        ("GET", {"range": "bytes=0-1", "if-range": '"old"'}, 200),
        ("GET", {"if-none-match": '"old"'}, 200),
    ],
)
def test_select(method: str, headers: dict[str, str], status: int) -> None:
    assert select(method, headers, ETAG, 100).status == status


def test_cache_control_terms() -> None:
    immutable = parse_cache_control("public, max-age=31536000, immutable")
    assert immutable.storable
    assert immutable.immutable
    assert immutable.max_age_s == 31536000
    swr = parse_cache_control("max-age=10, stale-while-revalidate=60, stale-if-error=300")
    assert (swr.max_age_s, swr.stale_while_revalidate_s, swr.stale_if_error_s) == (10, 60, 300)
    assert parse_cache_control("max-age=10, s-maxage=99").max_age_s == 99
    for value in (None, "", "public", "no-store, max-age=9", "private, max-age=9",
                  "no-cache, max-age=9", "max-age=abc"):  # fmt: skip
        assert not parse_cache_control(value).storable, value
