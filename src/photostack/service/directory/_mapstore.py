"""The shard map's durable home: a ``shard_maps`` table in the directory group's own database.

Every version ever published is a row (the history a reshard can be audited and rolled forward
from); the current map is the row with the highest version. Writes take one advisory lock, so
two directory nodes publishing at once serialise, and the loser of a race gets StaleMapError.
Reads may go to a streaming replica when the primary is down (the map is then at most as stale
as the replica's replay).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import asyncpg

from ._errors import StaleMapError
from ._map import ClusterMap, check_successor

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

__all__ = ["DIRECTORY_SCHEMA", "MapStore", "apply_directory_schema"]

_LOCK_KEY = 0x70686F746F646972  # "photodir"

DIRECTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_maps (
    version    bigint PRIMARY KEY,          -- serves: current version (max), current map
    body       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


async def apply_directory_schema(conn: Conn) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(DIRECTORY_SCHEMA)


class MapStore:
    """Reads and writes shard maps through one connection (pool connection or plain)."""

    @staticmethod
    async def current_version(conn: Conn) -> int:
        value = await conn.fetchval("SELECT coalesce(max(version), 0) FROM shard_maps")
        return int(value)

    @staticmethod
    async def current(conn: Conn) -> ClusterMap | None:
        row = await conn.fetchrow(
            "SELECT body::text AS body FROM shard_maps ORDER BY version DESC LIMIT 1"
        )
        return None if row is None else ClusterMap.from_json(json.loads(row["body"]))

    @staticmethod
    async def publish(conn: Conn, proposed: ClusterMap) -> None:
        """Store ``proposed`` as the new current map. Raises StaleMapError."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            current = await MapStore.current(conn)
            check_successor(current, proposed)
            await _insert(conn, proposed)

    @staticmethod
    async def initialise(conn: Conn, first: ClusterMap) -> ClusterMap:
        """Store ``first`` if there is no map yet; return the current map either way."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            current = await MapStore.current(conn)
            if current is not None:
                return current
            await _insert(conn, first)
            return first


async def _insert(conn: Conn, new: ClusterMap) -> None:
    try:
        await conn.execute(
            "INSERT INTO shard_maps (version, body) VALUES ($1, $2::jsonb)",
            new.version,
            json.dumps(new.to_json()),
        )
    except asyncpg.UniqueViolationError as exc:
        raise StaleMapError(f"version {new.version} exists already") from exc
