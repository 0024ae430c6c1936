"""The cache node's configuration and per-connection session, plus the number formats its
commands read and write."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from photostack.blocks.cache._policy import PolicyName
from photostack.blocks.cache._pubsub import Subscriber
from photostack.blocks.cache._resp import NIL, NULL3, array, bulk, push

__all__ = ["INT64", "NodeConfig", "Session", "human_bytes", "parse_int", "parse_memory"]

INT64 = 2**63
_INTEGER_RE = re.compile(rb"-?(0|[1-9][0-9]{0,18})")
_MEMORY_RE = re.compile(r"(\d+)(b|k|kb|m|mb|g|gb)?", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3,
          "gb": 1024**3}  # fmt: skip


@dataclass(frozen=True)
class NodeConfig:
    """``maxmemory_bytes`` 0 means unbounded (as in Redis); the bound counts key + value bytes."""

    host: str = "127.0.0.1"
    port: int = 6379
    maxmemory_bytes: int = 0
    policy: PolicyName = PolicyName.LRU
    active_expire_interval_s: float = 0.1  # Redis's hz=10


def parse_memory(text: str) -> int:
    """``"100mb"`` → 104857600, with Redis's units; raises ValueError."""
    match = _MEMORY_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a memory amount: {text!r}")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def human_bytes(n: int) -> str:
    for unit, size in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n}B"


def parse_int(raw: bytes) -> int | None:
    if _INTEGER_RE.fullmatch(raw) is None:
        return None
    value = int(raw)
    return value if -INT64 <= value < INT64 else None


class Session:
    """One client connection's state."""

    __slots__ = ("closing", "name", "null", "resp3", "subscriber")

    def __init__(self, push: Callable[[bytes], None]) -> None:
        self.subscriber = Subscriber(push)
        self.closing = False
        self.name = b""
        self.resp3 = False  # after HELLO 3
        self.null = NIL

    def use_protocol(self, version: int) -> None:
        self.resp3 = self.subscriber.resp3 = version == 3
        self.null = NULL3 if self.resp3 else NIL

    def bulk(self, value: bytes | None) -> bytes:
        return self.null if value is None else bulk(value)

    def frame(self, encoded: list[bytes]) -> bytes:
        """A pub/sub reply: a push frame in RESP3, an array in RESP2."""
        return push(encoded) if self.resp3 else array(encoded)
