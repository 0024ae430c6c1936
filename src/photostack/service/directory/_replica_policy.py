"""Keeping a shard's replicas attached to its primary: pure decisions, no I/O.

After a promotion every other replica must stream from the new primary (on its new timeline), or
a synchronous primary's commits wait for a standby that never comes. The coordinator points them
at it right after ``pg_promote()``; that one attempt can fail (a probe timeout on a loaded
machine, a leader that dies between promoting and repointing), so every round the leader also
checks, per replica, whether the primary lists it in ``pg_stat_replication``:

- attached: nothing to do;
- detached for ``reattach_after_s`` and its ``primary_conninfo`` names another server: REPOINT
  (``ALTER SYSTEM SET primary_conninfo`` + reload; at most once per ``repoint_interval_s``);
- detached for ``rebuild_after_s`` although it does name the primary (it cannot follow: a timeline
  it diverged on, WAL the primary no longer has): REBUILD — the supervisor replaces its PGDATA
  with a fresh ``pg_basebackup -R`` of the primary (redundancy restored).

Judged only while the primary is confirmed (reachable, not in recovery) and the replica is
reachable and in recovery; anything else starts the count over (a replica that is down is the
supervisor's to restart; a primary that is down is the failover's business).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "ReplicaAction",
    "ReplicaPolicy",
    "ReplicaWatch",
    "conninfo_address",
    "dsn_address",
]


@dataclass(frozen=True)
class ReplicaPolicy:
    reattach_after_s: float = 1.0  # a replica retries its primary every few seconds by itself
    repoint_interval_s: float = 2.0  # at most one ALTER SYSTEM + reload per replica per interval
    rebuild_after_s: float = 30.0  # pointed at the primary and still not streaming: rebuild

    def __post_init__(self) -> None:
        if not 0 < self.reattach_after_s < self.rebuild_after_s:
            raise ValueError("need 0 < reattach_after_s < rebuild_after_s")


class ReplicaAction(enum.StrEnum):
    KEEP = "keep"
    REPOINT = "repoint"
    REBUILD = "rebuild"


class ReplicaWatch:
    """One replica's attachment to its shard's primary. Times are the caller's monotonic clock."""

    def __init__(self, name: str, policy: ReplicaPolicy) -> None:
        self.name = name
        self.policy = policy
        self.detached_since: float | None = None
        self.repointed_at: float | None = None

    def __repr__(self) -> str:
        state = "attached" if self.detached_since is None else f"detached@{self.detached_since}"
        return f"<ReplicaWatch {self.name} {state}>"

    def observe(self, *, judged: bool, attached: bool, now: float) -> None:
        """One round. ``judged``: primary confirmed and replica reachable in recovery."""
        if not judged or attached:
            self.detached_since = None
            self.repointed_at = None
        elif self.detached_since is None:
            self.detached_since = now

    def decide(self, now: float, *, points_at_primary: bool) -> ReplicaAction:
        """What to do about this replica now (see the module)."""
        if self.detached_since is None:
            return ReplicaAction.KEEP
        policy = self.policy
        if not points_at_primary:
            if now - self.detached_since < policy.reattach_after_s:
                return ReplicaAction.KEEP
            if (
                self.repointed_at is not None
                and now - self.repointed_at < policy.repoint_interval_s
            ):
                return ReplicaAction.KEEP
            return ReplicaAction.REPOINT
        since = max(self.detached_since, self.repointed_at or self.detached_since)
        if now - since >= policy.rebuild_after_s:
            return ReplicaAction.REBUILD
        return ReplicaAction.KEEP

    def repointed(self, now: float) -> None:
        self.repointed_at = now


_CONNINFO_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")


def conninfo_address(conninfo: str) -> tuple[str, int] | None:
    """``(host, port)`` of a libpq key/value connection string (``primary_conninfo``), or None
    when it names no host. The port defaults to 5432, as in libpq."""
    values: dict[str, str] = {}
    for match in _CONNINFO_PAIR.finditer(conninfo):
        key, raw = match.group(1), match.group(2)
        if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        values[key] = raw
    host = values.get("host") or values.get("hostaddr")
    if not host:
        return None
    try:
        port = int(values.get("port") or 5432)
    except ValueError:
        return None
    return host, port


def dsn_address(dsn: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``postgresql://`` URL, or None."""
    parts = urlsplit(dsn)
    if not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or 5432
    except ValueError:
        return None
