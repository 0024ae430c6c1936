"""The drills' load: a bounded, paced read/write loop through the public API (the edge).

Writes are follows (``PUT /v1/users/{me}/following/{target}``): idempotent, so the contract says
none may fail while a web or app node dies, and each has an id (``me>target``) that must be
readable afterwards in ``GET /v1/users/{me}/following``. After each acknowledged follow the
writer reads its own profile: a ``following_count`` below the follows it has had acknowledged
is a stale read. Readers read profiles (cached) and a first page of 10 (not cached: it always
reaches the database). Every request is recorded in a ``LoadLog`` with its times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from photostack.ops._drill_model import LoadLog, Op

__all__ = ["ApiLoad", "LoadConfig", "Population", "User", "create_population"]

_SETUP_CONCURRENCY = 8
_SETUP_ATTEMPTS = 5


@dataclass(frozen=True)
class LoadConfig:
    writers: int = 4
    readers: int = 4
    write_rate_per_s: float = 20.0  # all writers together
    read_rate_per_s: float = 40.0  # all readers together
    targets: int = 60  # users each writer follows in turn; writes stop when all are followed
    request_timeout_s: float = 10.0
    max_ops: int = 20_000  # a hard bound, whatever the rates and durations


@dataclass(frozen=True)
class User:
    id: str
    token: str


@dataclass(frozen=True)
class Population:
    writers: tuple[User, ...]
    targets: tuple[str, ...]


async def create_population(api: httpx.AsyncClient, config: LoadConfig) -> Population:
    """Create the drill's users through the API (before any fault). Raises httpx.HTTPError or
    RuntimeError when the cluster cannot take them."""
    gate = asyncio.Semaphore(_SETUP_CONCURRENCY)
    tag = uuid.uuid4().hex[:8]

    async def make(i: int) -> User:
        async with gate:
            for attempt in range(_SETUP_ATTEMPTS):
                try:
                    r = await api.post("/v1/users", json={"username": f"drill_{tag}_{i}"})
                except httpx.TransportError:
                    if attempt == _SETUP_ATTEMPTS - 1:
                        raise
                    continue
                if r.status_code == 201:
                    body = r.json()
                    return User(body["id"], body["token"])
                if r.status_code == 409:  # an earlier attempt went through
                    r = await api.get(f"/v1/users/by-username/drill_{tag}_{i}")
                    if r.status_code == 200:
                        return User(r.json()["id"], "")
            raise RuntimeError(f"cannot create drill users: HTTP {r.status_code} {r.text[:200]}")

    users = await asyncio.gather(*(make(i) for i in range(config.writers + config.targets)))
    writers = tuple(users[: config.writers])
    if any(not w.token for w in writers):
        raise RuntimeError("a drill writer was created without a token; rerun the drill")
    return Population(writers, tuple(u.id for u in users[config.writers :]))


class ApiLoad:
    """Runs writers and readers until ``stop``; every request lands in ``log``."""

    def __init__(
        self,
        api: httpx.AsyncClient,
        population: Population,
        config: LoadConfig,
        clock: Callable[[], float] = time.monotonic,
        rand: random.Random | None = None,
    ) -> None:
        self.api = api
        self.population = population
        self.config = config
        self.clock = clock
        self.log = LoadLog()
        self._rand = rand or random.Random()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._budget = itertools.count()
        self.acked: dict[str, set[str]] = {w.id: set() for w in population.writers}

    def __repr__(self) -> str:
        return f"<ApiLoad {self.log!r}>"

    def start(self) -> None:
        c = self.config
        self._tasks = [
            asyncio.create_task(self._writer(w, i)) for i, w in enumerate(self.population.writers)
        ] + [asyncio.create_task(self._reader(i)) for i in range(c.readers)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _paced(self, interval_s: float) -> bool:
        """Wait for this task's next slot; False when the load is stopping or spent."""
        if self._stopping.is_set() or next(self._budget) >= self.config.max_ops:
            return False
        try:
            await asyncio.wait_for(self._stopping.wait(), interval_s)  # the pacing itself
        except TimeoutError:
            return True
        return False

    async def _writer(self, user: User, index: int) -> None:
        c = self.config
        interval_s = c.writers / c.write_rate_per_s
        targets = list(self.population.targets)
        shift = (index * len(targets)) // max(1, c.writers)
        headers = {"Authorization": f"Bearer {user.token}"}
        for target in targets[shift:] + targets[:shift]:
            if not await self._paced(interval_s):
                return
            key = f"{user.id}>{target}"
            op = await self._request(
                "write", "PUT", f"/v1/users/{user.id}/following/{target}", headers, key=key
            )
            if op.ok:
                self.acked[user.id].add(target)
                await self._read_own_profile(user)

    async def _read_own_profile(self, user: User) -> None:
        expected_at_least = len(self.acked[user.id])
        await self._request(
            "read",
            "GET",
            f"/v1/users/{user.id}",
            check=lambda body: body.get("following_count", 0) < expected_at_least,
        )

    async def _reader(self, index: int) -> None:
        c = self.config
        interval_s = c.readers / c.read_rate_per_s
        users = [w.id for w in self.population.writers] + list(self.population.targets)
        while await self._paced(interval_s):
            user_id = self._rand.choice(users)
            if self._rand.random() < 0.5:
                await self._request("read", "GET", f"/v1/users/{user_id}")
            else:  # a page size other than the default is never cached: a database read
                await self._request("read", "GET", f"/v1/users/{user_id}/following?limit=10")

    async def _request(
        self,
        kind: str,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        key: str = "",
        check: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Op:
        started = self.clock()
        try:
            r = await self.api.request(method, path, headers=headers)
        except httpx.HTTPError as exc:
            op = Op(kind, started, self.clock(), False, None, type(exc).__name__, key)
            self.log.record(op)
            return op
        finished = self.clock()
        ok = 200 <= r.status_code < 300
        error = ""
        if not ok:
            code = ""
            with contextlib.suppress(ValueError, AttributeError):
                code = r.json().get("error", {}).get("code", "")
            error = f"HTTP {r.status_code} {code}".strip()
        stale = bool(ok and check is not None and r.content and check(r.json()))
        op = Op(
            kind,
            started,
            finished,
            ok,
            r.status_code,
            error,
            key,
            served_by=r.headers.get("x-served-by", ""),
            stale=stale,
            marked_stale=r.headers.get("x-data-stale", "").lower() == "true",
        )
        self.log.record(op)
        return op

    async def missing_writes(self, deadline_s: float = 60.0) -> list[str]:
        """Acknowledged follows not listed in ``GET /v1/users/{me}/following`` now (after the
        fault is healed). Raises httpx.HTTPError when the cluster cannot be read."""
        missing: list[str] = []
        end = self.clock() + deadline_s
        for user_id, targets in self.acked.items():
            seen: set[str] = set()
            cursor: str | None = None
            while self.clock() < end:
                params: dict[str, Any] = {"limit": 100}
                if cursor:
                    params["cursor"] = cursor
                r = await self.api.get(f"/v1/users/{user_id}/following", params=params)
                r.raise_for_status()
                body = r.json()
                seen.update(item["id"] for item in body["items"])
                cursor = body.get("next_cursor")
                if not cursor:
                    break
            missing += [f"{user_id}>{t}" for t in sorted(targets - seen)]
        return missing
