"""SQL schema of each storage group, applied idempotently and safely under concurrency.

Each group's schema is an ordered list of migrations. :func:`apply_schema` takes a transaction-level
advisory lock, so any number of app nodes (and the cluster) may call it at once; every statement is
``IF NOT EXISTS`` besides, and ``schema_version`` records what has been applied.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import asyncpg.pool

__all__ = ["GROUPS", "SCHEMA_VERSION", "apply_schema", "apply_schema_on"]

# One fixed key for pg_advisory_xact_lock: "photostack schema" in ASCII, truncated to 63 bits.
_LOCK_KEY = 0x70686F746F736368

_USERS_V1 = """
CREATE TABLE IF NOT EXISTS users (
    id           text PRIMARY KEY,          -- serves: GET /v1/users/{id} (lookup by id)
    username     text NOT NULL,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
-- Usernames are unique across every users shard: this table is sharded by username, and its
-- primary key is the race-safe claim taken before the user row is written.
CREATE TABLE IF NOT EXISTS usernames (
    username   text PRIMARY KEY,            -- serves: GET /v1/users/by-username/{u}, 409 on claim
    user_id    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

_SOCIAL_V1 = """
-- Forward edge, on the follower's shard.
CREATE TABLE IF NOT EXISTS following (
    user_id    text NOT NULL,
    target_id  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, target_id)        -- serves: idempotent follow/unfollow, following_count
);
-- serves: GET /v1/users/{id}/following, newest edge first, keyset on (created_at, target_id)
CREATE INDEX IF NOT EXISTS following_by_recent
    ON following (user_id, created_at DESC, target_id DESC);

-- Denormalized reverse edge, on the followee's shard, so the followers list is a one-shard read.
CREATE TABLE IF NOT EXISTS followers (
    user_id     text NOT NULL,
    follower_id text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, follower_id)      -- serves: idempotent follow/unfollow, followers_count
);
-- serves: GET /v1/users/{id}/followers, newest edge first, keyset on (created_at, follower_id)
CREATE INDEX IF NOT EXISTS followers_by_recent
    ON followers (user_id, created_at DESC, follower_id DESC);
"""

_PHOTOS_V1 = """
CREATE TABLE IF NOT EXISTS photos (
    id            text PRIMARY KEY,         -- serves: GET/DELETE /v1/photos/{id}
    owner_id      text NOT NULL,
    caption       text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    status        text NOT NULL DEFAULT 'processing'
                  CHECK (status IN ('processing', 'ready', 'failed')),
    content_type  text,
    size_bytes    bigint,
    original_key  text,
    thumbnail_key text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- serves: photos_count of a user and GET /v1/users/{id}/photos, newest first (keyset)
CREATE INDEX IF NOT EXISTS photos_by_owner_recent
    ON photos (owner_id, created_at DESC, id DESC);
"""

# group -> ordered migrations (version, sql). Append, never edit, once released.
_MIGRATIONS: dict[str, tuple[tuple[int, str], ...]] = {
    "users": ((1, _USERS_V1),),
    "social": ((1, _SOCIAL_V1),),
    "photos": ((1, _PHOTOS_V1),),
}

GROUPS: tuple[str, ...] = tuple(_MIGRATIONS)
SCHEMA_VERSION: dict[str, int] = {g: steps[-1][0] for g, steps in _MIGRATIONS.items()}

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    group_name text NOT NULL,
    version    integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, version)
)
"""


async def apply_schema_on(
    conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any], group: str
) -> int:
    """Bring ``group``'s schema up to date on one connection; returns the version now in place.

    Raises KeyError for an unknown group and asyncpg errors from the server.
    """
    steps = _MIGRATIONS[group]
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_VERSION_TABLE)
        current = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_version WHERE group_name = $1", group
        )
        for version, sql in steps:
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_version (group_name, version) VALUES ($1, $2)",
                group,
                version,
            )
    return steps[-1][0]


async def apply_schema(group: str, dsn: str) -> int:
    """Create or upgrade ``group``'s tables on the database at ``dsn`` (a libpq URL).

    Idempotent and safe to call from many processes at once. Returns the schema version.
    Raises KeyError for an unknown group, OSError / asyncpg errors when the server fails.
    """
    if group not in _MIGRATIONS:
        raise KeyError(f"unknown storage group {group!r}; known: {', '.join(GROUPS)}")
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_schema_on(conn, group)
    finally:
        await conn.close()
