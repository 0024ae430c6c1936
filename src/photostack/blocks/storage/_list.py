"""List partitioning: an explicit value -> shard table (e.g. region -> shard)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ._errors import UnroutableKeyError

__all__ = ["ListPartitioner"]


class ListPartitioner:
    """The key is a value from a short known list (a region, a tenant tier, a country).

    Trade-off: placement is a human decision — data stays where a law or latency wants it
    (EU users on an EU shard) and a value can be moved alone — but nothing balances itself: one
    big value is one hot shard. An unknown value goes to ``default`` or raises
    UnroutableKeyError. Often the first level of a :class:`CompositePartitioner`.
    """

    __slots__ = ("_default", "_n", "_table")

    def __init__(
        self, assignments: Mapping[str, int], shard_count: int, *, default: int | None = None
    ) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {shard_count}")
        for value, shard in (*assignments.items(), ("<default>", default)):
            if shard is not None and not 0 <= shard < shard_count:
                raise ValueError(f"{value!r} -> shard {shard} is outside 0..{shard_count - 1}")
        self._table = MappingProxyType(dict(assignments))
        self._n = shard_count
        self._default = default

    @property
    def shard_count(self) -> int:
        return self._n

    @property
    def assignments(self) -> Mapping[str, int]:
        return self._table

    def shard_for(self, key: str | bytes) -> int:
        value = key.decode("utf-8") if isinstance(key, bytes) else key
        shard = self._table.get(value, self._default)
        if shard is None:
            raise UnroutableKeyError(f"no shard listed for {value!r} and no default")
        return shard

    def __repr__(self) -> str:
        return f"ListPartitioner({dict(self._table)!r}, shard_count={self._n})"
