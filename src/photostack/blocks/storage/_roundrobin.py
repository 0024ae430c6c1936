"""Round-robin partitioning for append-only data, the shard carried inside the key."""

from __future__ import annotations

from ._errors import UnroutableKeyError

__all__ = ["RoundRobinPartitioner"]

_SEPARATOR = "."


class RoundRobinPartitioner:
    """Append number ``seq`` goes to shard ``seq % shard_count``; its key is ``"{shard}.{seq}"``.

    Trade-off: writes spread perfectly and growing the shard count moves nothing (old keys keep
    the shard they name; new appends use every shard) — but a row can be found again only
    because its key names its shard: :meth:`key_for` makes that key at write time and
    :meth:`shard_for` reads it back. A natural key (a user id) is no help; such reads need a
    secondary lookup (a directory or an index table), and scans read every shard. Fits logs,
    events, audit trails, feed fan-out rows.
    """

    __slots__ = ("_n",)

    def __init__(self, shard_count: int) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {shard_count}")
        self._n = shard_count

    @property
    def shard_count(self) -> int:
        return self._n

    def assign(self, sequence: int) -> int:
        """The shard of the ``sequence``-th append (``sequence >= 0``)."""
        if sequence < 0:
            raise ValueError(f"sequence must be >= 0, got {sequence}")
        return sequence % self._n

    def key_for(self, sequence: int) -> str:
        """The key to store the ``sequence``-th append under: it names its shard."""
        return f"{self.assign(sequence)}{_SEPARATOR}{sequence}"

    def shard_for(self, key: str | bytes) -> int:
        """The shard a :meth:`key_for` key names (made under this or a smaller shard count).

        Raises UnroutableKeyError for a key without a valid shard tag.
        """
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        tag, sep, _ = text.partition(_SEPARATOR)
        if not sep or not tag.isdigit() or not tag.isascii() or int(tag) >= self._n:
            raise UnroutableKeyError(f"{text!r} does not name a shard of 0..{self._n - 1}")
        return int(tag)

    def __repr__(self) -> str:
        return f"RoundRobinPartitioner(shard_count={self._n})"
