"""The SQL of the cross-shard jobs (service/_jobs.py), each statement registered in
``schema.INDEX_QUERIES`` with the index it uses."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADD_REVERSE",
    "ADVANCE",
    "DELETE_EVENTS",
    "DELETE_PHOTOS",
    "DELETE_SEQ",
    "DELETE_USER",
    "DELETION",
    "DROP_REVERSE",
    "FINISH",
    "FORWARD",
    "FORWARD_EXISTS",
    "LOAD_STATE",
    "PENDING",
    "PHOTO_SCAN",
    "RECORD_DELETION",
    "RELEASE_LEASE",
    "RELEASE_NAME",
    "REVERSE",
    "SAVE_STATE",
    "TRY_LEASE",
    "USERS",
    "USER_FOR_DELETE",
    "Edge",
]

USERS = "SELECT id, username, display_name, created_at FROM users WHERE id = ANY($1::text[])"
USER_FOR_DELETE = "SELECT username FROM users WHERE id = $1 FOR UPDATE"
RECORD_DELETION = (
    "INSERT INTO user_deletions (user_id, username) VALUES ($1, $2) "
    "ON CONFLICT (user_id) DO NOTHING"
)
DELETE_USER = "DELETE FROM users WHERE id = $1"
DELETION = "SELECT user_id, username, stage, requested_at FROM user_deletions WHERE user_id = $1"
PENDING = (
    "SELECT user_id, username, stage FROM user_deletions WHERE done_at IS NULL "
    "ORDER BY requested_at, user_id LIMIT $1"
)
ADVANCE = "UPDATE user_deletions SET stage = $2 WHERE user_id = $1"
FINISH = "UPDATE user_deletions SET stage = 'done', done_at = now() WHERE user_id = $1"
RELEASE_NAME = "DELETE FROM usernames WHERE username = $1 AND user_id = $2"
DELETE_PHOTOS = (
    "DELETE FROM photos WHERE id IN (SELECT id FROM photos WHERE owner_id = $1 LIMIT $2) "
    "RETURNING id"
)
DELETE_EVENTS = "DELETE FROM events WHERE user_id = $1 AND seq <= $2"
DELETE_SEQ = "DELETE FROM event_seqs WHERE user_id = $1"
SAVE_STATE = (
    "INSERT INTO job_state (job, state) VALUES ($1, $2::jsonb) "
    "ON CONFLICT (job) DO UPDATE SET state = EXCLUDED.state, updated_at = now()"
)
LOAD_STATE = "SELECT state::text AS state FROM job_state WHERE job = $1"
TRY_LEASE = "SELECT pg_try_advisory_lock($1)"
RELEASE_LEASE = "SELECT pg_advisory_unlock($1)"
PHOTO_SCAN = "SELECT id, owner_id FROM photos WHERE id > $1 ORDER BY id LIMIT $2"


@dataclass(frozen=True)
class Edge:
    """One side of the follow relation: its table, its other column, and the twin's."""

    table: str
    other: str
    twin_table: str
    twin_other: str

    def scan_sql(self) -> str:
        return (
            f"SELECT user_id, {self.other} AS other, created_at FROM {self.table} "  # noqa: S608
            f"WHERE (user_id, {self.other}) > ($1, $2) ORDER BY user_id, {self.other} LIMIT $3"
        )

    def list_sql(self) -> str:
        return (
            f"SELECT {self.other} AS other FROM {self.table} "  # noqa: S608
            f"WHERE user_id = $1 ORDER BY {self.other} LIMIT $2"
        )

    def twins_sql(self) -> str:
        """Twin rows among (others x users): the reverse side of a batch."""
        return (
            f"SELECT user_id, {self.twin_other} AS other FROM {self.twin_table} "  # noqa: S608
            f"WHERE user_id = ANY($1::text[]) AND {self.twin_other} = ANY($2::text[])"
        )

    def delete_twins_sql(self) -> str:
        return (
            f"DELETE FROM {self.twin_table} "  # noqa: S608
            f"WHERE user_id = ANY($1::text[]) AND {self.twin_other} = $2"
        )

    def delete_own_sql(self) -> str:
        return (
            f"DELETE FROM {self.table} "  # noqa: S608
            f"WHERE user_id = $1 AND {self.other} = ANY($2::text[])"
        )


FORWARD = Edge("following", "target_id", "followers", "follower_id")
REVERSE = Edge("followers", "follower_id", "following", "target_id")
ADD_REVERSE = (
    "INSERT INTO followers (user_id, follower_id, created_at) VALUES ($1, $2, $3) "
    "ON CONFLICT (user_id, follower_id) DO NOTHING"
)
FORWARD_EXISTS = "SELECT created_at FROM following WHERE user_id = $1 AND target_id = $2"
DROP_REVERSE = "DELETE FROM followers WHERE user_id = $1 AND follower_id = $2"
