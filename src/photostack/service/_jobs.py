"""Cross-shard jobs: follow-edge reconciliation, user-deletion cleanup, the orphan sweeper.

How they run: every app node has a :class:`JobRunner` that wakes each job on its interval, but a
job body runs only under its lease: one app node at a time runs a given job (an advisory lock on
the users shard owning the job's name, next to its saved state, both behind the ownership fence:
service/_jobs_lease.py). The same jobs run on demand through the app's internal
API (``POST /internal/v1/jobs/{name}/run``), which the control plane exposes as
``photostack jobs run NAME``; a run while another node holds the lease answers 409 ``job_busy``.

- ``reconcile-follows``: scans ``following`` and ``followers`` on every social shard in keyset
  batches; a forward edge without its reverse twin gets the twin (same ``created_at``), a reverse
  edge without its forward edge is deleted (the forward edge is the truth: follow writes it
  first, unfollow deletes it last). Idempotent; per-shard cursors are saved in ``job_state``
  after each batch, so a run cut by its deadline or a crash resumes where it stopped.
- ``user-cleanup``: finishes every recorded user deletion, stage by stage (:data:`STAGES`),
  in bounded batches, recording the stage reached in ``user_deletions`` (resumable).
- ``orphan-sweep``: counts dangling references (edges to missing users, photos of missing owners)
  per shard, through scatter-gather with per-shard deadlines; the report names shards that did
  not answer. It reports only: repairing is the cleanup job's and the reconciler's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from fastapi import FastAPI
from starlette.responses import Response

from photostack.blocks.storage import ShardRouter, scatter_gather

from ._fenced import execute, fenced, fenced_each
from ._http import ApiError, JsonResponse
from ._jobs_lease import (
    JobBusyError,
    Lease,
    LeaseMovedError,
    current_lease,
    hold_lease,
    running_under,
)
from ._jobs_sql import (
    ADD_REVERSE,
    ADVANCE,
    DELETE_EVENTS,
    DELETE_PHOTOS,
    DELETE_SEQ,
    DELETE_USER,
    DELETION,
    DROP_REVERSE,
    FINISH,
    FORWARD,
    FORWARD_EXISTS,
    LOAD_STATE,
    PENDING,
    PHOTO_SCAN,
    RECORD_DELETION,
    RELEASE_NAME,
    REVERSE,
    SAVE_STATE,
    USER_FOR_DELETE,
    USERS,
    Edge,
)
from ._photos import Invalidate, no_invalidation
from ._store import DomainError, UserNotFoundError
from .directory import NO_GUARD, OwnershipGuard

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "STAGES",
    "JobBusyError",
    "JobConfig",
    "JobName",
    "JobRunner",
    "Jobs",
    "Lease",
    "LeaseMovedError",
    "UnknownJobError",
    "add_internal_job_routes",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The cleanup of one deleted user, in order; the reached stage is recorded after each one.
STAGES = ("username", "photos", "following", "followers", "events", "done")
_ALL_SEQ = 1 << 62


class JobName(enum.StrEnum):
    RECONCILE_FOLLOWS = "reconcile-follows"
    USER_CLEANUP = "user-cleanup"
    ORPHAN_SWEEP = "orphan-sweep"


class UnknownJobError(DomainError, LookupError):
    pass


@dataclass(frozen=True)
class JobConfig:
    batch_size: int = 500
    shard_deadline_s: float = 30.0  # per shard, per run (scatter-gather)
    intervals_s: tuple[tuple[JobName, float], ...] = (
        (JobName.USER_CLEANUP, 5.0),
        (JobName.RECONCILE_FOLLOWS, 300.0),
        (JobName.ORPHAN_SWEEP, 900.0),
    )


class Jobs:
    """The job bodies and the user-deletion request, over the sharded storage."""

    def __init__(
        self,
        router: ShardRouter[Pool],
        config: JobConfig | None = None,
        guard: OwnershipGuard = NO_GUARD,
        invalidate: Invalidate | None = None,
    ) -> None:
        self._router = router
        self.config = config or JobConfig()
        self._guard = guard
        self._invalidate = invalidate or no_invalidation
        self.last_reports: dict[str, dict[str, Any]] = {}
        self.wake = asyncio.Event()  # set by a deletion request: run the cleanup soon

    # -- running under the lease -------------------------------------------------------------

    def lease(self, name: str) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Hold job ``name``'s lease for the block (service/_jobs_lease.py). Raises
        JobBusyError."""
        return hold_lease(self._router, self._guard, name)

    async def run(self, name: str) -> dict[str, Any]:
        """Run job ``name`` now under its lease; returns its report.

        Raises UnknownJobError, JobBusyError, and storage errors.
        """
        try:
            job = JobName(name)
        except ValueError:
            raise UnknownJobError(name) from None
        body: Callable[[], Awaitable[dict[str, Any]]] = {
            JobName.RECONCILE_FOLLOWS: self.reconcile_follows,
            JobName.USER_CLEANUP: self.cleanup_users,
            JobName.ORPHAN_SWEEP: self.sweep_orphans,
        }[job]
        started = time.monotonic()
        async with self.lease(job.value) as held:
            with running_under(held):
                report = await body()
        report = {"job": job.value, "elapsed_s": round(time.monotonic() - started, 3), **report}
        self.last_reports[job.value] = report
        return report

    # -- user deletion -----------------------------------------------------------------------

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        """Record the deletion and remove the user row at once (reads answer 404 from now on);
        the cleanup job removes the rest. Idempotent. Raises UserNotFoundError."""

        async def record(conn: Any) -> Any:
            username = await conn.fetchval(USER_FOR_DELETE, user_id)
            if username is not None:
                await conn.execute(RECORD_DELETION, user_id, username)
                await conn.execute(DELETE_USER, user_id)
            return await conn.fetchrow(DELETION, user_id)

        row = await self._fenced("users", [user_id], record)
        if row is None:
            raise UserNotFoundError(user_id)
        await self._invalidate([f"user:{user_id}", f"username:{row['username']}"])
        self.wake.set()
        return {"user_id": user_id, "username": row["username"], "stage": row["stage"]}

    async def cleanup_users(self) -> dict[str, Any]:
        """Finish every unfinished deletion (bounded batches per user, stage recorded)."""
        finished: list[str] = []
        for shard in self._router.shards("users"):
            while True:
                pending = await shard.fetch(PENDING, self.config.batch_size)
                for row in pending:
                    held = current_lease(JobName.USER_CLEANUP.value)
                    if held is not None:  # a reshard moved the lease: stop, the next run goes on
                        await held.check()
                    await self._clean_one(shard, row["user_id"], row["username"], row["stage"])
                    finished.append(row["user_id"])
                if len(pending) < self.config.batch_size:
                    break
        return {"finished": len(finished), "users": finished[:20]}

    def _fenced(
        self, group: str, keys: Sequence[str], action: Callable[[Any], Awaitable[T]]
    ) -> Awaitable[T]:
        """``action(conn)`` on the keys' owner behind the ownership fence (service/_fenced.py):
        every repair and cleanup write here is one, so none lands on a shard a reshard emptied."""
        return fenced(self._router, self._guard, group, keys, action)

    async def _clean_one(self, shard: Pool, user_id: str, username: str, stage: str) -> None:
        # ``shard`` found the deletion; its writes go to the user's owner now (a reshard may
        # have moved it since): each is a fenced transaction on the user's (or name's) key.
        start = STAGES.index(stage) if stage in STAGES else 0
        for step in STAGES[start:-1]:
            if step == "username":
                await self._fenced("users", [username], execute(RELEASE_NAME, username, user_id))
            elif step == "photos":
                await self._delete_photos(user_id)
            elif step == "following":
                await self._delete_edges(FORWARD, user_id)
            elif step == "followers":
                await self._delete_edges(REVERSE, user_id)
            elif step == "events":

                async def drop_events(conn: Any) -> None:
                    await conn.execute(DELETE_EVENTS, user_id, _ALL_SEQ)
                    await conn.execute(DELETE_SEQ, user_id)

                await self._fenced("users", [user_id], drop_events)
            following = STAGES[STAGES.index(step) + 1]
            await self._fenced("users", [user_id], execute(ADVANCE, user_id, following))
        await self._fenced("users", [user_id], execute(FINISH, user_id))
        log.info("user %s deleted everywhere", user_id)

    async def _delete_photos(self, owner_id: str) -> None:
        while True:

            async def batch() -> int:
                pool = self._router.shard_for("photos", owner_id)
                async with pool.acquire() as conn, conn.transaction():
                    await self._guard.verify(conn, "photos", owner_id)
                    return len(await conn.fetch(DELETE_PHOTOS, owner_id, self.config.batch_size))

            if await self._guard.retrying(batch) < self.config.batch_size:
                return

    async def _delete_edges(self, edge: Edge, user_id: str) -> None:
        """The user's rows of ``edge.table`` and, first, their twins on the others' shards."""
        while True:
            own = self._router.shard_for("social", user_id)
            rows = await own.fetch(edge.list_sql(), user_id, self.config.batch_size)
            others = [r["other"] for r in rows]
            if not others:
                return
            await fenced_each(
                self._router,
                self._guard,
                "social",
                others,
                lambda c, keys: c.execute(edge.delete_twins_sql(), keys, user_id),
            )
            await self._fenced("social", [user_id], execute(edge.delete_own_sql(), user_id, others))
            changed = [f"{edge.twin_table}:{o}" for o in others] + [f"user:{o}" for o in others]
            await self._invalidate([*changed, f"{edge.table}:{user_id}", f"user:{user_id}"])

    # -- reconciliation ----------------------------------------------------------------------

    async def reconcile_follows(self) -> dict[str, Any]:
        shards = self._router.shards("social")
        state = await self._load_state(JobName.RECONCILE_FOLLOWS)
        totals = {"scanned": 0, "reverse_added": 0, "reverse_dropped": 0}

        async def one_shard(index: int) -> dict[str, int]:
            counts = {"scanned": 0, "reverse_added": 0, "reverse_dropped": 0}
            for edge in (FORWARD, REVERSE):
                slot = f"{index}:{edge.table}"
                after = state.get(slot) or ["", ""]
                while True:
                    rows = await shards[index].fetch(
                        edge.scan_sql(), after[0], after[1], self.config.batch_size
                    )
                    if not rows:
                        break
                    counts["scanned"] += len(rows)
                    await self._repair(edge, rows, counts)
                    after = [rows[-1]["user_id"], rows[-1]["other"]]
                    state[slot] = after
                    await self._save_state(JobName.RECONCILE_FOLLOWS, state)
                    if len(rows) < self.config.batch_size:
                        break
                state.pop(slot, None)  # a finished pass starts over next time
                await self._save_state(JobName.RECONCILE_FOLLOWS, state)
            return counts

        gathered = await scatter_gather(
            {f"social-{i}": (lambda i=i: one_shard(i)) for i in range(len(shards))},  # type: ignore[misc]
            deadline_s=self.config.shard_deadline_s,
        )
        for counts in gathered.results.values():
            for key, value in counts.items():
                totals[key] += value
        return {**totals, "shards": gathered.report()}

    async def _repair(
        self, edge: Edge, rows: Sequence[asyncpg.Record], counts: dict[str, int]
    ) -> None:
        shards = self._router.shards("social")
        by_shard = self._router.split_by_shard("social", [r["other"] for r in rows])
        for index, others in by_shard.items():
            users = sorted({r["user_id"] for r in rows if r["other"] in set(others)})
            twins = await shards[index].fetch(edge.twins_sql(), others, users)
            present = {(t["other"], t["user_id"]) for t in twins}  # (user, other) of our side
            for row in rows:
                if row["other"] not in others or (row["user_id"], row["other"]) in present:
                    continue
                if edge is FORWARD:  # forward without reverse: add the twin, same time
                    await self._fenced(
                        "social",
                        [row["other"]],
                        execute(ADD_REVERSE, row["other"], row["user_id"], row["created_at"]),
                    )
                    counts["reverse_added"] += 1
                    await self._invalidate([f"followers:{row['other']}", f"user:{row['other']}"])
                # reverse without forward: the forward edge is the truth
                elif (
                    await shards[index].fetchval(FORWARD_EXISTS, row["other"], row["user_id"])
                    is None
                ):
                    await self._fenced(
                        "social",
                        [row["user_id"]],
                        execute(DROP_REVERSE, row["user_id"], row["other"]),
                    )
                    counts["reverse_dropped"] += 1
                    await self._invalidate(
                        [f"followers:{row['user_id']}", f"user:{row['user_id']}"]
                    )

    async def _load_state(self, job: JobName) -> dict[str, Any]:
        """The job's saved state: through its lease when this node runs it, else from the
        owner of the job's name (a read: any copy of the row is the same one)."""
        held = current_lease(job.value)
        if held is not None:
            return await held.load()
        text = await self._router.shard_for("users", job.value).fetchval(LOAD_STATE, job.value)
        loaded: dict[str, Any] = json.loads(text) if text else {}
        return loaded

    async def _save_state(self, job: JobName, state: dict[str, Any]) -> None:
        """A checkpoint: on the lease's shard behind the fence (raises LeaseMovedError once a
        reshard moved the job's name), or, outside a leased run, fenced on the name's owner."""
        held = current_lease(job.value)
        if held is not None:
            await held.save(state)
        else:
            await self._fenced(
                "users", [job.value], execute(SAVE_STATE, job.value, json.dumps(state))
            )

    # -- orphan sweeper ----------------------------------------------------------------------

    async def _missing_users(self, ids: Sequence[str]) -> set[str]:
        shards = self._router.shards("users")
        found: set[str] = set()
        for index, keys in self._router.split_by_shard("users", ids).items():
            found |= {r["id"] for r in await shards[index].fetch(USERS, keys)}
        return set(ids) - found

    async def sweep_orphans(self) -> dict[str, Any]:
        """Dangling references per shard: edges naming a missing user, photos of a missing
        owner. Each shard's scan is cut at the per-shard deadline and reported if so."""
        batch = self.config.batch_size

        async def social(index: int) -> dict[str, Any]:
            pool = self._router.shards("social")[index]
            out: dict[str, Any] = {}
            for edge in (FORWARD, REVERSE):
                scanned, dangling = 0, 0
                examples: list[list[str]] = []
                after = ["", ""]
                while True:
                    rows = await pool.fetch(edge.scan_sql(), after[0], after[1], batch)
                    if not rows:
                        break
                    scanned += len(rows)
                    ids = {r["user_id"] for r in rows} | {r["other"] for r in rows}
                    missing = await self._missing_users(sorted(ids))
                    for r in rows:
                        if r["user_id"] in missing or r["other"] in missing:
                            dangling += 1
                            if len(examples) < 5:
                                examples.append([r["user_id"], r["other"]])
                    after = [rows[-1]["user_id"], rows[-1]["other"]]
                    if len(rows) < batch:
                        break
                out[edge.table] = {"scanned": scanned, "dangling": dangling, "examples": examples}
            return out

        async def photos(index: int) -> dict[str, Any]:
            pool = self._router.shards("photos")[index]
            scanned, dangling, after = 0, 0, ""
            examples: list[str] = []
            while True:
                rows = await pool.fetch(PHOTO_SCAN, after, batch)
                if not rows:
                    break
                scanned += len(rows)
                missing = await self._missing_users(sorted({r["owner_id"] for r in rows}))
                for r in rows:
                    if r["owner_id"] in missing:
                        dangling += 1
                        if len(examples) < 5:
                            examples.append(r["id"])
                after = rows[-1]["id"]
                if len(rows) < batch:
                    break
            return {"photos": {"scanned": scanned, "dangling": dangling, "examples": examples}}

        calls: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
        for i in range(len(self._router.shards("social"))):
            calls[f"social-{i}"] = lambda i=i: social(i)  # type: ignore[misc]
        for i in range(len(self._router.shards("photos"))):
            calls[f"photos-{i}"] = lambda i=i: photos(i)  # type: ignore[misc]
        gathered = await scatter_gather(calls, deadline_s=self.config.shard_deadline_s)
        totals: dict[str, int] = {"following": 0, "followers": 0, "photos": 0}
        for part in gathered.results.values():
            for table, figures in part.items():
                totals[table] += figures["dangling"]
        return {
            "dangling": totals,
            "per_shard": dict(gathered.results),
            "shards": gathered.report(),
        }


class JobRunner:
    """Runs every job on its interval on this node; the lease keeps it to one node at a time."""

    def __init__(
        self,
        jobs: Jobs,
        errors: tuple[type[Exception], ...],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jobs = jobs
        self._errors = errors
        self._clock = clock

    async def run_forever(self) -> None:
        intervals = dict(self.jobs.config.intervals_s)
        due = {name: self._clock() + interval for name, interval in intervals.items()}
        while True:
            wait_s = max(0.0, min(due.values()) - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.jobs.wake.wait(), wait_s)
            if self.jobs.wake.is_set():
                self.jobs.wake.clear()
                due[JobName.USER_CLEANUP] = self._clock()
            for name, at in sorted(due.items(), key=lambda item: item[1]):
                if at > self._clock():
                    continue
                due[name] = self._clock() + intervals[name]
                try:
                    report = await self.jobs.run(name.value)
                    log.info("job %s: %s", name.value, report)
                except LeaseMovedError:
                    log.info("job %s stopped: a reshard moved its lease", name.value)
                except JobBusyError:
                    log.debug("job %s runs on another node", name.value)
                except self._errors as exc:
                    log.warning("job %s failed: %r (retried next interval)", name.value, exc)


def add_internal_job_routes(app: FastAPI, jobs: Callable[[], Jobs]) -> None:
    """Internal only (the control plane calls them; no public route leads here):

    - ``DELETE /internal/v1/users/{id}`` -> 202 ``{"user_id", "username", "stage"}`` | 404
    - ``POST   /internal/v1/jobs/{name}/run`` -> 200 report | 404 ``unknown_job`` | 409 ``job_busy``
    - ``GET    /internal/v1/jobs`` -> the job names and this node's last report of each
    """

    @app.delete("/internal/v1/users/{user_id}", status_code=202)
    async def delete_user(user_id: str) -> Response:
        try:
            return JsonResponse(await jobs().delete_user(user_id), status_code=202)
        except UserNotFoundError as exc:
            raise ApiError(404, "user_not_found", "no such user") from exc

    @app.post("/internal/v1/jobs/{name}/run")
    async def run_job(name: str) -> Response:
        try:
            return JsonResponse(await jobs().run(name))
        except UnknownJobError as exc:
            known = ", ".join(j.value for j in JobName)
            raise ApiError(404, "unknown_job", f"no job {name!r} (known: {known})") from exc
        except LeaseMovedError as exc:
            raise ApiError(
                409, "job_busy", f"{name}'s lease moved with a reshard; run it again"
            ) from exc
        except JobBusyError as exc:
            raise ApiError(409, "job_busy", f"{name} is running on another app node") from exc

    @app.get("/internal/v1/jobs")
    async def list_jobs() -> Response:
        return JsonResponse({"jobs": [j.value for j in JobName], "last": jobs().last_reports})
