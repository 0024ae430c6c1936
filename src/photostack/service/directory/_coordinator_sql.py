"""SQL of the failover coordinator: its tables in the directory database, the fence on data shards.

Directory database:

- ``coordinator_lease``: one row, ``holder`` + ``term`` + ``expires_at``. A node becomes or stays
  leader with one conditional UPDATE (holder is me, or the lease lapsed); the term moves when the
  holder changes. Every map the coordinator publishes is written in a transaction that locks this
  row and checks the holder, so a deposed leader cannot publish.
- ``coordinator_observations``: each directory node's latest probe of each primary.
- ``failovers``: every failover, planned or not, with its timings (history for status and drills).
- ``failover_requests``: ``photostack failover SHARD`` asks through any node; the leader runs it.

Data shards (primaries with replicas): ``shard_fence`` (one row: epoch, ``valid_until``) and a
statement trigger on every table that refuses any write unless the row's lease is valid and, when
the session says which epoch it routes by (``photostack.epoch``), the epochs match. The refusal
is SQLSTATE 25006 (read_only_sql_transaction): the same error a write to a standby gets. Lease
renewals run with ``synchronous_commit = local`` so a missing standby never delays them; they are
also the heartbeat that keeps replicas' replay timestamps fresh.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE_LEASE",
    "DIRECTORY_COORDINATOR_SCHEMA",
    "FENCE_FUNCTION",
    "FENCE_SCHEMA",
    "FENCE_TRIGGER",
    "LEASE_HELD",
    "MISSING_TRIGGERS",
    "PRIMARY_SAMPLE",
    "RENEW_FENCE",
    "REPLICA_SAMPLE",
    "REVOKE_FENCE",
    "SET_FENCE",
    "WRITING_BACKENDS",
]

DIRECTORY_COORDINATOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS coordinator_lease (
    id         int PRIMARY KEY CHECK (id = 1),
    holder     text NOT NULL,
    term       bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO coordinator_lease VALUES (1, '', 0, '-infinity') ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS coordinator_observations (
    observer text NOT NULL,
    target   text NOT NULL,
    ok       boolean NOT NULL,
    at       timestamptz NOT NULL,
    PRIMARY KEY (observer, target)
);
CREATE TABLE IF NOT EXISTS failovers (
    id          bigserial PRIMARY KEY,                 -- serves: newest first
    shard       text NOT NULL,
    planned     boolean NOT NULL,
    from_node   text NOT NULL,
    to_node     text,
    epoch       bigint,
    map_version bigint,
    result      text NOT NULL,                          -- done | refused | failed
    reason      text NOT NULL DEFAULT '',
    down_for_s  double precision,                       -- first seen down -> map published
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS failover_requests (
    shard        text PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now()
);
"""

ACQUIRE_LEASE = """
UPDATE coordinator_lease
   SET term = CASE WHEN holder = $1 AND expires_at > clock_timestamp() THEN term ELSE term + 1 END,
       holder = $1,
       expires_at = clock_timestamp() + make_interval(secs => $2)
 WHERE id = 1 AND (holder = $1 OR expires_at < clock_timestamp())
RETURNING term
"""

LEASE_HELD = """
SELECT term FROM coordinator_lease
 WHERE id = 1 AND holder = $1 AND expires_at > clock_timestamp()
   FOR UPDATE
"""

FENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_fence (
    id          int PRIMARY KEY CHECK (id = 1),
    epoch       bigint NOT NULL,
    valid_until timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL
);
"""

FENCE_FUNCTION = """
CREATE OR REPLACE FUNCTION photostack_fence() RETURNS trigger LANGUAGE plpgsql AS $fence$
DECLARE
    wanted text := current_setting('photostack.epoch', true);
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM shard_fence
         WHERE id = 1 AND valid_until > clock_timestamp()
           AND (coalesce(wanted, '') = '' OR epoch = wanted::bigint)
    ) THEN
        RAISE EXCEPTION 'photostack fence: this node holds no write lease for epoch %',
            coalesce(nullif(wanted, ''), '(any)')
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    RETURN NULL;
END
$fence$;
"""

MISSING_TRIGGERS = """
SELECT c.relname AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND c.relname <> 'shard_fence'
   AND NOT EXISTS (
       SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'photostack_fence'
   )
"""

FENCE_TRIGGER = (
    'CREATE TRIGGER photostack_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON "{table}" '
    "FOR EACH STATEMENT EXECUTE FUNCTION photostack_fence()"
)

# $1 epoch, $2 lease seconds, $3 the coordinator's deadline (Unix seconds at send + lease: a
# renewal delivered late, after a partition heals, never extends the lease past it).
# Only moves forward: a fence of a newer epoch is never overwritten.
SET_FENCE = """
INSERT INTO shard_fence (id, epoch, valid_until, renewed_at)
VALUES (1, $1, least(clock_timestamp() + make_interval(secs => $2), to_timestamp($3)),
        clock_timestamp())
ON CONFLICT (id) DO UPDATE
   SET epoch = excluded.epoch, valid_until = excluded.valid_until, renewed_at = excluded.renewed_at
 WHERE shard_fence.epoch <= excluded.epoch
RETURNING epoch
"""

RENEW_FENCE = """
UPDATE shard_fence
   SET valid_until = least(clock_timestamp() + make_interval(secs => $2), to_timestamp($3)),
       renewed_at = clock_timestamp()
 WHERE id = 1 AND epoch = $1
RETURNING epoch
"""

REVOKE_FENCE = "UPDATE shard_fence SET valid_until = '-infinity' WHERE id = 1"

WRITING_BACKENDS = """
SELECT count(*) FROM pg_stat_activity
 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
"""

PRIMARY_SAMPLE = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS lsn,
       coalesce((SELECT json_agg(json_build_object(
                    'name', application_name,
                    'state', state,
                    'sync_state', sync_state,
                    'lag_bytes', pg_wal_lsn_diff(sent_lsn, replay_lsn),
                    'behind_bytes', pg_wal_lsn_diff(
                        CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END,
                        replay_lsn),
                    'lag_s', extract(epoch from replay_lag)))
                   FROM pg_stat_replication), '[]'::json)::text AS standbys
"""

REPLICA_SAMPLE = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver,
       current_setting('primary_conninfo') AS conninfo
"""
