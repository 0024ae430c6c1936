"""Toxics as values, and the pure arithmetic the proxy applies per chunk (no I/O, no clock).

A link carries data in two flows, named as Toxiproxy names them: ``upstream`` (client -> server)
and ``downstream`` (server -> client). A toxic applies to one flow or to both. Several toxics may
be active on one link; their effects combine (latencies add up, the lowest bandwidth wins, any
``down`` takes the link down).

Randomness (latency jitter) comes in as a callable returning a float in [0, 1); time comes in as
numbers. The asyncio adapter (``_proxy.py``) drives these with the event loop's clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from photostack.blocks.chaos._errors import ToxicConfigError, ToxicNotFound

__all__ = [
    "MAX_DELAY_MS",
    "Direction",
    "Flow",
    "LinkToxics",
    "OrderedDelay",
    "Pacer",
    "ResetBudget",
    "Toxic",
    "ToxicKind",
    "jittered_delay_s",
    "parse_toxic",
    "split_for_rate",
]

MAX_DELAY_MS = 600_000.0  # ten minutes: anything longer is a typo, and a stuck drill
_MAX_RATE_BYTES_PER_S = 10 * 1024**3
_SLICES_PER_S = 20  # bandwidth pacing granularity: a slice carries 50 ms worth of bytes


class Flow(StrEnum):
    """Which way data moves through the proxy."""

    UPSTREAM = "upstream"  # client -> server
    DOWNSTREAM = "downstream"  # server -> client


class Direction(StrEnum):
    """Which flows a toxic applies to."""

    UPSTREAM = "upstream"
    DOWNSTREAM = "downstream"
    BOTH = "both"

    def covers(self, flow: Flow) -> bool:
        return self is Direction.BOTH or self.value == flow.value


class ToxicKind(StrEnum):
    DOWN = "down"  # refuse new connections, close existing ones
    BLACKHOLE = "blackhole"  # accept and read, never forward: the peer times out
    LATENCY = "latency"  # delay every chunk by latency_ms +- jitter_ms
    BANDWIDTH = "bandwidth"  # cap throughput at rate_bytes_per_s
    RESET = "reset"  # RST (SO_LINGER 0) after after_bytes bytes, or at once
    SLOW_CLOSE = "slow_close"  # delay the FIN by delay_ms


# Each kind's attributes: name -> (default, low, high). None as default: required.
_ATTRIBUTES: dict[ToxicKind, dict[str, tuple[float | None, float, float]]] = {
    ToxicKind.DOWN: {},
    ToxicKind.BLACKHOLE: {},
    ToxicKind.LATENCY: {
        "latency_ms": (None, 0.0, MAX_DELAY_MS),
        "jitter_ms": (0.0, 0.0, MAX_DELAY_MS),
    },
    ToxicKind.BANDWIDTH: {"rate_bytes_per_s": (None, 1.0, float(_MAX_RATE_BYTES_PER_S))},
    ToxicKind.RESET: {"after_bytes": (0.0, 0.0, float(2**62))},
    ToxicKind.SLOW_CLOSE: {"delay_ms": (None, 0.0, MAX_DELAY_MS)},
}
# Kinds that act on the whole link, whatever the direction says.
_LINK_WIDE = {ToxicKind.DOWN}


@dataclass(frozen=True)
class Toxic:
    """One active toxic. ``attributes`` holds only the kind's own keys, with defaults applied."""

    id: str
    kind: ToxicKind
    direction: Direction
    attributes: Mapping[str, float] = field(default_factory=dict)

    def applies_to(self, flow: Flow) -> bool:
        return self.kind in _LINK_WIDE or self.direction.covers(flow)

    def attribute(self, name: str) -> float:
        return float(self.attributes[name])

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.kind.value,
            "direction": self.direction.value,
            "attributes": dict(self.attributes),
        }


def parse_toxic(body: Mapping[str, Any], toxic_id: str) -> Toxic:
    """A toxic from its JSON form ``{"type", "direction", "attributes"}``.

    ``direction`` defaults to ``both``; attributes missing from the body take their defaults.
    Raises ToxicConfigError on an unknown type, direction or attribute, or a value out of range.
    """
    if not isinstance(body, Mapping):
        raise ToxicConfigError("a toxic is a JSON object")
    unknown = sorted(set(body) - {"type", "direction", "attributes"})
    if unknown:
        raise ToxicConfigError(f"unknown toxic field {unknown[0]!r} (type, direction, attributes)")
    try:
        kind = ToxicKind(str(body.get("type")))
    except ValueError:
        known = ", ".join(k.value for k in ToxicKind)
        raise ToxicConfigError(
            f"unknown toxic type {body.get('type')!r} (known: {known})"
        ) from None
    try:
        direction = Direction(body.get("direction", "both"))
    except ValueError:
        raise ToxicConfigError(
            f"direction must be upstream, downstream or both, not {body.get('direction')!r}"
        ) from None
    raw = body.get("attributes", {})
    if not isinstance(raw, Mapping):
        raise ToxicConfigError("attributes must be a JSON object")
    schema = _ATTRIBUTES[kind]
    extra = sorted(set(raw) - set(schema))
    if extra:
        allowed = ", ".join(schema) or "none"
        raise ToxicConfigError(f"{kind.value} has no attribute {extra[0]!r} (allowed: {allowed})")
    attributes: dict[str, float] = {}
    for name, (default, low, high) in schema.items():
        value = raw.get(name, default)
        if value is None:
            raise ToxicConfigError(f"{kind.value} needs attribute {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ToxicConfigError(f"{kind.value}.{name} must be a number, not {value!r}")
        if not low <= value <= high:
            raise ToxicConfigError(f"{kind.value}.{name} = {value} is outside {low:g}..{high:g}")
        attributes[name] = float(value)
    return Toxic(toxic_id, kind, direction, attributes)


class LinkToxics:
    """The toxics active on one link, and what they mean for a flow right now."""

    def __init__(self) -> None:
        self._toxics: dict[str, Toxic] = {}
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<LinkToxics {[t.id for t in self._toxics.values()]}>"

    def __len__(self) -> int:
        return len(self._toxics)

    def add(self, body: Mapping[str, Any]) -> Toxic:
        """Parse and activate a toxic; its id is ``<type>-<n>``. Raises ToxicConfigError."""
        kind_hint = body.get("type") if isinstance(body, Mapping) else None
        toxic = parse_toxic(body, f"{kind_hint}-{next(self._ids)}")
        self._toxics[toxic.id] = toxic
        return toxic

    def remove(self, toxic_id: str) -> Toxic:
        """Deactivate a toxic. Raises ToxicNotFound."""
        try:
            return self._toxics.pop(toxic_id)
        except KeyError:
            raise ToxicNotFound(f"no toxic {toxic_id!r} on this link") from None

    def clear(self) -> list[Toxic]:
        removed = list(self._toxics.values())
        self._toxics.clear()
        return removed

    def active(self) -> tuple[Toxic, ...]:
        return tuple(self._toxics.values())

    def _of(self, kind: ToxicKind, flow: Flow | None = None) -> list[Toxic]:
        return [
            t
            for t in self._toxics.values()
            if t.kind is kind and (flow is None or t.applies_to(flow))
        ]

    @property
    def is_down(self) -> bool:
        return bool(self._of(ToxicKind.DOWN))

    def is_blackholed(self, flow: Flow) -> bool:
        return bool(self._of(ToxicKind.BLACKHOLE, flow))

    def latency_s(self, flow: Flow, rand: Callable[[], float]) -> float:
        """The delay for one chunk of ``flow``: the sum of every latency toxic's draw."""
        return sum(
            jittered_delay_s(t.attribute("latency_ms"), t.attribute("jitter_ms"), rand)
            for t in self._of(ToxicKind.LATENCY, flow)
        )

    def rate_bytes_per_s(self, flow: Flow) -> float | None:
        """The tightest bandwidth cap on ``flow``, or None when it is not capped."""
        rates = [t.attribute("rate_bytes_per_s") for t in self._of(ToxicKind.BANDWIDTH, flow)]
        return min(rates) if rates else None

    def resets(self, flow: Flow) -> list[Toxic]:
        return self._of(ToxicKind.RESET, flow)

    def resets_at_once(self) -> bool:
        """A reset toxic with ``after_bytes = 0``: every connection is reset as it comes."""
        return any(t.attribute("after_bytes") == 0 for t in self._of(ToxicKind.RESET))

    def close_delay_s(self, flow: Flow) -> float:
        """How long to hold back the FIN that ends ``flow`` (the longest slow-close)."""
        delays = [t.attribute("delay_ms") / 1000 for t in self._of(ToxicKind.SLOW_CLOSE, flow)]
        return max(delays, default=0.0)


def jittered_delay_s(latency_ms: float, jitter_ms: float, rand: Callable[[], float]) -> float:
    """``latency_ms`` plus a uniform draw in [-jitter_ms, +jitter_ms), never below zero."""
    if jitter_ms <= 0:
        return latency_ms / 1000
    offset = (2 * rand() - 1) * jitter_ms
    return max(0.0, latency_ms + offset) / 1000


class OrderedDelay:
    """Delivery times for delayed chunks of one flow that never reorder them.

    A chunk read at ``now`` with delay ``d`` is due at ``now + d``, but never before the chunk
    read before it (TCP is a byte stream: jitter stretches gaps, it cannot swap bytes).
    """

    def __init__(self) -> None:
        self._last_due = float("-inf")

    def due(self, now: float, delay_s: float) -> float:
        due = max(now + delay_s, self._last_due)
        self._last_due = due
        return due


class Pacer:
    """A bandwidth cap for one flow: when each slice may be written.

    ``start_at(now, nbytes, rate)`` returns the time the slice may go out; the flow's line is
    then busy for ``nbytes / rate`` seconds. Idle time is not saved up (no bursts after a pause).
    """

    def __init__(self) -> None:
        self._free_at = float("-inf")

    def start_at(self, now: float, nbytes: int, rate_bytes_per_s: float) -> float:
        start = max(now, self._free_at)
        self._free_at = start + nbytes / rate_bytes_per_s
        return start

    def reset(self) -> None:
        """The cap was lifted: forget the backlog."""
        self._free_at = float("-inf")


def split_for_rate(nbytes: int, rate_bytes_per_s: float) -> list[int]:
    """Slice sizes for ``nbytes`` under a cap, each at most 1/20 s worth (and at least 1 byte),
    so throughput is smooth instead of one long sleep per large read."""
    if nbytes <= 0:
        return []
    slice_bytes = max(1, int(rate_bytes_per_s / _SLICES_PER_S))
    full, rest = divmod(nbytes, slice_bytes)
    return [slice_bytes] * full + ([rest] if rest else [])


class ResetBudget:
    """Bytes a connection may still carry on a flow before a reset toxic fires."""

    def __init__(self, after_bytes: int) -> None:
        self.remaining = after_bytes

    def consume(self, nbytes: int) -> tuple[int, bool]:
        """(bytes to forward, whether to reset after them)."""
        if nbytes < self.remaining:
            self.remaining -= nbytes
            return nbytes, False
        forward = self.remaining
        self.remaining = 0
        return forward, True
