"""Shared media keys: the cleanup's pure decisions (delete / keep / restore) and the stores'
``ensure`` (rewrite a key where it is missing), docs/uploads.md "Shared files"."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.service._photos import PhotoStore, ReferencesUnknownError
from photostack.service._uploads import DirMediaStore, MemoryMediaStore, media_key
from photostack.service.tasks import decide_cleanup, decide_restore

KEYS = st.lists(st.sampled_from(["a.jpg", "b.jpg", "c.jpg", "d.jpg", ""]), max_size=6)


def test_shared_keys_are_kept_and_unshared_ones_deleted() -> None:
    decision = decide_cleanup(["orig.jpg", "thumb.jpg"], {"thumb.jpg", "other.jpg"})
    assert decision.delete == ("orig.jpg",)
    assert decision.keep == ("thumb.jpg",)
    assert decide_cleanup(["k", "k", ""], set()).delete == ("k",)  # once, never the empty key
    assert decide_cleanup([], {"k"}) == decide_cleanup([], set())


@given(KEYS, st.sets(st.sampled_from(["a.jpg", "b.jpg", "c.jpg", "x.jpg"])))
def test_a_referenced_key_is_never_deleted(keys: list[str], referenced: set[str]) -> None:
    decision = decide_cleanup(keys, referenced)
    assert not set(decision.delete) & referenced
    assert set(decision.delete) | set(decision.keep) == {k for k in keys if k}
    assert not set(decision.delete) & set(decision.keep)


def test_keys_referenced_again_after_the_delete_are_restored_or_reported_lost() -> None:
    verdict = decide_restore(["a", "b", "c"], referenced_now={"b", "c", "z"}, saved={"a", "b"})
    assert verdict.restore == ("b",)  # an identical upload committed meanwhile
    assert verdict.lost == ("c",)  # referenced, but its bytes were already gone
    assert decide_restore(["a"], set(), {"a"}).restore == ()


def test_memory_store_ensure_rewrites_only_a_missing_key() -> None:
    async def main() -> None:
        store = MemoryMediaStore()
        data = b"\xff\xd8\xff" + b"x" * 50
        stored = await store.put(data, "image/jpeg")
        assert await store.ensure(stored.key, data) is False
        await store.delete(stored.key)
        assert await store.ensure(stored.key, data) is True
        assert await store.get(stored.key) == data
        with pytest.raises(ValueError, match="do not hash"):
            await store.ensure(stored.key, data + b"!")

    asyncio.run(main())


def test_dir_store_ensure_writes_every_origin_that_lacks_the_file(tmp_path: Path) -> None:
    async def main() -> None:
        roots = [tmp_path / "o1", tmp_path / "o2"]
        store = DirMediaStore(roots, "http://static.test")
        data = b"\x89PNG\r\n\x1a\n" + b"y" * 64
        key = media_key(data, "image/png")
        assert key.startswith(hashlib.sha256(data).hexdigest())
        await store.put(data, "image/png")
        assert await store.ensure(key, data) is False
        (roots[1] / key).unlink()
        assert await store.ensure(key, data) is True
        assert [(r / key).read_bytes() for r in roots] == [data, data]
        with pytest.raises(ValueError, match="do not hash"):
            await store.ensure(key, b"other bytes")

    asyncio.run(main())


class _Shard:
    def __init__(self, originals: set[str], thumbnails: set[str], down: bool = False) -> None:
        self.columns = {"original_key": originals, "thumbnail_key": thumbnails}
        self.down = down
        self.queries: list[str] = []

    async def fetch(self, sql: str, keys: list[str]) -> list[dict[str, str]]:
        self.queries.append(sql)
        if self.down:
            raise OSError("shard down (injected)")
        column = "original_key" if "WHERE original_key" in sql else "thumbnail_key"
        return [{"key": k} for k in keys if k in self.columns[column]]


class _Router:
    def __init__(self, shards: list[_Shard]) -> None:
        self._shards = tuple(shards)

    def shards(self, group: str) -> tuple[_Shard, ...]:
        assert group == "photos"
        return self._shards


def test_references_are_gathered_from_every_shard_and_a_silent_shard_is_an_error() -> None:
    async def main() -> None:
        one, two = _Shard({"a"}, set()), _Shard(set(), {"b"})
        store = PhotoStore(_Router([one, two]), static_base_url="http://s")  # type: ignore[arg-type]
        assert await store.referenced_keys(["a", "b", "c", "a"]) == {"a", "b"}
        assert len(one.queries) == len(two.queries) == 2  # both columns, on every shard
        assert await store.referenced_keys([]) == frozenset()
        broken = PhotoStore(
            _Router([one, _Shard({"c"}, set(), down=True)]),  # type: ignore[arg-type]
            static_base_url="http://s",
        )
        with pytest.raises(ReferencesUnknownError, match="photos-1"):
            await broken.referenced_keys(["a"])  # never "not referenced" on a partial answer

    asyncio.run(main())
