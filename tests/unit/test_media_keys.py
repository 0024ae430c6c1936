"""Media keys, shard paths and content sniffing (pure)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.media import (
    InvalidKey,
    check_key,
    is_valid_key,
    key_of,
    shard_parts,
    sniff_content_type,
)


@given(st.binary(max_size=512))
def test_key_is_the_sha256_hex_and_always_valid(data: bytes) -> None:
    key = key_of(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert is_valid_key(key)
    first, second, name = shard_parts(key)
    assert (first, second, name) == (key[:2], key[2:4], key)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        "../" + "0" * 61,
        "0" * 62 + "/.",
        "0" * 63 + "\x00",
        "0" * 63 + "\n",
        " " + "0" * 63,
        "%2e%2e" + "0" * 58,
    ],
)
def test_anything_but_64_lowercase_hex_is_refused(text: str) -> None:
    assert not is_valid_key(text)
    with pytest.raises(InvalidKey):
        check_key(text)
    with pytest.raises(InvalidKey):
        shard_parts(text)


@given(st.text(max_size=80))
def test_a_valid_key_never_contains_a_path_separator_or_dot(text: str) -> None:
    if is_valid_key(text):
        assert "/" not in text
        assert "." not in text
        assert "\\" not in text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"GIF89a....", "image/gif"),
        (b"\x00\x00\x00\x1cftypavif", "image/avif"),
        (b"%PDF-1.7", "application/pdf"),
        (b"<html>", "application/octet-stream"),
        (b"", "application/octet-stream"),
        (b"RIFF\x10\x00\x00\x00WAVE", "application/octet-stream"),
    ],
)
def test_content_type_is_sniffed_from_magic_numbers(data: bytes, expected: str) -> None:
    assert sniff_content_type(data) == expected
