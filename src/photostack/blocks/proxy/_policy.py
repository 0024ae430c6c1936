"""Pure decisions of the proxy features: filter rules, gzip negotiation, Cache-Control.

No I/O and no clock here: callers pass ``now`` where time matters.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from photostack.blocks.proxy._config import CacheConfig, FilterRules, GzipConfig, HeaderRules

__all__ = [
    "CacheDirectives",
    "Refusal",
    "accepts_gzip",
    "apply_header_rules",
    "apply_request_rules",
    "cache_directives",
    "check_filter",
    "compress",
    "freshness_s",
    "header_value",
    "is_compressible",
    "is_compressible_type",
    "is_shareable",
    "stale_window_s",
]

_COMPRESSIBLE_PREFIXES = ("text/",)
_COMPRESSIBLE_TYPES = frozenset(
    {
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
        "application/x-ndjson",
        "image/svg+xml",
    }
)
# Statuses a shared cache may keep without explicit permission beyond max-age (RFC 9111 §3).
_CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


def check_filter(rules: FilterRules, method: str, path: str) -> Refusal | None:
    """Why the edge refuses ``method path`` itself, or None to pass it on."""
    if (rules.allow_methods and method not in rules.allow_methods) or (
        method in rules.deny_methods
    ):
        return Refusal(405, "method_not_allowed", f"method {method} is not allowed here")
    if any(_under(path, prefix) for prefix in rules.deny_paths) or (
        rules.allow_paths and not any(_under(path, prefix) for prefix in rules.allow_paths)
    ):
        return Refusal(403, "forbidden_path", "this path is not served")
    return None


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of ``name`` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def apply_header_rules(
    headers: list[tuple[str, str]],
    add: Sequence[tuple[str, str]],
    remove: frozenset[str],
) -> list[tuple[str, str]]:
    """``headers`` without the removed names, with ``add`` set (replacing same-named ones)."""
    if not add and not remove:
        return headers
    drop = remove | {name.lower() for name, _ in add}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend(add)
    return out


def apply_request_rules(
    headers: list[tuple[str, str]], rules: HeaderRules
) -> list[tuple[str, str]]:
    return apply_header_rules(headers, rules.request_add, rules.request_remove)


# -- gzip ---------------------------------------------------------------------------------------


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (q-values honoured; ``*`` counts)."""
    if not accept_encoding:
        return False
    gzip_q: float | None = None
    star_q: float | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            gzip_q = q if gzip_q is None else max(gzip_q, q)
        elif coding == "*":
            star_q = q
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


def is_compressible(
    status: int, headers: Sequence[tuple[str, str]], body_len: int, config: GzipConfig
) -> bool:
    """Whether a response may be gzipped: right type and size, not already encoded."""
    if status < 200 or status in (204, 206, 304) or body_len < config.min_bytes:
        return False
    if body_len > config.max_buffer_bytes:
        return False
    content_type: str | None = None
    for key, value in headers:
        lowered = key.lower()
        if lowered == "content-encoding" and value.strip().lower() not in ("", "identity"):
            return False
        if lowered == "cache-control" and "no-transform" in value.lower():
            return False
        if lowered == "content-type":
            content_type = value
    return is_compressible_type(content_type)


def is_compressible_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media in _COMPRESSIBLE_TYPES or media.startswith(_COMPRESSIBLE_PREFIXES)


def compress(body: bytes, level: int) -> bytes:
    """gzip framing (not bare zlib), as ``Content-Encoding: gzip`` requires."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


# -- caching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheDirectives:
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    max_age_s: float | None = None
    s_maxage_s: float | None = None
    stale_if_error_s: float | None = None


def cache_directives(value: str | None) -> CacheDirectives:
    """Parse a Cache-Control header value (unknown directives are ignored)."""
    if not value:
        return CacheDirectives()
    flags: dict[str, bool] = {}
    numbers: dict[str, float] = {}
    for item in value.split(","):
        name, _, arg = item.strip().partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if arg:
            try:
                numbers[name] = max(0.0, float(arg.strip().strip('"')))
            except ValueError:
                # private="Set-Cookie" and friends: a qualified private is still private
                flags[name] = True
        else:
            flags[name] = True
    return CacheDirectives(
        no_store=flags.get("no-store", False),
        no_cache=flags.get("no-cache", False),
        private=flags.get("private", False),
        public=flags.get("public", False),
        max_age_s=numbers.get("max-age"),
        s_maxage_s=numbers.get("s-maxage"),
        stale_if_error_s=numbers.get("stale-if-error"),
    )


def is_shareable(headers: Sequence[tuple[str, str]]) -> bool:
    """Whether one response may be handed to several clients whose requests had the same key.

    Never a response that sets a cookie (it would hand one client's session to another), and
    never one marked ``no-store``; ``private`` is fine because the collapse key includes the
    request's credentials (Authorization and Cookie).
    """
    for key, value in headers:
        lowered = key.lower()
        if lowered == "set-cookie":
            return False
        if lowered == "cache-control" and cache_directives(value).no_store:
            return False
    return True


def freshness_s(  # noqa: PLR0911 - one early answer per rule of RFC 9111
    status: int,
    headers: Sequence[tuple[str, str]],
    config: CacheConfig,
    *,
    request_has_credentials: bool,
) -> float:
    """How long the micro-cache may serve this response fresh; 0 means do not store it.

    Only responses that explicitly allow shared caching are stored: ``s-maxage`` or
    ``max-age`` > 0, no ``no-store``/``no-cache``/``private``, no Set-Cookie, no Vary other
    than Accept-Encoding. A request with Authorization is stored only with ``public`` or
    ``s-maxage`` (RFC 9111 §3.5). The result is capped at ``config.max_ttl_s``.
    """
    if status not in _CACHEABLE_STATUSES:
        return 0.0
    directives = CacheDirectives()
    for key, value in headers:
        lowered = key.lower()
        if lowered == "set-cookie":
            return 0.0
        if lowered == "vary":
            varies = {v.strip().lower() for v in value.split(",")} - {"accept-encoding", ""}
            if varies:
                return 0.0
        if lowered == "cache-control":
            directives = cache_directives(value)
    if directives.no_store or directives.no_cache or directives.private:
        return 0.0
    if request_has_credentials and not (directives.public or directives.s_maxage_s is not None):
        return 0.0
    lifetime = directives.s_maxage_s if directives.s_maxage_s is not None else directives.max_age_s
    if lifetime is None or lifetime <= 0:
        return 0.0
    return min(lifetime, config.max_ttl_s)


def stale_window_s(headers: Sequence[tuple[str, str]], config: CacheConfig) -> float:
    """How long past freshness a stored response may be served when the upstream fails."""
    value = header_value(headers, "cache-control")
    directive = cache_directives(value).stale_if_error_s
    return directive if directive is not None else config.stale_if_error_s
