"""Online resharding's SQL and records: the directory's ``reshard_moves`` table, the sources'
change capture, statement builders over :data:`GROUP_TABLES`, and :class:`MoveRecord`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ._reshard_plan import MoveKind, MoveState, Table

__all__ = [
    "CAPTURE",
    "RESHARD_SCHEMA",
    "RETRYABLE",
    "SELECT_MOVES",
    "TRIGGER",
    "MoveRecord",
    "ReshardConfig",
    "by_pk",
    "delete_sql",
    "page_sql",
    "record",
    "select_sql",
    "upsert_sql",
]

RETRYABLE: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

# Directory database: one row per move; at most one move is active at a time.
RESHARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS reshard_moves (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    group_name text NOT NULL,
    state      text NOT NULL,
    plan       jsonb NOT NULL,
    progress   jsonb NOT NULL DEFAULT '{}',
    error      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS reshard_moves_one_active ON reshard_moves ((true))
    WHERE state NOT IN ('done', 'cancelled');
"""

# Source shards, for the duration of a move only.
CAPTURE = """
CREATE TABLE IF NOT EXISTS reshard_changes (
    id      bigserial PRIMARY KEY,
    tbl     text NOT NULL,
    row_key jsonb NOT NULL
);
CREATE OR REPLACE FUNCTION photostack_reshard_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO reshard_changes (tbl, row_key) VALUES (TG_TABLE_NAME, to_jsonb(OLD));
    ELSE
        INSERT INTO reshard_changes (tbl, row_key) VALUES (TG_TABLE_NAME, to_jsonb(NEW));
    END IF;
    RETURN NULL;
END $$;
"""
TRIGGER = "photostack_reshard_capture"


@dataclass(frozen=True)
class ReshardConfig:
    batch_rows: int = 500
    grace_s: float = 3.0  # after publishing: apps polling the old map still read the sources
    retry_max_s: float = 2.0
    catch_up_rounds: int = 20


@dataclass
class MoveRecord:
    id: int
    kind: MoveKind
    group: str
    state: MoveState
    plan: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def moves(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.plan["moves"].items()}

    def removed(self) -> dict[str, Any] | None:
        """A remove-shard's shard: its 1-based number when planned and its primary's name."""
        index = self.plan.get("removed_shard")
        if index is None:
            return None
        names = self.plan.get("members", {}).get(str(index), [])
        return {"number": int(index) + 1, "name": names[0] if names else None}

    def retired_nodes(self) -> list[str]:
        """The node names (primary and replicas) of the shard a remove-shard empties."""
        index = self.plan.get("removed_shard")
        if index is None:
            return []
        return [str(n) for n in self.plan.get("members", {}).get(str(index), [])]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "group": self.group,
            "state": self.state.value,
            "moves": len(self.plan["moves"]),
            "logical_shards": self.plan["logical_shards"],
            "shards_before": self.plan["shard_count"],
            "new_shard": self.plan.get("new_endpoint"),
            "removed_shard": self.removed(),
            "progress": {k: v for k, v in self.progress.items() if k not in ("cursors", "replay")},
            "error": self.error,
        }


def record(row: asyncpg.Record) -> MoveRecord:
    return MoveRecord(
        int(row["id"]),
        MoveKind(row["kind"]),
        row["group_name"],
        MoveState(row["state"]),
        json.loads(row["plan"]),
        json.loads(row["progress"]),
        row["error"],
    )


SELECT_MOVES = (
    "SELECT id, kind, group_name, state, plan::text AS plan, progress::text AS progress, error"
)


def _cols(names: Sequence[str]) -> str:
    return ", ".join(names)


def _params(count: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + count))


def page_sql(table: Table, first: bool) -> str:
    pk = _cols(table.pk)
    n = len(table.pk)
    if first:
        return f"SELECT * FROM {table.name} ORDER BY {pk} LIMIT $1"  # noqa: S608 - our names
    return (
        f"SELECT * FROM {table.name} WHERE ({pk}) > ({_params(n)}) "  # noqa: S608
        f"ORDER BY {pk} LIMIT ${n + 1}"
    )


def upsert_sql(table: Table, columns: Sequence[str]) -> str:
    rest = [c for c in columns if c not in table.pk]
    action = (
        "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in rest) if rest else "DO NOTHING"
    )
    return (
        f"INSERT INTO {table.name} ({_cols(columns)}) VALUES ({_params(len(columns))}) "  # noqa: S608
        f"ON CONFLICT ({_cols(table.pk)}) {action}"
    )


def by_pk(table: Table) -> str:
    return " AND ".join(f"{c} = ${i}" for i, c in enumerate(table.pk, 1))


def select_sql(table: Table) -> str:
    return f"SELECT * FROM {table.name} WHERE {by_pk(table)}"  # noqa: S608 - our names


def delete_sql(table: Table) -> str:
    return f"DELETE FROM {table.name} WHERE {by_pk(table)}"  # noqa: S608 - our names
