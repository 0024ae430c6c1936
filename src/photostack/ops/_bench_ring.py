"""Suite ``ring``: consistent-hash lookups/s, load skew and keys moved, against uhashring.

Anchor measured in the same run, same process, same keys and node names: uhashring 2.5's ketama
ring (the de-facto Python implementation). Compared: our ring (xxh3, nearest-point vnodes, the
default), our ketama mode (uhashring's exact mapping), jump hash and weighted rendezvous.

Skew is std/mean of per-node load. For rings it is computed exactly from the arcs each node owns
(no sampling noise); for jump and rendezvous, which have no arcs, from key counts (whose noise
floor, sqrt(nodes / keys), is printed beside them).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uhashring import HashRing as UHashRing

from photostack.blocks.ring import HashRing, JumpHash, RendezvousHash, load_skew
from photostack.blocks.storage import HashModPartitioner
from photostack.ops._bench_report import Paragraph, Section, Table
from photostack.ops.benchsuite import Out, SuiteOptions, SuiteResult

__all__ = [
    "LookupRate",
    "lookup_rates",
    "moved_fractions",
    "run_ring_suite",
    "skew_table",
    "uhashring_shares",
]

Lookup = Callable[[str], object]
NODE_COUNTS = (3, 10, 50)
LOOKUP_KEYS = 20_000
LOOKUP_ROUNDS = 9
SKEW_KEYS = 100_000
ANCHOR = "uhashring (ketama)"


def node_names(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def keys(count: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}:{i:08d}" for i in range(count)]


def _lookups(nodes: list[str]) -> dict[str, Lookup]:
    """Every implementation's key -> node function over the same nodes."""
    weights = dict.fromkeys(nodes, 1.0)
    return {
        ANCHOR: UHashRing(nodes=nodes, hash_fn="ketama").get_node,
        "photostack ring (xxh3)": HashRing(weights).node_for,
        "photostack ring (ketama mode)": HashRing(weights, hash="ketama").node_for,
        "jump hash": JumpHash(nodes).node_for,
        "rendezvous (HRW)": RendezvousHash(weights).node_for,
    }


@dataclass(frozen=True)
class LookupRate:
    name: str
    nodes: int
    per_s: float
    vs_anchor: float


def lookup_rates(
    node_counts: Sequence[int] = NODE_COUNTS,
    key_count: int = LOOKUP_KEYS,
    rounds: int = LOOKUP_ROUNDS,
) -> list[LookupRate]:
    """Lookups/s of each implementation, best of ``rounds`` interleaved passes over the same keys
    (interleaving spreads a noisy neighbour's effect over every contender alike)."""
    out: list[LookupRate] = []
    sample = keys(key_count, "k")
    for n in node_counts:
        contenders = _lookups(node_names(n))
        best = dict.fromkeys(contenders, math.inf)
        for _ in range(rounds):
            for name, lookup in contenders.items():
                start = time.perf_counter()
                for key in sample:
                    lookup(key)
                best[name] = min(best[name], time.perf_counter() - start)
        anchor = best[ANCHOR]
        out.extend(
            LookupRate(name, n, key_count / seconds, anchor / seconds)
            for name, seconds in best.items()
        )
    return out


def uhashring_shares(ring: UHashRing) -> dict[str, float]:
    """Exact arc share per node of a uhashring ring (a key goes to the first point above it)."""
    points = ring.get_points()  # sorted (position, node)
    space = 1 << 32
    shares: Counter[str] = Counter()
    for i, (position, node) in enumerate(points):
        previous = points[i - 1][0] - (space if i == 0 else 0)
        shares[node] += (position - previous) / space
    return dict(shares)


def skew_table(
    node_counts: Sequence[int] = NODE_COUNTS, key_count: int = SKEW_KEYS
) -> dict[tuple[str, int], float]:
    """(implementation, nodes) -> load std/mean (exact arcs for rings, key counts otherwise)."""
    out: dict[tuple[str, int], float] = {}
    sample = keys(key_count)
    for n in node_counts:
        nodes = node_names(n)
        weights = dict.fromkeys(nodes, 1.0)
        out[ANCHOR, n] = load_skew(
            uhashring_shares(UHashRing(nodes=nodes, hash_fn="ketama")).values()
        )
        out["photostack ring (xxh3)", n] = load_skew(HashRing(weights).shares().values())
        out["photostack ring (ketama mode)", n] = load_skew(
            HashRing(weights, hash="ketama").shares().values()
        )
        for name, lookup in (
            ("jump hash", JumpHash(nodes).node_for),
            ("rendezvous (HRW)", RendezvousHash(weights).node_for),
        ):
            counts = Counter(lookup(k) for k in sample)
            out[name, n] = load_skew(counts.get(node, 0) for node in nodes)
    return out


def moved_fractions(key_count: int = SKEW_KEYS, before: int = 10) -> dict[str, float]:
    """Fraction of keys whose node changes when ``before`` nodes become ``before + 1``."""
    sample = keys(key_count)
    nodes, new = node_names(before), f"node-{before}"
    weights = dict.fromkeys(nodes, 1.0)
    pairs: dict[str, tuple[Lookup, Lookup]] = {}
    uh_old, uh_new = (
        UHashRing(nodes=nodes, hash_fn="ketama"),
        UHashRing(nodes=nodes, hash_fn="ketama"),
    )
    uh_new.add_node(new)
    pairs[ANCHOR] = (uh_old.get_node, uh_new.get_node)
    for name, mode in (
        ("photostack ring (xxh3)", "xxh3"),
        ("photostack ring (ketama mode)", "ketama"),
    ):
        old, grown = HashRing(weights, hash=mode), HashRing(weights, hash=mode)  # type: ignore[arg-type]
        grown.add(new)
        pairs[name] = (old.node_for, grown.node_for)
    jump_old, jump_new = JumpHash(nodes), JumpHash(nodes)
    jump_new.add(new)
    pairs["jump hash"] = (jump_old.node_for, jump_new.node_for)
    hrw_old, hrw_new = RendezvousHash(weights), RendezvousHash(weights)
    hrw_new.add(new)
    pairs["rendezvous (HRW)"] = (hrw_old.node_for, hrw_new.node_for)
    mod_old, mod_new = HashModPartitioner(before), HashModPartitioner(before + 1)
    pairs["hash mod n (contrast)"] = (mod_old.shard_for, mod_new.shard_for)
    return {name: sum(a(k) != b(k) for k in sample) / key_count for name, (a, b) in pairs.items()}


def _pct(value: float) -> str:
    return f"{value * 100:.2f} %"


def run_ring_suite(options: SuiteOptions, out: Out) -> SuiteResult:
    """Pure CPU, one process: no cluster needed (``options`` do not apply)."""
    out("ring: lookups/s (interleaved best-of rounds)")
    rates = lookup_rates()
    out("ring: load skew")
    skews = skew_table()
    out("ring: keys moved 10 -> 11 nodes")
    moved = moved_fractions()
    names = list(dict.fromkeys(r.name for r in rates))
    rate_of = {(r.name, r.nodes): r for r in rates}
    lookup_rows = tuple(
        (name, *(f"{rate_of[name, n].per_s:,.0f} ({rate_of[name, n].vs_anchor:.2f}x)"
                 for n in NODE_COUNTS))
        for name in names
    )  # fmt: skip
    skew_rows = tuple(
        (name, *(_pct(skews[name, n]) for n in NODE_COUNTS),
         "exact arcs" if "ring" in name or name == ANCHOR else f"{SKEW_KEYS:,} keys")
        for name in names
    )  # fmt: skip
    noise = ", ".join(f"{_pct(math.sqrt(n / SKEW_KEYS))} at {n}" for n in NODE_COUNTS)
    ideal = 1 / 11
    moved_rows = tuple(
        (name, _pct(fraction), f"{fraction / ideal:.3f}") for name, fraction in moved.items()
    )
    ten = {name: rate_of[name, 10] for name in names}
    ours = ten["photostack ring (xxh3)"]
    sections = (
        Section(
            "Consistent hashing: lookups/s",
            (
                Paragraph(
                    f"One process, the same {LOOKUP_KEYS:,} keys and the same node names for "
                    f"every implementation; best of {LOOKUP_ROUNDS} interleaved passes. In "
                    f"brackets: x the anchor, {ANCHOR}. Goal: ≥ 4x at 10 nodes — measured "
                    f"{ours.vs_anchor:.2f}x."
                ),
                Table(("implementation", *(f"{n} nodes" for n in NODE_COUNTS)), lookup_rows),
            ),
        ),
        Section(
            "Consistent hashing: load skew (std/mean of per-node load)",
            (
                Paragraph(
                    "Rings: exact share of the hash circle each node owns. Jump and rendezvous "
                    f"have no arcs: key counts, whose sampling noise alone is about {noise}. "
                    "Our ring: 4096 vnodes, nearest-point ownership; ketama: 160 points. "
                    f"Goal: ≤ 2 % at 10 nodes — measured "
                    f"{_pct(skews['photostack ring (xxh3)', 10])}."
                ),
                Table(
                    ("implementation", *(f"{n} nodes" for n in NODE_COUNTS), "measured on"),
                    skew_rows,
                ),
            ),
        ),
        Section(
            "Consistent hashing: keys moved when 10 nodes become 11",
            (
                Paragraph(
                    f"Fraction of {SKEW_KEYS:,} keys whose node changes; the ideal is 1/11 = "
                    f"{_pct(ideal)} (only the new node's share moves)."
                ),
                Table(("implementation", "moved", "÷ ideal"), moved_rows),
            ),
        ),
    )
    figures = {
        "lookups_per_s": {f"{r.name}@{r.nodes}": round(r.per_s) for r in rates},
        "lookup_ratio_vs_uhashring_10_nodes": round(ours.vs_anchor, 3),
        "skew": {f"{name}@{n}": round(v, 5) for (name, n), v in skews.items()},
        "moved_10_to_11": {name: round(v, 5) for name, v in moved.items()},
    }
    return SuiteResult(sections, figures)
