"""SQL schema of each storage group, applied idempotently and safely under concurrency.

Each group's schema is an ordered list of migrations. :func:`apply_schema` takes a transaction-level
advisory lock, so any number of app nodes (and the cluster) may call it at once; every statement is
``IF NOT EXISTS`` besides, and ``schema_version`` records what has been applied.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import asyncpg.pool

__all__ = [
    "GROUPS",
    "INDEX_QUERIES",
    "NO_INDEX",
    "SCHEMA_VERSION",
    "apply_schema",
    "apply_schema_on",
]

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

# Per-user event log (API.md "Real-time events"), on the user's own users shard. The counter row
# is the per-user lock that makes seq allocation atomic and commit order equal seq order.
_USERS_V2_EVENTS = """
CREATE TABLE IF NOT EXISTS event_seqs (
    user_id  text PRIMARY KEY,
    last_seq bigint NOT NULL                -- serves: seq allocation (UPDATE ... RETURNING)
);
CREATE TABLE IF NOT EXISTS events (
    user_id    text NOT NULL,
    seq        bigint NOT NULL,
    type       text NOT NULL,
    data       jsonb NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    dedupe_key text,                        -- a producer's idempotency key (repeat follow)
    PRIMARY KEY (user_id, seq)              -- serves: GET /v1/events?after= (range on seq)
);
-- serves: producing an event at most once per key
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe
    ON events (user_id, dedupe_key) WHERE dedupe_key IS NOT NULL;
-- serves: trimming by age (bounded batches, oldest first)
CREATE INDEX IF NOT EXISTS events_by_age ON events (at);
"""

# Every data group (docs/directory.md): the logical shards this shard owns, for the "wrong
# shard" check a guarded write makes in its own transaction (written at the first `up`).
_OWNERSHIP = """
CREATE TABLE IF NOT EXISTS shard_ownership (
    logical_shard integer PRIMARY KEY,      -- serves: ownership check of a guarded write
    map_version   bigint NOT NULL
);
"""

# Referential integrity in app code (service/_jobs.py): user deletions in progress (the cleanup
# job's resumable record, on the deleted user's users shard) and periodic jobs' saved cursors.
_USERS_V3_JOBS = """
CREATE TABLE IF NOT EXISTS user_deletions (
    user_id      text PRIMARY KEY,          -- serves: record / advance / finish a deletion
    username     text NOT NULL,
    stage        text NOT NULL DEFAULT 'username',
    requested_at timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);
-- serves: the cleanup job's scan for unfinished deletions, oldest first
CREATE INDEX IF NOT EXISTS user_deletions_pending
    ON user_deletions (requested_at, user_id) WHERE done_at IS NULL;
CREATE TABLE IF NOT EXISTS job_state (
    job        text PRIMARY KEY,            -- serves: a job's saved cursor
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

# Content-addressed media (docs/uploads.md "Shared files"): byte-identical uploads share one
# key, so a photo's cleanup deletes a file only when no photo row on any shard still refers to
# it (original or thumbnail); and the reason a photo failed, shown on failed photos.
_PHOTOS_V3_MEDIA_REFS = """
ALTER TABLE photos ADD COLUMN IF NOT EXISTS failure_reason text;
-- serves: the cleanup's "is this key still referenced?" lookup (scatter over the shards)
CREATE INDEX IF NOT EXISTS photos_by_original_key ON photos (original_key);
CREATE INDEX IF NOT EXISTS photos_by_thumbnail_key ON photos (thumbnail_key);
"""

# group -> ordered migrations (version, sql). Append, never edit, once released.
_MIGRATIONS: dict[str, tuple[tuple[int, str], ...]] = {
    "users": ((1, _USERS_V1), (2, _USERS_V2_EVENTS), (3, _OWNERSHIP + _USERS_V3_JOBS)),
    "social": ((1, _SOCIAL_V1), (2, _OWNERSHIP)),
    "photos": ((1, _PHOTOS_V1), (2, _OWNERSHIP), (3, _PHOTOS_V3_MEDIA_REFS)),
}

GROUPS: tuple[str, ...] = tuple(_MIGRATIONS)
SCHEMA_VERSION: dict[str, int] = {g: steps[-1][0] for g, steps in _MIGRATIONS.items()}

# Indexes tied to queries (issue 4, item 5): index -> the statements it serves, exactly as the
# app sends them (whitespace aside). tests/component/test_indexes.py records what the stores
# send, EXPLAINs each statement on loaded tables and checks the plan uses a registered index,
# that every index exists here, and that every statement here is one the app runs.
# A new query or index lands together with its line here. NO_INDEX lists statements that read
# no index (plain inserts); an index with no statement is there for its constraint alone.
NO_INDEX = "(no index)"
INDEX_QUERIES: dict[str, tuple[str, ...]] = {
    "users_pkey": (
        "SELECT id, username, display_name, created_at FROM users WHERE id = ANY($1::text[])",
    ),
    "usernames_pkey": (
        "INSERT INTO usernames (username, user_id) VALUES ($1, $2) "
        "ON CONFLICT (username) DO NOTHING RETURNING user_id",
        "SELECT user_id FROM usernames WHERE username = $1",
        "DELETE FROM usernames WHERE username = $1 AND user_id = $2",
    ),
    "following_pkey": (
        "INSERT INTO following (user_id, target_id) VALUES ($1, $2) "
        "ON CONFLICT (user_id, target_id) DO NOTHING RETURNING created_at",
        "SELECT created_at FROM following WHERE user_id = $1 AND target_id = $2",
        "DELETE FROM following WHERE user_id = $1 AND target_id = $2",
        "SELECT user_id AS key, count(*) AS n FROM following "
        "WHERE user_id = ANY($1::text[]) GROUP BY user_id",
    ),
    "following_by_recent": (
        # following_count: either index serves (both lead with user_id); the planner picks
        "SELECT user_id AS key, count(*) AS n FROM following "
        "WHERE user_id = ANY($1::text[]) GROUP BY user_id",
        "SELECT target_id AS other, created_at FROM following WHERE user_id = $1 "
        "ORDER BY created_at DESC, target_id DESC LIMIT $2",
        "SELECT target_id AS other, created_at FROM following WHERE user_id = $1 "
        "AND (created_at, target_id) < ($3, $4) ORDER BY created_at DESC, target_id DESC LIMIT $2",
    ),
    "followers_pkey": (
        "INSERT INTO followers (user_id, follower_id, created_at) VALUES ($1, $2, $3) "
        "ON CONFLICT (user_id, follower_id) DO NOTHING",
        "DELETE FROM followers WHERE user_id = $1 AND follower_id = $2",
        "SELECT user_id AS key, count(*) AS n FROM followers "
        "WHERE user_id = ANY($1::text[]) GROUP BY user_id",
    ),
    "followers_by_recent": (
        # followers_count: either index serves (both lead with user_id); the planner picks
        "SELECT user_id AS key, count(*) AS n FROM followers "
        "WHERE user_id = ANY($1::text[]) GROUP BY user_id",
        "SELECT follower_id AS other, created_at FROM followers WHERE user_id = $1 "
        "ORDER BY created_at DESC, follower_id DESC LIMIT $2",
        "SELECT follower_id AS other, created_at FROM followers WHERE user_id = $1 "
        "AND (created_at, follower_id) < ($3, $4) "
        "ORDER BY created_at DESC, follower_id DESC LIMIT $2",
    ),
    "photos_pkey": (),  # photo ids unique; GET/DELETE /v1/photos/{id} will read by it
    "photos_by_owner_recent": (
        "SELECT owner_id AS key, count(*) AS n FROM photos "
        "WHERE owner_id = ANY($1::text[]) GROUP BY owner_id",
    ),
    "event_seqs_pkey": (
        "INSERT INTO event_seqs (user_id, last_seq) VALUES ($1, 1) "
        "ON CONFLICT (user_id) DO UPDATE SET last_seq = event_seqs.last_seq + 1 "
        "RETURNING last_seq",
    ),
    "events_pkey": (
        "SELECT seq, type, data::text AS data, at FROM events "
        "WHERE user_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        "DELETE FROM events WHERE user_id = $1 AND seq <= $2",
    ),
    "events_dedupe": (
        "INSERT INTO events (user_id, seq, type, data, dedupe_key) "
        "VALUES ($1, $2, $3, $4::jsonb, $5) "
        "ON CONFLICT (user_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING "
        "RETURNING at",
    ),
    "events_by_age": (
        "DELETE FROM events WHERE ctid IN (SELECT ctid FROM events "
        "WHERE at < now() - make_interval(secs => $1) LIMIT $2)",
    ),
    NO_INDEX: (
        "INSERT INTO users (id, username, display_name) VALUES ($1, $2, $3) "
        "RETURNING id, username, display_name, created_at",
    ),
}

# Photos (service/_photos.py), the ownership guard (service/directory/_guard.py) and the
# cross-shard jobs (service/_jobs.py): merged into INDEX_QUERIES, same rules.
_MORE_INDEX_QUERIES: dict[str, tuple[str, ...]] = {
    "photos_pkey": (
        "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
        "failure_reason FROM photos WHERE id = $1",
        "DELETE FROM photos WHERE id = $1 AND owner_id = $2 RETURNING original_key, thumbnail_key",
        "UPDATE photos SET status = $3, thumbnail_key = coalesce($4, thumbnail_key), "
        "failure_reason = $5, updated_at = now() WHERE id = $1 AND status = $2 "
        "RETURNING id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
        "failure_reason",
        # the orphan sweeper's keyset scan
        "SELECT id, owner_id FROM photos WHERE id > $1 ORDER BY id LIMIT $2",
    ),
    "photos_by_owner_recent": (
        "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
        "failure_reason FROM photos WHERE owner_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        "SELECT id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
        "failure_reason FROM photos WHERE owner_id = $1 AND (created_at, id) < ($3, $4) "
        "ORDER BY created_at DESC, id DESC LIMIT $2",
        # user cleanup: a deleted owner's photos, a bounded batch at a time
        "DELETE FROM photos WHERE id IN (SELECT id FROM photos WHERE owner_id = $1 LIMIT $2) "
        "RETURNING id",
    ),
    # a photo's cleanup: is a media key still referenced (scattered over every photos shard)?
    "photos_by_original_key": (
        "SELECT original_key AS key FROM photos WHERE original_key = ANY($1::text[])",
    ),
    "photos_by_thumbnail_key": (
        "SELECT thumbnail_key AS key FROM photos WHERE thumbnail_key = ANY($1::text[])",
    ),
    "shard_ownership_pkey": (
        "SELECT map_version FROM shard_ownership WHERE logical_shard = $1 FOR SHARE",
    ),
    "users_pkey": (
        "SELECT username FROM users WHERE id = $1 FOR UPDATE",
        "DELETE FROM users WHERE id = $1",
    ),
    "user_deletions_pkey": (
        "INSERT INTO user_deletions (user_id, username) VALUES ($1, $2) "
        "ON CONFLICT (user_id) DO NOTHING",
        "SELECT user_id, username, stage, requested_at FROM user_deletions WHERE user_id = $1",
        "UPDATE user_deletions SET stage = $2 WHERE user_id = $1",
        "UPDATE user_deletions SET stage = 'done', done_at = now() WHERE user_id = $1",
    ),
    "user_deletions_pending": (
        "SELECT user_id, username, stage FROM user_deletions WHERE done_at IS NULL "
        "ORDER BY requested_at, user_id LIMIT $1",
    ),
    "job_state_pkey": (
        "INSERT INTO job_state (job, state) VALUES ($1, $2::jsonb) "
        "ON CONFLICT (job) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
    ),
    "event_seqs_pkey": ("DELETE FROM event_seqs WHERE user_id = $1",),
    "following_pkey": (
        "SELECT user_id, target_id AS other, created_at FROM following "
        "WHERE (user_id, target_id) > ($1, $2) ORDER BY user_id, target_id LIMIT $3",
        "SELECT target_id AS other FROM following WHERE user_id = $1 ORDER BY target_id LIMIT $2",
        "SELECT user_id, target_id AS other FROM following "
        "WHERE user_id = ANY($1::text[]) AND target_id = ANY($2::text[])",
        "DELETE FROM following WHERE user_id = ANY($1::text[]) AND target_id = $2",
        "DELETE FROM following WHERE user_id = $1 AND target_id = ANY($2::text[])",
    ),
    "followers_pkey": (
        "SELECT user_id, follower_id AS other, created_at FROM followers "
        "WHERE (user_id, follower_id) > ($1, $2) ORDER BY user_id, follower_id LIMIT $3",
        "SELECT follower_id AS other FROM followers WHERE user_id = $1 "
        "ORDER BY follower_id LIMIT $2",
        "SELECT user_id, follower_id AS other FROM followers "
        "WHERE user_id = ANY($1::text[]) AND follower_id = ANY($2::text[])",
        "DELETE FROM followers WHERE user_id = ANY($1::text[]) AND follower_id = $2",
        "DELETE FROM followers WHERE user_id = $1 AND follower_id = ANY($2::text[])",
    ),
    NO_INDEX: (
        "INSERT INTO photos (id, owner_id, caption, status, content_type, size_bytes, "
        "original_key) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "RETURNING id, owner_id, caption, created_at, status, original_key, thumbnail_key, "
        "failure_reason",
        # a shard's newest ownership version: at most L rows, read only on a wrong-shard answer
        "SELECT coalesce(max(map_version), 0) FROM shard_ownership",
        # one row per job (three): a sequential scan of one page is the right plan
        "SELECT state::text AS state FROM job_state WHERE job = $1",
        "SELECT pg_try_advisory_lock($1)",  # job leases: no table
        "SELECT pg_advisory_unlock($1)",
    ),
}
for _index, _queries in _MORE_INDEX_QUERIES.items():
    INDEX_QUERIES[_index] = INDEX_QUERIES.get(_index, ()) + _queries

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
