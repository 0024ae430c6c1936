"""Key figures per node for `photostack status` and the dashboard, read in each engine's protocol.

Every read is short and bounded; a node that cannot answer in time shows an ``error`` figure
instead of holding the status call up.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from photostack.cluster.engines import EngineError, postgres_dsn, replication_state
from photostack.cluster.supervisor import ManagedNode
from photostack.cluster.topology import Role

__all__ = ["collect"]

_TIMEOUT_S = 1.0


async def collect(node: ManagedNode) -> dict[str, Any]:
    spec = node.spec
    if spec.role is Role.STORAGE:  # roles change at a failover: ask the server what it is now
        replica = await _replica(spec.host, spec.port)
        if replica.get("in_recovery") is False:
            return await _primary(spec.host, spec.port)
        return replica
    if spec.role is Role.CACHE:
        return await _redis(spec.host, spec.port)
    if spec.role is Role.DIRECTORY:
        return await _directory(spec.host, spec.port)
    if spec.role is Role.WORKER:
        return await _worker(spec.host, spec.port)
    return {}


_WORKER_FIGURES = {
    "photostack_queue_depth": "queue_depth",
    "photostack_queue_oldest_age_seconds": "oldest_age_s",
    "photostack_queue_running": "running",
    "photostack_queue_dead_letters": "dead",
    "photostack_worker_busy": "busy",
}


async def _worker(host: str, port: int) -> dict[str, Any]:
    """Queue depth, oldest age, running and dead tasks (the queue's), and this worker's load,
    from the worker's own /metrics."""
    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
            response = await client.get(f"http://{host}:{port}/metrics")
    except httpx.HTTPError as exc:
        return {"error": str(exc) or type(exc).__name__}
    if response.status_code != 200:
        return {"error": f"HTTP {response.status_code}"}
    figures: dict[str, Any] = {}
    for line in response.text.splitlines():
        name, _, rest = line.partition("{")
        if name in _WORKER_FIGURES and "}" in rest:
            value = rest.rsplit("}", 1)[1].strip()
            try:
                number = float(value)
            except ValueError:
                continue
            figures[_WORKER_FIGURES[name]] = round(number, 3) if "age" in name else int(number)
    return figures


async def _primary(host: str, port: int) -> dict[str, Any]:
    try:
        rows = await replication_state(postgres_dsn(host, port), timeout_s=_TIMEOUT_S)
    except EngineError as exc:
        return {"error": str(exc)}
    return {
        "replicas": {str(r["application_name"]): f"{r['state']}/{r['sync_state']}" for r in rows},
        "lag_bytes": {str(r["application_name"]): _lag(r) for r in rows},  # replication.md
    }


def _lag(row: dict[str, str | None]) -> int | None:
    """Bytes of WAL sent but not replayed yet (docs/replication.md)."""
    from photostack.blocks.storage import parse_lsn

    sent, replay = row.get("sent_lsn"), row.get("replay_lsn")
    if not sent or not replay:
        return None
    return max(0, parse_lsn(sent) - parse_lsn(replay))


async def _replica(host: str, port: int) -> dict[str, Any]:
    query = (
        "select pg_is_in_recovery() as in_recovery, status as wal_receiver, "
        "coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0)::float8 as lag_s "
        "from (select 1) one left join pg_stat_wal_receiver on true"
    )
    try:
        conn = await asyncpg.connect(postgres_dsn(host, port), timeout=_TIMEOUT_S)
        try:
            row = await conn.fetchrow(query, timeout=_TIMEOUT_S)
        finally:
            await conn.close(timeout=_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    assert row is not None
    return {
        "in_recovery": row["in_recovery"],
        "wal_receiver": row["wal_receiver"],
        "replay_age_s": round(row["lag_s"], 3),
    }


async def _redis(host: str, port: int) -> dict[str, Any]:
    client = aioredis.Redis(host=host, port=port, socket_timeout=_TIMEOUT_S)
    try:
        info = await client.info()
        keys = await client.dbsize()
    except (RedisError, OSError) as exc:
        return {"error": str(exc)}
    finally:
        await client.aclose()
    return {
        "keys": keys,
        "used_memory": info.get("used_memory_human"),
        "clients": info.get("connected_clients"),
    }


async def _directory(host: str, port: int) -> dict[str, Any]:
    """The shard map version a directory node serves, and where it last read it."""
    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
            response = await client.get(f"http://{host}:{port}/v1/map/version")
            body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": str(exc) or type(exc).__name__}
    if response.status_code != 200:
        return {"error": f"HTTP {response.status_code}"}
    return {"map_version": body.get("version"), "source": body.get("source")}
