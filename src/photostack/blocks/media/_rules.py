"""HTTP rules shared by the origin and the CDN edge (pure: strings and numbers in, decisions out).

- ``parse_range``: one ``Range: bytes=...`` header against a size (RFC 9110 §14). A single
  satisfiable range is a 206; a header whose every range is unsatisfiable is a 416; several
  ranges are answered **200 with the whole body** (allowed by RFC 9110 §14.2: a server may
  ignore Range), and so is a header we cannot parse.
- ``select``: what to answer for a GET/HEAD of a stored object given the request's
  conditional headers (If-None-Match → 304, If-Range, Range).
- ``parse_cache_control`` / ``Freshness``: how long a CDN may keep a response fresh, serve it
  stale while revalidating, or serve it stale when the origins fail.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "IMMUTABLE_CACHE_CONTROL",
    "ByteRange",
    "Freshness",
    "RangeVerdict",
    "Selection",
    "etag_matches",
    "parse_cache_control",
    "parse_range",
    "quote_etag",
    "select",
]

IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"
_MAX_RANGES = 16


class RangeVerdict(enum.Enum):
    WHOLE = "whole"  # no usable Range: answer 200 with the whole body
    PARTIAL = "partial"  # one satisfiable range: 206
    UNSATISFIABLE = "unsatisfiable"  # 416


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Inclusive byte positions, as in Content-Range."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(  # noqa: PLR0911, PLR0912 - one early answer per rule of RFC 9110 §14
    header: str, size: int
) -> tuple[RangeVerdict, ByteRange | None]:
    """The verdict for ``Range: header`` on a body of ``size`` bytes (and the range for 206)."""
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return RangeVerdict.WHOLE, None
    parts = [p.strip() for p in spec.split(",")]
    if not parts or len(parts) > _MAX_RANGES or any(not p for p in parts):
        return RangeVerdict.WHOLE, None
    satisfiable: list[ByteRange] = []
    for part in parts:
        first, dash, last = part.partition("-")
        if not dash:
            return RangeVerdict.WHOLE, None
        first, last = first.strip(), last.strip()
        if first:
            if not first.isdigit() or (last and not last.isdigit()):
                return RangeVerdict.WHOLE, None
            start = int(first)
            end = size - 1 if not last else min(int(last), size - 1)
            if last and int(last) < start:
                return RangeVerdict.WHOLE, None  # invalid syntax: ignore the header
            if start < size:
                satisfiable.append(ByteRange(start, end))
        else:
            if not last.isdigit():
                return RangeVerdict.WHOLE, None
            suffix = int(last)
            if suffix > 0 and size > 0:
                satisfiable.append(ByteRange(max(0, size - suffix), size - 1))
    if not satisfiable:
        return RangeVerdict.UNSATISFIABLE, None
    if len(parts) > 1:
        return RangeVerdict.WHOLE, None  # multi-range: 200 whole (documented)
    return RangeVerdict.PARTIAL, satisfiable[0]


def quote_etag(key: str) -> str:
    return f'"{key}"'


def etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: ``W/"x"`` matches ``"x"``; ``*`` matches all."""
    value = if_none_match.strip()
    if value == "*":
        return True
    for candidate in value.split(","):
        tag = candidate.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Selection:
    """What to send for a stored object: a status and, for 206, the range."""

    status: int  # 200, 206, 304 or 416
    byte_range: ByteRange | None = None


_WHOLE = Selection(200)
_NOT_MODIFIED = Selection(304)
_UNSATISFIABLE = Selection(416)


def select(method: str, headers: Mapping[str, str], etag: str, size: int) -> Selection:
    """The answer to a GET or HEAD given lowercased request ``headers``.

    If-None-Match wins over Range (RFC 9110 §13.2.2); Range applies to GET only, and only when
    If-Range (if any) names the current strong ETag.
    """
    inm = headers.get("if-none-match")
    if inm is not None and etag_matches(inm, etag):
        return _NOT_MODIFIED
    header = headers.get("range")
    if header is None or method != "GET":
        return _WHOLE
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return _WHOLE
    verdict, byte_range = parse_range(header, size)
    if verdict is RangeVerdict.PARTIAL:
        return Selection(206, byte_range)
    if verdict is RangeVerdict.UNSATISFIABLE:
        return _UNSATISFIABLE
    return _WHOLE


@dataclass(frozen=True, slots=True)
class Freshness:
    """A response's caching terms for a shared cache, in seconds."""

    storable: bool
    max_age_s: float = 0.0
    stale_while_revalidate_s: float = 0.0
    stale_if_error_s: float = 0.0
    immutable: bool = False


_NOT_STORABLE = Freshness(storable=False)


def parse_cache_control(value: str | None) -> Freshness:
    """The terms of a ``Cache-Control`` response header for a shared cache.

    Storable only with an explicit ``s-maxage`` or ``max-age`` and none of ``no-store``,
    ``no-cache``, ``private``; ``s-maxage`` wins over ``max-age``.
    """
    if not value:
        return _NOT_STORABLE
    directives: dict[str, str] = {}
    for item in value.split(","):
        name, _, arg = item.strip().partition("=")
        directives[name.strip().lower()] = arg.strip().strip('"')
    if {"no-store", "no-cache", "private"} & directives.keys():
        return _NOT_STORABLE
    age = _seconds(directives.get("s-maxage"))
    if age is None:
        age = _seconds(directives.get("max-age"))
    if age is None:
        return _NOT_STORABLE
    return Freshness(
        storable=True,
        max_age_s=age,
        stale_while_revalidate_s=_seconds(directives.get("stale-while-revalidate")) or 0.0,
        stale_if_error_s=_seconds(directives.get("stale-if-error")) or 0.0,
        immutable="immutable" in directives,
    )


def _seconds(text: str | None) -> float | None:
    if text is None or not text.isdigit():
        return None
    return float(int(text))
