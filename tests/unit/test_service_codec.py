from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.service._codec import (
    Cursor,
    InvalidCursorError,
    InvalidInputError,
    decode_cursor,
    encode_cursor,
    format_time,
    is_plausible_id,
    is_valid_username,
    new_id,
    parse_create_user,
)


def test_ids_are_16_chars_base32_and_time_ordered() -> None:
    a = new_id(now_ms=1_700_000_000_000, random_bits=0xFFFFFFFF)
    b = new_id(now_ms=1_700_000_000_001, random_bits=0)
    assert re.fullmatch(r"[0-9a-z]{16}", a)
    assert a < b
    assert new_id() != new_id()
    assert is_plausible_id(new_id())


@pytest.mark.parametrize("value", ["", "a/b", "x" * 65, "a b", "é"])
def test_implausible_ids(value: str) -> None:
    assert not is_plausible_id(value)


def test_format_time_is_rfc3339_utc() -> None:
    local = datetime(2026, 11, 28, 1, 5, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(local) == "2026-11-27T23:05:00.123456Z"


_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@given(_datetimes, _ids)
def test_cursor_round_trip(created_at: datetime, ident: str) -> None:
    cursor = Cursor(created_at, ident)
    text = encode_cursor(cursor)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text)
    assert decode_cursor(text) == cursor


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!",
        "bm90LWEtY3Vyc29y",  # "not-a-cursor"
        "MTIzNA",  # "1234": no id
        "YWJjLnVzZXI",  # "abc.user": time not a number
        "MTIzLmEvYg",  # "123.a/b": id with a slash
        "A" * 200,
        "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OS5h",  # time out of range
    ],
)
def test_bad_cursors_are_rejected(text: str) -> None:
    with pytest.raises(InvalidCursorError):
        decode_cursor(text)


@pytest.mark.parametrize("name", ["abc", "a_b_9", "x" * 32, "___"])
def test_valid_usernames(name: str) -> None:
    assert is_valid_username(name)
    assert parse_create_user({"username": name}).username == name


@pytest.mark.parametrize("name", ["ab", "x" * 33, "Abc", "a-b", "a b", "ä" * 4, "abc\n"])
def test_invalid_usernames(name: str) -> None:
    assert not is_valid_username(name)
    with pytest.raises(InvalidInputError) as info:
        parse_create_user({"username": name})
    assert (info.value.status, info.value.code) == (422, "invalid_username")


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({}, 422, "invalid_username"),
        ({"username": 123}, 422, "invalid_username"),
        ({"username": None}, 422, "invalid_username"),
        ({"username": "abc", "display_name": "x" * 65}, 422, "invalid_display_name"),
        ({"username": "abc", "display_name": 5}, 422, "invalid_display_name"),
        ([], 400, "malformed_body"),
        ("abc", 400, "malformed_body"),
        (None, 400, "malformed_body"),
    ],
)
def test_invalid_create_user_bodies(payload: object, status: int, code: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_create_user(payload)
    assert (info.value.status, info.value.code) == (status, code)


def test_display_name_optional_and_bounded() -> None:
    assert parse_create_user({"username": "abc"}).display_name is None
    assert parse_create_user({"username": "abc", "display_name": None}).display_name is None
    assert parse_create_user({"username": "abc", "display_name": "é" * 64}).display_name == "é" * 64
    assert parse_create_user({"username": "abc", "extra": 1}).username == "abc"
