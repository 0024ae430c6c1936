"""Replicated shards: read routing, replica lag, read-your-writes tokens. Pure logic, no I/O.

A shard is a primary and its streaming replicas. What a reader may use is decided here from
*views* the caller samples (reachability, LSNs, lag) and the group's :class:`ReadPolicy`:

- writes always go to the primary (the caller never asks);
- a read goes to a replica that is streaming, whose lag is within ``max_lag_s`` and, when the
  request carries a read-your-writes LSN for this shard, that has replayed past it; otherwise to
  the primary;
- when the primary is not usable (unreachable, or its write lease is not confirmed by the
  coordinator) the group's CAP choice decides: ``cp`` refuses (:class:`ReadRefused`), ``ap``
  serves the freshest reachable copy marked stale.

LSNs are Postgres ``pg_lsn`` values (``"16/B374D848"``), handled here as integers.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._errors import StorageError

__all__ = [
    "PRIMARY",
    "Consistency",
    "PrimaryView",
    "ReadDecision",
    "ReadPolicy",
    "ReadRefused",
    "ReplicaView",
    "ReplicationMode",
    "choose_read",
    "format_lsn",
    "format_read_after",
    "merge_read_after",
    "parse_lsn",
    "parse_read_after",
    "synchronous_standby_names",
]

PRIMARY = ""  # ReadDecision.target for "the primary"
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_SHARD_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}-[0-9]{1,3}$")
_MAX_TOKEN_PARTS = 32


class ReplicationMode(enum.StrEnum):
    """How a group's primary commits relative to its replicas."""

    ASYNC = "async"  # commit locally; replicas follow (an acknowledged write can be lost)
    SYNC = "sync"  # commit waits until the first listed standby has flushed the WAL
    REMOTE_APPLY = "remote_apply"  # ... and replayed it (reads there see the write at once)

    @property
    def synchronous(self) -> bool:
        return self is not ReplicationMode.ASYNC


class Consistency(enum.StrEnum):
    """The group's CAP choice under a partition."""

    CP = "cp"  # refuse what could be stale or split-brained (503 + Retry-After)
    AP = "ap"  # serve replica reads, marked stale


class ReadRefused(StorageError):
    """A ``cp`` group cannot serve this read without risking a stale or split-brained answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ReadPolicy:
    consistency: Consistency = Consistency.CP
    max_lag_s: float = 0.0  # 0: replicas serve no reads while the primary is usable
    sample_max_age_s: float = 2.0  # an older sample says nothing about a replica


@dataclass(frozen=True)
class PrimaryView:
    reachable: bool
    confirmed: bool  # its write lease from the coordinator is valid (or no coordinator at all)
    lsn: int | None = None  # pg_current_wal_lsn at the last sample

    @property
    def usable(self) -> bool:
        return self.reachable and self.confirmed


@dataclass(frozen=True)
class ReplicaView:
    name: str
    reachable: bool
    streaming: bool  # its WAL receiver is connected to the primary
    replay_lsn: int | None
    lag_bytes: int | None
    lag_s: float | None
    sampled_at: float  # the caller's clock


@dataclass(frozen=True)
class ReadDecision:
    target: str  # PRIMARY or a replica's name
    stale: bool = False  # served although it may miss acknowledged writes (ap only)
    reason: str = ""

    @property
    def on_primary(self) -> bool:
        return self.target == PRIMARY


def choose_read(
    policy: ReadPolicy,
    primary: PrimaryView,
    replicas: Sequence[ReplicaView],
    *,
    now: float,
    read_after: int | None = None,
    turn: int = 0,
) -> ReadDecision:
    """Where one read goes. ``turn`` spreads reads over eligible replicas (round robin).

    Raises ReadRefused (``cp`` only) when the primary is not usable.
    """
    fresh = [r for r in replicas if r.reachable and now - r.sampled_at <= policy.sample_max_age_s]
    if primary.usable:
        if policy.max_lag_s <= 0:
            return ReadDecision(PRIMARY, reason="replica reads off")
        eligible = [
            r
            for r in fresh
            if r.streaming
            and r.lag_s is not None
            and r.lag_s <= policy.max_lag_s
            and (read_after is None or (r.replay_lsn is not None and r.replay_lsn >= read_after))
        ]
        if not eligible:
            return ReadDecision(PRIMARY, reason="no replica within bound")
        return ReadDecision(eligible[turn % len(eligible)].name)
    why = "primary unreachable" if not primary.reachable else "primary not confirmed"
    if policy.consistency is Consistency.CP:
        raise ReadRefused(why)
    if primary.reachable:  # ap: the unconfirmed primary has every write it acknowledged
        return ReadDecision(PRIMARY, stale=True, reason=why)
    best = max(fresh, key=lambda r: r.replay_lsn or -1, default=None)
    if best is None:
        raise ReadRefused(f"{why} and no replica reachable")
    return ReadDecision(best.name, stale=True, reason=why)


# -- LSNs and read-your-writes tokens ----------------------------------------------------------


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> int. Raises ValueError."""
    match = _LSN.match(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_read_after(header: str | None) -> dict[str, int]:
    """``"users-1=0/16B3A28;social-2=0/5000"`` -> ``{"users-1": ..., ...}`` (shard names).

    A token is a hint: malformed parts are ignored, never an error (a client may send anything).
    """
    out: dict[str, int] = {}
    if not header:
        return out
    for part in header.split(";")[:_MAX_TOKEN_PARTS]:
        key, sep, lsn = part.strip().partition("=")
        if not sep or not _SHARD_KEY.match(key):
            continue
        try:
            value = parse_lsn(lsn)
        except ValueError:
            continue
        out[key] = max(value, out.get(key, 0))
    return out


def merge_read_after(*tokens: Mapping[str, int]) -> dict[str, int]:
    """The per-shard maximum of several tokens."""
    out: dict[str, int] = {}
    for token in tokens:
        for key, value in token.items():
            out[key] = max(value, out.get(key, 0))
    return out


def format_read_after(token: Mapping[str, int]) -> str:
    return ";".join(f"{key}={format_lsn(token[key])}" for key in sorted(token))


# -- synchronous standbys ----------------------------------------------------------------------


def synchronous_standby_names(mode: ReplicationMode, standbys: Iterable[str]) -> str:
    """The ``synchronous_standby_names`` value of a group's primary.

    ``FIRST 1 (a, b)``: the first connected standby in list order is synchronous, the next takes
    over when it drops. The same list is set on every member (a primary ignores its own name), so
    it stays right after a failover. Empty for asynchronous groups or without standbys.
    """
    names = [n for n in standbys if n]
    if not mode.synchronous or not names:
        return ""
    quoted = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
    return f"FIRST 1 ({quoted})"
