"""The CDN disk tier's pure index: LRU by bytes, named victims, per-entry limit; file names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.media import DiskIndex, DiskTierConfig
from photostack.blocks.media import disk_file_name as file_name


def test_least_recently_used_files_are_evicted_first() -> None:
    index = DiskIndex(max_bytes=100, max_entry_bytes=60)
    assert index.add("a", 40) == []
    assert index.add("b", 40) == []
    assert index.touch("a")  # a is now the most recent
    assert index.add("c", 30) == ["b"]
    assert ("a" in index, "b" in index, "c" in index) == (True, False, True)
    assert (index.bytes_used, index.evictions) == (70, 1)
    assert index.add("a", 60) == []  # a rewrite replaces its own size first: 30 + 60
    assert (len(index), index.bytes_used) == (2, 90)
    assert index.add("d", 20) == ["c"]  # c is now the least recently used
    assert index.remove("a")
    assert not index.remove("a")
    assert not index.touch("a")
    assert (len(index), index.bytes_used) == (1, 20)


def test_an_entry_over_the_limit_is_refused_and_the_limit_is_within_the_bound() -> None:
    index = DiskIndex(max_bytes=100, max_entry_bytes=500)
    assert index.max_entry_bytes == 100
    assert not index.fits(101)
    with pytest.raises(ValueError, match="max_entry_bytes"):
        index.add("big", 101)
    with pytest.raises(ValueError, match="at least 1"):
        DiskTierConfig(root=Path("x"), max_bytes=0)


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 30)), max_size=60))
def test_the_byte_bound_always_holds(ops: list[tuple[str, int]]) -> None:
    index = DiskIndex(max_bytes=64, max_entry_bytes=30)
    live: dict[str, int] = {}
    for name, size in ops:
        for victim in index.add(name, size):
            live.pop(victim)
        live[name] = size
        assert index.bytes_used == sum(live.values()) <= 64
        assert all(n in index for n in live)


def test_file_names_are_the_hash_of_the_key_never_the_key() -> None:
    assert file_name("../../etc/passwd") == file_name("../../etc/passwd")
    name = file_name("../../etc/passwd")
    assert len(name) == 64
    assert set(name) <= set("0123456789abcdef")
    assert file_name("a") != file_name("b")
