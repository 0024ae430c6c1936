"""The app's read split against a real primary and streaming replica (service/_replication.py).

Reads go to the replica within the bound; a read-your-writes token the replica has not replayed
sends them to the primary; with the primary gone, cp refuses and ap serves the replica marked
stale; the lag metrics are exported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from photostack.blocks.storage import ReadRefused, format_lsn
from photostack.cluster.engines.testing import PostgresServer
from photostack.service._replication import Replication, _read_after, _stale
from photostack.service.directory import Endpoint, PhysicalShard, initial_map
from photostack.service.directory._routing import epoch_dsn
from tests.component.conftest import streaming_pair

pytestmark = pytest.mark.component


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with streaming_pair(tmp_path, "social-1-primary", "social-1-replica-1") as servers:
        yield servers


@pytest.mark.parametrize("consistency", ["ap", "cp"])
def test_reads_split_follow_tokens_and_the_cap_choice(
    pair: tuple[PostgresServer, PostgresServer], consistency: str
) -> None:
    primary, replica = pair

    async def scenario() -> None:
        shard = PhysicalShard(
            0,
            Endpoint("social-1-primary", primary.dsn()),
            (Endpoint("social-1-replica-1", replica.dsn()),),
        )
        shard_map = initial_map({"social": [shard]})
        pools: list[Any] = []

        async def open_pool(_: str, dsn: str) -> Any:
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=1.0)
            pools.append(pool)
            return pool

        registry = CollectorRegistry()
        policy = {"social": {"consistency": consistency, "max_replica_lag_s": 5.0}}
        layer = Replication(policy, open_pool, registry)
        primary_pool = await open_pool("social", epoch_dsn(primary.dsn(), 1))
        await layer.install(shard_map, {epoch_dsn(primary.dsn(), 1): primary_pool})
        assert layer.router is not None
        reads = layer.router.shards("social")[0]
        query = "SELECT pg_is_in_recovery()"
        try:
            await layer.sample_once()
            assert await reads.fetchval(query) is True  # the replica served it
            assert b"photostack_replica_lag_bytes" in generate_latest(registry)
            lsn = await primary_pool.fetchval("SELECT pg_current_wal_lsn()::text")
            token = _read_after.set({"social-1": (1 << 63) + 1})  # not replayed anywhere
            try:
                assert await reads.fetchval(query) is False  # the primary served it
            finally:
                _read_after.reset(token)
            assert lsn
            await asyncio.to_thread(primary.process.kill)
            await layer.sample_once()
            stale: list[str] = []
            marks = _stale.set(stale)
            try:
                if consistency == "cp":
                    with pytest.raises(ReadRefused):
                        await reads.fetchval(query)
                else:
                    assert await reads.fetchval(query) is True
                    assert stale == ["social-1"]
            finally:
                _stale.reset(marks)
        finally:
            for pool in pools:
                pool.terminate()

    asyncio.run(scenario())


def test_lsn_format_is_what_postgres_prints(pg_server: PostgresServer) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(pg_server.dsn())
        try:
            text = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            value = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")
        finally:
            await conn.close()
        assert format_lsn(int(value)) == text

    asyncio.run(scenario())
