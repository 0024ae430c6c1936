"""Domain logic for users and follows over the sharded storage groups.

``users``  : users rows on shard(user id); usernames claims on shard(username).
``social`` : following(user, target) on shard(user); followers(user, follower) on shard(user).
``photos`` : photos on shard(owner id).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from photostack.blocks.storage import ShardRouter

from ._codec import Cursor, format_time, new_id
from ._events import EventStore, follower_event_data
from .directory import NO_GUARD, OwnershipGuard

__all__ = [
    "DomainError",
    "EdgeKind",
    "Page",
    "SelfFollowError",
    "UserNotFoundError",
    "UserStore",
    "UsernameTakenError",
]

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

T = TypeVar("T")


class DomainError(Exception):
    """Root of the domain's refusals (each maps to one HTTP status)."""


class UsernameTakenError(DomainError):
    pass


class UserNotFoundError(DomainError):
    pass


class SelfFollowError(DomainError):
    pass


class EdgeKind(enum.Enum):
    """Which adjacency list of a user: (table, column naming the other user)."""

    FOLLOWING = ("following", "target_id")
    FOLLOWERS = ("followers", "follower_id")

    @property
    def table(self) -> str:
        return self.value[0]

    @property
    def other(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: Cursor | None


def _user_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "username": row["username"],
        "display_name": row["display_name"],
        "created_at": format_time(row["created_at"]),
    }


class UserStore:
    """Users and follows; every method is a few single-shard statements, run concurrently."""

    def __init__(
        self,
        router: ShardRouter[Pool],
        events: EventStore | None = None,
        *,
        reads: ShardRouter[Any] | None = None,
        guard: OwnershipGuard = NO_GUARD,
    ) -> None:
        self._router = router
        self._events = events  # follow produces follower.new to the followee when set
        # Every write runs in a transaction behind the ownership fence (directory/_guard.py): a
        # shard that gave the key's logical shard away (a reshard) answers "wrong shard".
        self._guard = guard
        # Reads: replicas within their group's lag bound, else the primary (replication.md).
        self._reads: ShardRouter[Any] = reads if reads is not None else router

    async def _guarded(
        self, group: str, keys: Sequence[str], action: Callable[[Any], Awaitable[T]]
    ) -> T:
        """``action(conn)`` in one transaction on the shard of ``keys[0]``, every key's ownership
        verified first (the keys share that shard); retried on a refreshed map."""

        async def attempt() -> T:
            pool = self._router.shard_for(group, keys[0])
            async with pool.acquire() as conn, conn.transaction():
                for key in keys:
                    await self._guard.verify(conn, group, key)
                return await action(conn)

        return await self._guard.retrying(attempt)

    # -- users ---------------------------------------------------------------------------------

    async def create_user(self, username: str, display_name: str | None) -> dict[str, Any]:
        """Claim ``username`` then write the user. Raises UsernameTakenError."""
        user_id = new_id()
        claim_sql = (
            "INSERT INTO usernames (username, user_id) VALUES ($1, $2) "
            "ON CONFLICT (username) DO NOTHING RETURNING user_id"
        )
        insert_sql = (
            "INSERT INTO users (id, username, display_name) VALUES ($1, $2, $3) "
            "RETURNING id, username, display_name, created_at"
        )

        async def claim(conn: Any) -> None:
            if await conn.fetchval(claim_sql, username, user_id) is None:
                raise UsernameTakenError(username)

        async def insert(conn: Any) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                insert_sql, user_id, username, display_name
            )
            return row

        async def release(conn: Any) -> None:
            await conn.execute(
                "DELETE FROM usernames WHERE username = $1 AND user_id = $2", username, user_id
            )

        async def claim_first() -> asyncpg.Record | None:
            # One attempt on the map of that attempt (a reshard may split or join the name's
            # and the id's shards between attempts): on one shard the claim and the row commit
            # together (the row is returned); on two, only the claim (None).
            pool = self._router.shard_for("users", username)
            together = pool is self._router.shard_for("users", user_id)
            async with pool.acquire() as conn, conn.transaction():
                await self._guard.verify(conn, "users", username)
                await claim(conn)
                if not together:
                    return None
                await self._guard.verify(conn, "users", user_id)
                return await insert(conn)

        row = await self._guard.retrying(claim_first)
        if row is None:  # two shards: the claim is the unique point; release it on failure
            try:
                row = await self._guarded("users", (user_id,), insert)
            except BaseException:
                # behind the fence like the claim: a reshard moving the name's logical shard
                # meanwhile gets the release on the name's new owner, never a lost delete
                await asyncio.shield(self._guarded("users", (username,), release))
                raise
        assert row is not None
        return _user_json(row)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        """The public user object with counts. Raises UserNotFoundError."""
        users = await self.users_with_counts([user_id])
        if not users:
            raise UserNotFoundError(user_id)
        return users[0]

    async def get_user_by_username(self, username: str) -> dict[str, Any]:
        """Raises UserNotFoundError."""
        pool = self._reads.shard_for("users", username)
        user_id = await pool.fetchval("SELECT user_id FROM usernames WHERE username = $1", username)
        if user_id is None:
            raise UserNotFoundError(username)
        return await self.get_user(user_id)

    async def users_with_counts(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Public user objects for ``ids`` that exist, in the order given."""
        if not ids:
            return []
        rows, followers, following, photos = await asyncio.gather(
            self._fetch_users(ids),
            self._counts("social", "followers", "user_id", ids),
            self._counts("social", "following", "user_id", ids),
            self._counts("photos", "photos", "owner_id", ids),
        )
        out = []
        for user_id in ids:
            row = rows.get(user_id)
            if row is None:
                continue
            user = _user_json(row)
            user["followers_count"] = followers.get(user_id, 0)
            user["following_count"] = following.get(user_id, 0)
            user["photos_count"] = photos.get(user_id, 0)
            out.append(user)
        return out

    async def _fetch_users(self, ids: Sequence[str]) -> dict[str, asyncpg.Record]:
        shards = self._reads.shards("users")
        parts = self._reads.split_by_shard("users", ids)
        results = await asyncio.gather(
            *(
                shards[index].fetch(
                    "SELECT id, username, display_name, created_at FROM users "
                    "WHERE id = ANY($1::text[])",
                    keys,
                )
                for index, keys in parts.items()
            )
        )
        return {row["id"]: row for rows in results for row in rows}

    async def _counts(
        self, group: str, table: str, column: str, ids: Sequence[str]
    ) -> dict[str, int]:
        shards = self._reads.shards(group)
        parts = self._reads.split_by_shard(group, ids)
        # table/column come from this module's constants, never from input
        sql = (
            f"SELECT {column} AS key, count(*) AS n FROM {table} "  # noqa: S608
            f"WHERE {column} = ANY($1::text[]) GROUP BY {column}"
        )
        results = await asyncio.gather(
            *(shards[index].fetch(sql, keys) for index, keys in parts.items())
        )
        return {row["key"]: int(row["n"]) for rows in results for row in rows}

    async def _require_users(self, *ids: str) -> dict[str, asyncpg.Record]:
        found = await self._fetch_users(ids)
        for user_id in ids:
            if user_id not in found:
                raise UserNotFoundError(user_id)
        return found

    # -- follows -------------------------------------------------------------------------------

    async def follow(self, user_id: str, target_id: str) -> None:
        """Idempotent. Forward edge first, then the reverse edge with the same timestamp.

        Raises SelfFollowError, UserNotFoundError. A repeat call repairs a half-written pair.
        """
        if user_id == target_id:
            raise SelfFollowError(user_id)
        found = await self._require_users(user_id, target_id)

        async def forward(conn: Any) -> datetime | None:
            made: datetime | None = await conn.fetchval(
                "INSERT INTO following (user_id, target_id) VALUES ($1, $2) "
                "ON CONFLICT (user_id, target_id) DO NOTHING RETURNING created_at",
                user_id,
                target_id,
            )
            if made is None:  # None again: unfollowed concurrently, that later request wins
                made = await conn.fetchval(
                    "SELECT created_at FROM following WHERE user_id = $1 AND target_id = $2",
                    user_id,
                    target_id,
                )
            return made

        created_at = await self._guarded("social", (user_id,), forward)
        if created_at is None:
            return

        stamp: datetime = created_at

        async def reverse(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO followers (user_id, follower_id, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (user_id, follower_id) DO NOTHING",
                target_id,
                user_id,
                stamp,
            )

        await self._guarded("social", (target_id,), reverse)
        if self._events is not None:  # keyed by the edge: a repeat call produces it at most once
            await self._events.produce(
                target_id,
                "follower.new",
                follower_event_data(_user_json(found[user_id])),
                dedupe_key=f"follow:{user_id}:{created_at.isoformat()}",
            )

    async def unfollow(self, user_id: str, target_id: str) -> None:
        """Idempotent. Deletes the reverse edge first, then the forward edge."""

        async def reverse(conn: Any) -> None:
            await conn.execute(
                "DELETE FROM followers WHERE user_id = $1 AND follower_id = $2", target_id, user_id
            )

        async def forward(conn: Any) -> None:
            await conn.execute(
                "DELETE FROM following WHERE user_id = $1 AND target_id = $2", user_id, target_id
            )

        await self._guarded("social", (target_id,), reverse)
        await self._guarded("social", (user_id,), forward)

    async def list_edges(
        self, kind: EdgeKind, user_id: str, limit: int, after: Cursor | None
    ) -> Page:
        """One page of ``user_id``'s following or followers, newest edge first.

        Raises UserNotFoundError.
        """
        pool = self._reads.shard_for("social", user_id)
        table, other = kind.table, kind.other
        base = f"SELECT {other} AS other, created_at FROM {table} WHERE user_id = $1"  # noqa: S608
        order = f" ORDER BY created_at DESC, {other} DESC LIMIT $2"
        if after is None:
            edges_q = pool.fetch(base + order, user_id, limit + 1)
        else:
            edges_q = pool.fetch(
                base + f" AND (created_at, {other}) < ($3, $4)" + order,
                user_id,
                limit + 1,
                after.created_at,
                after.id,
            )
        _, edges = await asyncio.gather(self._require_users(user_id), edges_q)
        page_edges = edges[:limit]
        next_cursor = None
        if len(edges) > limit:
            last = page_edges[-1]
            next_cursor = Cursor(last["created_at"], last["other"])
        items = await self.users_with_counts([edge["other"] for edge in page_edges])
        return Page(items, next_cursor)
