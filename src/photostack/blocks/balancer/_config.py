"""The tunables of one upstream group, and their plain-settings form (topology, CLI, admin).

``ClientConfig`` is the frozen object the core runs on. ``parse_settings`` builds one from a
flat mapping of documented keys (docs/balancing.md) and refuses unknown keys and bad values with
one-line ``BalancerConfigError`` messages, so the topology file, the sidecar's flags and the
admin endpoint all validate the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from photostack.blocks.balancer._budget import RetryBudgetConfig
from photostack.blocks.balancer._errors import BalancerConfigError
from photostack.blocks.balancer._health import ActiveCheckConfig, HealthConfig
from photostack.blocks.balancer._slowstart import SlowStart
from photostack.blocks.balancer._strategy import StrategyName

__all__ = ["SETTINGS_KEYS", "ClientConfig", "KeyFn", "key_function", "parse_settings"]

KeyFn = Callable[[str, Sequence[tuple[str, str]]], "bytes | None"]


@dataclass(frozen=True)
class ClientConfig:
    """Tunables of one upstream group (timeouts in seconds of wall time)."""

    request_timeout_s: float = 30.0  # total: first try to response head, retries included
    try_timeout_s: float | None = None  # per try (connect + response head); None: the total
    connect_timeout_s: float = 2.0  # per connect attempt, within the try deadline
    idle_timeout_s: float = 4.0  # drop pooled connections idle longer (below uvicorn's 5 s)
    max_connections_per_backend: int = 64
    max_tries: int = 3  # cap on tries per request; also never more than the backend count
    health: HealthConfig = field(default_factory=HealthConfig)
    strategy: StrategyName = StrategyName.ROUND_ROBIN
    hash_key: str = "path:2"  # "header:NAME", "path:N" (0-based segment) or "path"
    hash_epsilon: float = 0.25  # bounded load: no backend above ceil((1+ε)·mean) in flight
    retry_budget: RetryBudgetConfig = field(default_factory=RetryBudgetConfig)

    def __post_init__(self) -> None:
        key_function(self.hash_key)  # raises BalancerConfigError early


def strategy_name(text: str) -> StrategyName:
    """The strategy called ``text``. Raises BalancerConfigError listing the known ones."""
    try:
        return StrategyName(text)
    except ValueError:
        known = ", ".join(s.value for s in StrategyName)
        raise BalancerConfigError(f"unknown strategy {text!r} (known: {known})") from None


def key_function(spec: str) -> KeyFn:
    """The request key extractor for ``hash_key``. Raises BalancerConfigError."""
    kind, _, arg = spec.partition(":")
    if kind == "header" and arg:
        lowered = arg.lower()

        def by_header(target: str, headers: Sequence[tuple[str, str]]) -> bytes | None:
            for name, value in headers:
                if name.lower() == lowered:
                    return value.encode("latin-1")
            return None

        return by_header
    if kind == "path" and not arg:
        return lambda target, headers: target.partition("?")[0].encode("latin-1")
    if kind == "path" and arg.isdigit():
        index = int(arg)

        def by_segment(target: str, headers: Sequence[tuple[str, str]]) -> bytes | None:
            segments = target.partition("?")[0].strip("/").split("/")
            return segments[index].encode("latin-1") if index < len(segments) else None

        return by_segment
    raise BalancerConfigError(f"hash_key must be 'header:NAME', 'path:N' or 'path', not {spec!r}")


# key -> (type, how to apply it to a ClientConfig)
_Apply = Callable[[ClientConfig, Any], ClientConfig]


def _health(attr: str) -> _Apply:
    def apply(config: ClientConfig, value: Any) -> ClientConfig:
        return replace(config, health=replace(config.health, **{attr: value}))

    return apply


def _checks(attr: str) -> _Apply:
    def apply(config: ClientConfig, value: Any) -> ClientConfig:
        checks: ActiveCheckConfig = replace(config.health.checks, **{attr: value})
        return replace(config, health=replace(config.health, checks=checks))

    return apply


def _slow(attr: str) -> _Apply:
    def apply(config: ClientConfig, value: Any) -> ClientConfig:
        slow: SlowStart = replace(config.health.slow_start, **{attr: value})
        return replace(config, health=replace(config.health, slow_start=slow))

    return apply


def _budget(attr: str) -> _Apply:
    def apply(config: ClientConfig, value: Any) -> ClientConfig:
        return replace(config, retry_budget=replace(config.retry_budget, **{attr: value}))

    return apply


def _top(attr: str) -> _Apply:
    return lambda config, value: replace(config, **{attr: value})


_NUMBER = (int, float)
_SETTINGS: dict[str, tuple[tuple[type, ...], _Apply]] = {
    "strategy": ((str,), lambda c, v: replace(c, strategy=strategy_name(v))),
    "hash_key": ((str,), _top("hash_key")),
    "hash_epsilon": (_NUMBER, _top("hash_epsilon")),
    "slow_start_s": (_NUMBER, _slow("window_s")),
    "slow_start_curve": (_NUMBER, _slow("curve")),
    "checks": ((bool,), _checks("enabled")),
    "check_interval_s": (_NUMBER, _checks("interval_s")),
    "check_timeout_s": (_NUMBER, _checks("timeout_s")),
    "check_rise": ((int,), _checks("rise")),
    "check_fall": ((int,), _checks("fall")),
    "check_jitter": (_NUMBER, _checks("jitter_fraction")),
    "check_path": ((str,), _checks("path")),
    "eject_after_failures": ((int,), _health("eject_after_failures")),
    "ejection_initial_s": (_NUMBER, _health("ejection_initial_s")),
    "ejection_max_s": (_NUMBER, _health("ejection_max_s")),
    "max_ejection_percent": (_NUMBER, _health("max_ejection_percent")),
    "retry_budget_percent": (_NUMBER, _budget("budget_percent")),
    "retry_min_per_s": (_NUMBER, _budget("min_retries_per_s")),
    "max_tries": ((int,), _top("max_tries")),
    "try_timeout_s": (_NUMBER, _top("try_timeout_s")),
    "request_timeout_s": (_NUMBER, _top("request_timeout_s")),
    "connect_timeout_s": (_NUMBER, _top("connect_timeout_s")),
}
SETTINGS_KEYS = frozenset(_SETTINGS) | {"weights"}


def parse_settings(
    settings: Mapping[str, Any], base: ClientConfig | None = None
) -> tuple[ClientConfig, dict[str, float]]:
    """``(config, weights by backend name)`` from flat settings. Raises BalancerConfigError."""
    config = base or ClientConfig()
    weights: dict[str, float] = {}
    for key, value in settings.items():
        if key == "weights":
            weights = _weights(value)
            continue
        if key not in _SETTINGS:
            known = ", ".join(sorted(SETTINGS_KEYS))
            raise BalancerConfigError(f"unknown balancing key {key!r} (known: {known})")
        types, apply = _SETTINGS[key]
        ok_type = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            raise BalancerConfigError(f"{key} must be a {types[0].__name__}, not {value!r}")
        if isinstance(value, _NUMBER) and not isinstance(value, bool) and value < 0:
            raise BalancerConfigError(f"{key} must not be negative, not {value!r}")
        try:
            config = apply(config, value)
        except BalancerConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise BalancerConfigError(f"{key} = {value!r}: {_first_line(exc)}") from None
    if config.max_tries < 1 or config.request_timeout_s <= 0 or config.hash_epsilon <= 0:
        raise BalancerConfigError("max_tries, request_timeout_s and hash_epsilon must be positive")
    return config, weights


def _weights(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise BalancerConfigError(f"weights must be a table of name = number, not {value!r}")
    weights: dict[str, float] = {}
    for name, weight in value.items():
        if not isinstance(weight, _NUMBER) or isinstance(weight, bool) or not weight > 0:
            raise BalancerConfigError(f"weights.{name} must be a positive number, not {weight!r}")
        if not math.isfinite(weight):
            raise BalancerConfigError(f"weights.{name} must be finite")
        weights[str(name)] = float(weight)
    return weights


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__
