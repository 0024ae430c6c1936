"""Failover of the directory's own database: the pure decisions (docs/replication.md).

The directory database (one primary, ``[directory] replicas`` synchronous standbys) holds the
shard map and the coordinator's lease, so the coordinator cannot fail it over; the directory
nodes do it themselves, with the coordinator's rules:

- **Which member is the primary**: every member not in recovery carries one row
  ``directory_generation(generation, primary_name)``; the primary is the member whose row names
  itself with the highest generation — never a generation below the highest this node has seen
  (:func:`current_primary`). A promotion writes generation + 1 naming the promoted member on it,
  so an old primary that came back with its own data names itself with an older generation and
  is not written to (the fence).
- **When to promote** (:func:`decide`): every directory node is an observer (its probes, shared
  over HTTP: ``GET /v1/directory-db``); a standby whose WAL receiver streams sees the primary up.
  A promotion needs a strict majority of *all* directory nodes to see the primary down for
  ``down_after_s``, none of the answering ones to see it up, no streaming standby, and every
  answering node to name the same primary and generation. With two directory nodes that means
  both: a partition between them blocks the directory's failover instead of risking two
  primaries.
- **Who promotes**: the answering directory node with the lowest name; the others wait.
- **Whom**: the reachable standby with the highest received LSN — only one that was a streaming
  synchronous standby at the last two samples of the primary every answering node took (a
  commit is acknowledged only once such a standby flushed it, so it holds every acknowledged map
  version; :func:`synchronous_standbys`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Decision",
    "MemberSample",
    "PeerView",
    "PrimaryState",
    "StandbyState",
    "current_primary",
    "decide",
    "standby_names_change",
    "synchronous_standbys",
]


@dataclass(frozen=True)
class MemberSample:
    """One probe of one member of the directory database."""

    name: str
    reachable: bool
    in_recovery: bool = False
    generation: int | None = None  # its directory_generation row (members not in recovery)
    names: str | None = None  # the primary_name of that row
    receive_lsn: int = 0  # standbys: pg_last_wal_receive_lsn()
    streaming: bool = False  # standbys: the WAL receiver streams from a primary


@dataclass(frozen=True)
class PeerView:
    """What one directory node sees of the directory database (its ``GET /v1/directory-db``)."""

    node: str
    primary: str
    generation: int
    down_for_s: float | None  # None: it sees the primary up
    sync_standbys: tuple[str, ...]  # streaming synchronous standbys at its last good sample


@dataclass(frozen=True)
class Decision:
    action: str  # "none" | "wait" | "promote" | "no_candidate"
    reason: str
    candidate: str | None = None


def current_primary(samples: Sequence[MemberSample], floor: int = 0) -> tuple[str, int] | None:
    """``(name, generation)`` of the member acting as primary: reachable, not in recovery, its
    generation row names itself, the highest such generation and not below ``floor``."""
    best: tuple[str, int] | None = None
    for s in samples:
        if not s.reachable or s.in_recovery or s.generation is None or s.names != s.name:
            continue
        if s.generation >= floor and (best is None or s.generation > best[1]):
            best = (s.name, s.generation)
    return best


def decide(  # noqa: PLR0911 - one reason per refusal, in order
    me: str,
    observers: Sequence[str],
    views: Mapping[str, PeerView | None],
    samples: Sequence[MemberSample],
    down_after_s: float,
) -> Decision:
    """Whether ``me`` promotes a standby of the directory database now (see the module).

    ``views``: every directory node's view (``me``'s included), None when it did not answer.
    ``samples``: ``me``'s latest probes of every member.
    """
    mine = views.get(me)
    if mine is None or mine.down_for_s is None:
        return Decision("none", "the primary is up")
    answered = {n: v for n, v in views.items() if v is not None and n in observers}
    up = sorted(n for n, v in answered.items() if v.down_for_s is None)
    if up:
        return Decision("wait", f"{', '.join(up)} see {mine.primary} up")
    if any((v.primary, v.generation) != (mine.primary, mine.generation) for v in answered.values()):
        return Decision("wait", "the directory nodes disagree on the primary")
    streaming = sorted(s.name for s in samples if s.reachable and s.in_recovery and s.streaming)
    if streaming:
        return Decision("wait", f"{', '.join(streaming)} still stream from {mine.primary}")
    down = [n for n, v in answered.items() if (v.down_for_s or 0.0) >= down_after_s]
    if len(down) * 2 <= len(observers):
        return Decision(
            "wait", f"{len(down)} of {len(observers)} directory nodes see it down long enough"
        )
    if min(answered) != me:
        return Decision("wait", f"{min(answered)} promotes")
    synced = set.intersection(*(set(v.sync_standbys) for v in answered.values()))
    standbys = [s for s in samples if s.reachable and s.in_recovery and s.name != mine.primary]
    eligible = [s for s in standbys if s.name in synced]
    if not eligible:
        return Decision(
            "no_candidate",
            "no reachable standby was synchronous at the last sample"
            if standbys
            else "no standby reachable",
        )
    best = max(eligible, key=lambda s: (s.receive_lsn, s.name))
    return Decision("promote", f"{mine.primary} down", best.name)


SYNC_STATES = ("sync", "quorum")


@dataclass(frozen=True)
class StandbyState:
    """One row of the primary's ``pg_stat_replication``."""

    state: str  # streaming | catchup | ...
    sync_state: str  # sync | quorum | potential | async
    flush_lsn: int


@dataclass(frozen=True)
class PrimaryState:
    """What one sample of the primary says about its standbys."""

    flush_lsn: int  # pg_current_wal_flush_lsn()
    standby_names: str  # its synchronous_standby_names
    standbys: Mapping[str, StandbyState]


def synchronous_standbys(previous: PrimaryState | None, now: PrimaryState) -> tuple[str, ...]:
    """The standbys that hold every acknowledged commit: streaming and synchronous at this
    sample *and* the previous one. Every commit since the earlier sample waited for one of them;
    the primary's list changes at most once per ``standby_after_s`` (more than a sample
    interval), and a standby is made synchronous only after streaming — caught up — for that
    long, so commits acknowledged while the primary ran alone reached it before (a bound in
    time, not an LSN check: a flushed-LSN check against the previous sample failed on a busy
    primary, whose standby's reported flush trails by a few milliseconds)."""
    if previous is None:
        return ()

    def synced(state: PrimaryState, name: str) -> bool:
        row = state.standbys.get(name)
        return row is not None and row.state == "streaming" and row.sync_state in SYNC_STATES

    return tuple(
        sorted(
            name
            for name, row in now.standbys.items()
            if synced(now, name) and synced(previous, name)
        )
    )


def standby_names_change(
    now: PrimaryState, wanted: str, streaming_for_s: float, alone_for_s: float, after_s: float
) -> str | None:
    """The ``synchronous_standby_names`` to set on the primary, or None to leave it.

    ``wanted``: the full list (every other member); ``streaming_for_s`` / ``alone_for_s``: how
    long some standby has streamed / none has. Without a streaming standby for ``after_s``
    the primary drops to ``''`` (commits stop waiting: the coordinator's lease and the map stay
    writable; :func:`decide` then finds no candidate, so nothing acknowledged can be lost); once
    a standby streamed for ``after_s`` it goes back to ``wanted``."""
    if now.standby_names and alone_for_s >= after_s:
        return ""
    if not now.standby_names and wanted and streaming_for_s >= after_s:
        return wanted
    return None
