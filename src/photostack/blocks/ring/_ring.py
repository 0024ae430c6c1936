"""The consistent-hash ring: weighted virtual nodes, bisect lookups, moved ranges on change.

Two modes share one lookup structure (sorted cell starts + a parallel owner list, plus a bucket
table that answers most lookups without a bisect):

``hash="xxh3"`` (default)
    64-bit XXH3 points and **nearest-point** ownership: a key belongs to the
    vnode point closest to it on the circle (a Voronoi cell: half the gap before the point plus
    half the gap after), not to the next point clockwise. A cell is then the mean of two gaps
    instead of one, which divides the load variance by two at no lookup cost (the cell starts are
    precomputed midpoints). Adding a node still only takes keys (a new point can only become the
    closest one); removing a node only gives its keys away.

``hash="ketama"``
    libketama as uhashring 2.5 implements it: MD5, 4 points per digest, ``vnodes // 4`` digests
    per node scaled by ``weight * len(nodes) / sum(weights)``, a key owned by the first point
    strictly after its hash, point collisions won by the node added last. Same keys, same nodes
    (same insertion order), same answers as ``uhashring.HashRing(nodes, hash_fn="ketama")``.
"""

from __future__ import annotations

import itertools
import math
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, NamedTuple

import xxhash

from ._errors import (
    DuplicateNodeError,
    EmptyRingError,
    NotEnoughNodesError,
    RingConfigError,
    UnknownNodeError,
)
from ._hashing import (
    KETAMA_SPACE,
    XXH3_SPACE,
    ketama_key_hash,
    ketama_points,
    xxh3_key_hash,
    xxh3_points,
)

__all__ = ["DEFAULT_VNODES", "KETAMA_VNODES", "HashName", "HashRing", "MovedRange"]

_xxh3 = xxhash.xxh3_64_intdigest

HashName = Literal["xxh3", "ketama"]

# 4096 nearest-point vnodes: load std/mean about 1.1 % at 10 nodes (goal <= 2 %);
# ketama's 160 next-point vnodes give 6-8 %. See docs/partitioning.md for the measurements.
DEFAULT_VNODES = 4096
KETAMA_VNODES = 160  # 40 MD5 digests x 4 points, libketama's and uhashring's default

# Bucket table: 16-32 buckets per cell start, so ~95 % of lookups skip the bisect. One byte per
# bucket (a node index) keeps it in cache: 1 MiB at 10 nodes x 4096 vnodes, 4 MiB at most.
_BUCKETS_PER_POINT_LOG2 = 4
_MIN_BUCKET_BITS = 8
_MAX_BUCKET_BITS = 22


class MovedRange(NamedTuple):
    """Keys whose position ``p`` (see :meth:`HashRing.position`) has ``start <= p < end`` move.

    Ranges never wrap: ``end`` is at most :attr:`HashRing.space`. ``from_node`` is None when the
    ring was empty (the first node takes everything).
    """

    start: int
    end: int
    from_node: str | None
    to_node: str


class _Table:
    """An immutable lookup structure; swapped whole so a reader never sees half an update."""

    __slots__ = ("bounds", "cell_owners", "fast", "names", "owners", "shift")

    def __init__(self, bounds: list[int], owners: list[str], space_bits: int) -> None:
        self.bounds = bounds  # sorted cell starts
        self.owners = owners  # owners[bisect_right(bounds, h)]; len(bounds) + 1 entries
        self.cell_owners = owners[1:]  # owner of the cell starting at bounds[k]
        bits = len(bounds).bit_length() + _BUCKETS_PER_POINT_LOG2
        bits = max(_MIN_BUCKET_BITS, min(_MAX_BUCKET_BITS, bits, space_bits))
        self.shift = space_bits - bits
        distinct = list(dict.fromkeys(owners))
        # names[fast[b]]: the owner of bucket b, or None (the last entry) when it must bisect
        self.names: tuple[str | None, ...] = (*distinct, None)
        self.fast = _bucket_table(bounds, owners, distinct, bits, self.shift)


def _bucket_table(
    bounds: list[int], owners: list[str], distinct: list[str], bits: int, shift: int
) -> bytes | array[int]:
    """Bucket ``b`` covers positions ``[b << shift, (b + 1) << shift)``: the index in
    ``distinct`` of its owner when one owner holds the whole bucket, ``len(distinct)`` when a
    cell starts strictly inside it (the lookup bisects)."""
    size = 1 << bits
    miss = len(distinct)
    typecode = "B" if miss < 1 << 8 else "H" if miss < 1 << 16 else "L"
    fast = array(typecode, [miss]) * size
    if not bounds:
        return fast.tobytes()
    index = {name: i for i, name in enumerate(distinct)}
    width = 1 << shift
    edges = [0, *bounds, size << shift]
    for j in range(len(edges) - 1):  # positions in [edges[j], edges[j+1]) map to owners[j]
        first = -(-edges[j] // width)  # first bucket starting at or after edges[j]
        stop = edges[j + 1] >> shift  # buckets ending at or before edges[j+1]
        if stop > first:
            fast[first:stop] = array(typecode, [index[owners[j]]]) * (stop - first)
    return fast.tobytes() if typecode == "B" else fast


class HashRing:
    """A weighted consistent-hash ring of named nodes.

    ``nodes`` maps name -> weight (> 0); a node gets ``round(vnodes * weight)`` points (at least
    one). Lookups are pure and deterministic across processes. ``add``/``remove`` return the
    :class:`MovedRange` list a resharding job backfills. Not thread-safe for writers; readers
    always see a whole table.

    Raises RingConfigError for a bad vnode count, weight or hash name.
    """

    # The node that owns a key (raises EmptyRingError): a closure over the current table's arrays,
    # swapped whole on add/remove; a plain attribute so the hot path is one function call.
    node_for: Callable[[str | bytes], str]

    __slots__ = (
        "_ketama",
        "_key_hash",
        "_mode",
        "_points",
        "_space",
        "_table",
        "_vnodes",
        "_weights",
        "node_for",
    )

    def __init__(
        self,
        nodes: Mapping[str, float],
        *,
        vnodes: int | None = None,
        hash: HashName = "xxh3",  # shadows the builtin on purpose: the documented keyword
    ) -> None:
        if hash == "xxh3":
            self._key_hash: Callable[[str | bytes], int] = xxh3_key_hash
            self._space = XXH3_SPACE
            vnodes = DEFAULT_VNODES if vnodes is None else vnodes
        elif hash == "ketama":
            self._key_hash = ketama_key_hash
            self._space = KETAMA_SPACE
            vnodes = KETAMA_VNODES if vnodes is None else vnodes
            if vnodes % 4:
                raise RingConfigError(f"ketama vnodes must be a multiple of 4, got {vnodes}")
        else:
            raise RingConfigError(f"unknown hash {hash!r}; use 'xxh3' or 'ketama'")
        if vnodes < 1:
            raise RingConfigError(f"vnodes must be >= 1, got {vnodes}")
        self._mode: HashName = hash
        self._ketama = hash == "ketama"
        self._vnodes = vnodes
        self._weights: dict[str, float] = {}
        self._points: dict[str, list[int]] = {}  # xxh3 mode: a node's points, computed once
        for name, weight in nodes.items():
            self._weights[name] = _check_weight(name, weight)
        self._table = self._build()
        self.node_for = _make_lookup(self._table, ketama=self._ketama)

    # -- lookups -------------------------------------------------------------------------------

    def walk(self, key: str | bytes) -> Iterator[str]:
        """Every distinct node, clockwise from ``key``'s owner (which comes first).

        The preference list for replicas and bounded-load affinity. Raises EmptyRingError (at
        the call, not at the first ``next``).
        """
        table = self._table
        count = len(table.bounds)
        if count == 0:
            raise EmptyRingError("the ring has no node")
        start = (bisect_right(table.bounds, self._key_hash(key)) - 1) % count
        return _distinct(table.cell_owners, start, len(self._weights))

    def nodes_for(self, key: str | bytes, n: int) -> list[str]:
        """``n`` distinct nodes clockwise from ``key``'s owner: its replica set.

        Raises NotEnoughNodesError when the ring has fewer than ``n`` nodes, ValueError for
        ``n < 1``, EmptyRingError for an empty ring.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > len(self._weights):
            raise NotEnoughNodesError(f"asked for {n} nodes, the ring has {len(self._weights)}")
        return list(itertools.islice(self.walk(key), n))

    def position(self, key: str | bytes) -> int:
        """``key``'s position on the circle, ``0 <= position < space`` (what MovedRange bounds)."""
        return self._key_hash(key)

    # -- membership ----------------------------------------------------------------------------

    def add(self, name: str, weight: float = 1.0) -> list[MovedRange]:
        """Add a node; returns the ranges that move to it.

        Raises DuplicateNodeError, RingConfigError for a bad weight.
        """
        if name in self._weights:
            raise DuplicateNodeError(f"node {name!r} is already on the ring")
        self._weights[name] = _check_weight(name, weight)
        return self._rebuild()

    def remove(self, name: str) -> list[MovedRange]:
        """Remove a node; returns the ranges that leave it. Raises UnknownNodeError."""
        if name not in self._weights:
            raise UnknownNodeError(f"node {name!r} is not on the ring")
        del self._weights[name]
        self._points.pop(name, None)
        return self._rebuild()

    # -- introspection -------------------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, float]:
        """name -> weight, in insertion order (a copy)."""
        return dict(self._weights)

    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def hash_name(self) -> HashName:
        return self._mode

    @property
    def space(self) -> int:
        """The size of the circle: 2**64 (xxh3) or 2**32 (ketama)."""
        return self._space

    @property
    def point_count(self) -> int:
        return len(self._table.bounds)

    def shares(self) -> dict[str, float]:
        """The exact fraction of the circle each node owns (sums to 1.0; 0.0 for none)."""
        table = self._table
        out = dict.fromkeys(self._weights, 0.0)
        bounds = table.bounds
        for k, owner in enumerate(table.cell_owners):
            end = bounds[k + 1] if k + 1 < len(bounds) else bounds[0] + self._space
            out[owner] += (end - bounds[k]) / self._space
        return out

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def __repr__(self) -> str:
        return (
            f"HashRing(nodes={len(self._weights)}, vnodes={self._vnodes}, "
            f"hash={self._mode!r}, points={self.point_count})"
        )

    # -- building ------------------------------------------------------------------------------

    def _rebuild(self) -> list[MovedRange]:
        old = self._table
        self._table = new = self._build()
        self.node_for = _make_lookup(new, ketama=self._ketama)
        return _diff(old, new, self._space)

    def _build(self) -> _Table:
        if self._mode == "ketama":
            bounds, owners = self._ketama_cells()
            return _Table(bounds, owners, 32)
        bounds, owners = self._nearest_cells()
        return _Table(bounds, owners, 64)

    def _ketama_cells(self) -> tuple[list[int], list[str]]:
        if not self._weights:
            return [], []
        digests = self._vnodes // 4
        total = sum(self._weights.values())
        count = len(self._weights)
        owner_of: dict[int, str] = {}
        for name, weight in self._weights.items():  # later nodes win collisions, as in uhashring
            per_node = int((digests * count * weight) // total)
            for point in ketama_points(name, per_node):
                owner_of[point] = name
        points = sorted(owner_of)
        # a key hashing to h belongs to the first point > h (wrapping): bisect_right
        owners = [owner_of[p] for p in points]
        return points, [owners[0], *owners[1:], owners[0]]

    def _nearest_cells(self) -> tuple[list[int], list[str]]:
        placed: list[tuple[int, str]] = []
        for name, weight in self._weights.items():
            points = self._points.get(name)
            if points is None:
                count = max(1, round(self._vnodes * weight))
                points = self._points[name] = xxh3_points(name, count)
            placed.extend((p, name) for p in points)
        if not placed:
            return [], []
        placed.sort()  # equal points: the smaller name wins, whatever the insertion order
        unique = [placed[0]]
        for item in placed[1:]:
            if item[0] != unique[-1][0]:
                unique.append(item)
        space = self._space
        cells: list[tuple[int, str]] = []
        previous = unique[-1][0] - space
        for point, name in unique:  # the cell of a point starts halfway from the previous one
            cells.append(((previous + (point - previous + 1) // 2) % space, name))
            previous = point
        cells.sort()
        return [c[0] for c in cells], [cells[-1][1], *(c[1] for c in cells)]


def _make_lookup(table: _Table, *, ketama: bool) -> Callable[[str | bytes], str]:
    """The lookup closure over one table; everything it touches is a local (the hot path)."""
    if not table.bounds:

        def empty(key: str | bytes) -> str:
            raise EmptyRingError("the ring has no node")

        return empty
    fast, names, shift = table.fast, table.names, table.shift
    bounds, owners = table.bounds, table.owners
    if ketama:

        def ketama_node_for(
            key: str | bytes,
            _hash: Callable[[str | bytes], int] = ketama_key_hash,
            _bisect: Callable[[list[int], int], int] = bisect_right,
        ) -> str:
            h = _hash(key)
            owner = names[fast[h >> shift]]
            return owners[_bisect(bounds, h)] if owner is None else owner

        return ketama_node_for

    def node_for(
        key: str | bytes,
        _xxh3: Callable[[bytes], int] = _xxh3,
        _bisect: Callable[[list[int], int], int] = bisect_right,
    ) -> str:
        h = _xxh3(key.encode() if isinstance(key, str) else key)  # encode() is UTF-8
        owner = names[fast[h >> shift]]
        return owners[_bisect(bounds, h)] if owner is None else owner

    return node_for


def _check_weight(name: str, weight: float) -> float:
    if not isinstance(name, str) or not name:
        raise RingConfigError(f"node names must be non-empty strings, got {name!r}")
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        raise RingConfigError(f"weight of {name!r} must be a finite number > 0, got {weight!r}")
    return weight


def _distinct(cell_owners: list[str], start: int, total: int) -> Iterator[str]:
    seen: set[str] = set()
    for k in itertools.chain(range(start, len(cell_owners)), range(start)):
        owner = cell_owners[k]
        if owner not in seen:
            seen.add(owner)
            yield owner
            if len(seen) == total:
                return


def _owner_at(table: _Table, index: int) -> str | None:
    return table.owners[index] if table.bounds else None


def _diff(old: _Table, new: _Table, space: int) -> list[MovedRange]:
    """The position ranges whose owner differs between two tables, merged, never wrapping."""
    if not new.bounds:  # the last node left: nothing owns anything, nothing moves anywhere
        return []
    cuts = sorted({0, *old.bounds, *new.bounds})
    out: list[MovedRange] = []
    i = j = 0
    for index, start in enumerate(cuts):
        end = cuts[index + 1] if index + 1 < len(cuts) else space
        while i < len(old.bounds) and old.bounds[i] <= start:
            i += 1
        while j < len(new.bounds) and new.bounds[j] <= start:
            j += 1
        before, after = _owner_at(old, i), new.owners[j]
        if before == after:
            continue
        if out and out[-1].end == start and out[-1][2:] == (before, after):
            out[-1] = out[-1]._replace(end=end)
        else:
            out.append(MovedRange(start, end, before, after))
    return out
