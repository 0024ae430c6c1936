"""The failover coordinator against real Postgres: a synchronous shard (primary + 2 replicas).

One scenario, in order (servers are expensive on a 2-core machine):

1. the coordinator fences the primary (writes need its lease) and a writer records every
   acknowledged id;
2. ``kill -9`` of the primary: a replica is promoted, the map moves to epoch 2, every acknowledged
   id is on the new primary, writes resume;
3. the old primary restarted *as it was* (a primary's PGDATA) refuses every write: its lease
   lapsed and nobody renews it;
4. rejoined with ``follow`` (pg_rewind or base backup) it streams from the new primary;
5. a planned switchover moves the primary back without losing a write;
6. a second coordinator takes the lead when the first one stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from photostack.blocks.storage import ReplicationMode, synchronous_standby_names
from photostack.cluster.engines import EngineError
from photostack.cluster.engines.testing import PostgresServer, start_engine, start_postgres
from photostack.service.directory import (
    ClusterMap,
    Endpoint,
    MapStore,
    PhysicalShard,
    apply_directory_schema,
    initial_map,
)
from photostack.service.directory._coordinator import Coordinator, GroupRule
from photostack.service.directory._coordinator_policy import CoordinatorConfig
from tests.component.conftest import engine_unavailable

pytestmark = pytest.mark.component

NAMES = ("users-1-primary", "users-1-replica-1", "users-1-replica-2")
DEADLINE_S = 30.0
# A write that raised any of these was not acknowledged. InternalClientError: asyncpg's answer
# when the server ends the session in the middle of a statement (the killed primary's backends).
WRITE_FAILURES = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < deadline, f"condition not met within {deadline_s}s"
        await asyncio.sleep(0.05)


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[list[PostgresServer]]:
    sync = synchronous_standby_names(ReplicationMode.SYNC, [*NAMES[1:], NAMES[0]])
    servers: list[PostgresServer] = []
    try:
        primary = start_postgres(tmp_path / "p", name=NAMES[0], synchronous_standby_names=sync)
        servers.append(primary)
        for name in NAMES[1:]:
            servers.append(
                start_postgres(
                    tmp_path / name,
                    name=name,
                    primary=(primary.host, primary.port),
                    synchronous_standby_names=sync,
                )
            )
    except EngineError as exc:
        for server in servers:
            server.stop()
        engine_unavailable(str(exc))
    yield servers
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class Holder:
    def __init__(self, first: ClusterMap) -> None:
        self.map = first

    def install(self, new: ClusterMap) -> None:
        if new.version > self.map.version:
            self.map = new


def coordinator(name: str, dsn: str, holder: Holder, observers: tuple[str, ...]) -> Coordinator:
    return Coordinator(
        name,
        dsn,
        rules={"users": GroupRule(ReplicationMode.SYNC)},
        observers=observers,
        current_map=lambda: holder.map,
        install=holder.install,
        config=CoordinatorConfig(min_failover_interval_s=0.0),
    )


async def insert(dsn: str, item: str, epoch: int) -> None:
    conn = await asyncpg.connect(dsn, timeout=1.0, server_settings={"photostack.epoch": str(epoch)})
    try:
        # Bounded: a synchronous primary whose standby is not connected yet waits for it at
        # commit; such a write is not acknowledged (a failure here), and the loop goes on.
        await conn.execute("INSERT INTO items (id) VALUES ($1)", item, timeout=2.0)
    finally:
        conn.terminate()


async def ids_on(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=2.0)
    try:
        return {r["id"] for r in await conn.fetch("SELECT id FROM items", timeout=10.0)}
    finally:
        await conn.close()


def test_failover_keeps_every_acknowledged_write_and_fences_the_old_primary(
    shard: list[PostgresServer], pg_server: PostgresServer, tmp_path: Path
) -> None:
    primary, replica1, replica2 = shard

    async def scenario() -> None:
        db = f"coord_{int(time.time() * 1000) % 10**9}"
        await pg_server.acreate_database(db)
        directory_dsn = pg_server.dsn(db)
        first = initial_map(
            {
                "users": [
                    PhysicalShard(
                        0,
                        Endpoint(NAMES[0], primary.dsn()),
                        (Endpoint(NAMES[1], replica1.dsn()), Endpoint(NAMES[2], replica2.dsn())),
                    )
                ]
            }
        )
        conn = await asyncpg.connect(directory_dsn)
        await apply_directory_schema(conn)
        await MapStore.initialise(conn, first)
        await conn.close()
        setup = await asyncpg.connect(primary.dsn())
        await setup.execute("CREATE TABLE items (id text PRIMARY KEY)")
        await setup.close()

        holder = Holder(first)
        one = coordinator("d1", directory_dsn, holder, ("d1", "d2"))
        two = coordinator("d2", directory_dsn, holder, ("d1", "d2"))
        tasks = [asyncio.create_task(one.run()), asyncio.create_task(two.run())]
        try:
            await run_scenario(holder, one, two, tasks, primary, replica1, replica2)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


async def run_scenario(  # noqa: PLR0917 - the scenario's cast
    holder: Holder,
    one: Coordinator,
    two: Coordinator,
    tasks: list[asyncio.Task[None]],
    primary: PostgresServer,
    replica1: PostgresServer,
    replica2: PostgresServer,
) -> None:
    # 1. fenced: a write needs the lease, which the leader grants
    async def fenced() -> bool:
        conn = await asyncpg.connect(primary.dsn())
        try:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'photostack_fence'"
                )
            )
        finally:
            await conn.close()

    await eventually(fenced)
    assert (one.is_leader, two.is_leader).count(True) == 1
    acked: list[str] = []
    stop = asyncio.Event()
    failures = 0

    async def writer() -> None:
        nonlocal failures
        n = 0
        while not stop.is_set() and n < 5000:
            n += 1
            item = f"i{n}"
            target = holder.map.group("users").shards[0]
            try:
                await insert(target.primary.dsn, item, target.epoch)
            except WRITE_FAILURES:
                failures += 1
                await asyncio.sleep(0.02)
                continue
            acked.append(item)

    writing = asyncio.create_task(writer())
    await eventually(lambda: _true(len(acked) >= 30))

    # 2. kill -9 the primary
    killed_at = time.monotonic()
    await asyncio.to_thread(primary.process.kill)
    await eventually(lambda: _true(holder.map.version == 2))
    shard = holder.map.group("users").shards[0]
    assert shard.epoch == 2
    assert shard.primary.name in NAMES[1:]
    assert NAMES[0] in [r.name for r in shard.replicas]
    new_primary = replica1 if shard.primary.name == NAMES[1] else replica2
    other = replica2 if new_primary is replica1 else replica1
    other_name = NAMES[2] if shard.primary.name == NAMES[1] else NAMES[1]
    # the surviving replica streams from the new primary on its timeline, as its sync standby;
    # the new primary waits for exactly the standbys that can attach (not its own name)
    wanted = synchronous_standby_names(ReplicationMode.SYNC, [r.name for r in shard.replicas])
    await eventually(lambda: follows(new_primary, other, other_name, wanted), 10.0)
    before = len(acked)
    await eventually(lambda: _true(len(acked) > before + 20))
    resumed_s = time.monotonic() - killed_at
    stop.set()
    await writing
    present = await ids_on(shard.primary.dsn)
    missing = [i for i in acked if i not in present]
    assert missing == [], f"{len(missing)} acknowledged writes lost"
    assert resumed_s < 10, f"writes resumed only after {resumed_s:.1f}s"

    # a replica that does not stream from the primary (here: pointed back at the dead one, as
    # when the repoint after the promotion failed) is repointed by the leader's next rounds
    setup = await asyncpg.connect(other.dsn())
    try:
        stale = (
            f"host={primary.host} port={primary.port} user=postgres application_name={other_name}"
        )
        await setup.execute(f"ALTER SYSTEM SET primary_conninfo = '{stale}'")
        await setup.execute("SELECT pg_reload_conf()")
    finally:
        await setup.close()
    await eventually(lambda: detached(new_primary, other_name), 10.0)
    await eventually(lambda: follows(new_primary, other, other_name, wanted), 15.0)
    await insert(shard.primary.dsn, "after-repoint", shard.epoch)

    # 3. the old primary, restarted from its own data as a primary, refuses writes
    old = primary.engine
    proc = await asyncio.to_thread(start_engine, old, log_path=primary.process.log_path)
    try:
        for epoch in (1, 2):
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await insert(primary.dsn(), f"late-{epoch}", epoch)
        await asyncio.to_thread(proc.stop)
        # 4. rejoined as a standby of the new primary: it streams, and holds every write
        new_primary = replica1 if shard.primary.name == NAMES[1] else replica2
        old.follow(new_primary.host, new_primary.port)
        proc = await asyncio.to_thread(start_engine, old, log_path=primary.process.log_path)
        assert old.rejoined_by in ("pg_rewind", "pg_basebackup")

        async def streaming() -> bool:
            conn = await asyncpg.connect(primary.dsn())
            try:
                return bool(await conn.fetchval("SELECT pg_is_in_recovery()")) and (
                    await conn.fetchval("SELECT count(*) FROM items") >= len(acked)
                )
            finally:
                await conn.close()

        await eventually(streaming)
        # 5. a planned switchover back to the old primary's node or the other replica
        version = holder.map.version
        record = await one.request_failover("users-1")
        assert record["result"] == "done", record
        assert holder.map.version == version + 1
        assert holder.map.group("users").shards[0].epoch == 3
        target = holder.map.group("users").shards[0]
        await insert(target.primary.dsn, "after-switchover", 3)
        assert "after-switchover" in await ids_on(target.primary.dsn)

        # 6. the leader stops: the other one takes over
        index = 0 if one.is_leader else 1
        tasks[index].cancel()
        await asyncio.gather(tasks[index], return_exceptions=True)
        survivor = two if index == 0 else one
        await eventually(lambda: _true(survivor.is_leader))
        await insert(target.primary.dsn, "after-takeover", 3)
    finally:
        await asyncio.to_thread(proc.stop)


async def follows(
    primary: PostgresServer, replica: PostgresServer, name: str, sync_names: str
) -> bool:
    """``replica`` streams from ``primary`` on the new timeline as its synchronous standby, and
    ``primary`` waits for exactly ``sync_names``."""
    conn = await asyncpg.connect(primary.dsn(), timeout=2.0)
    try:
        row = await conn.fetchrow(
            "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1", name
        )
        names = await conn.fetchval("SHOW synchronous_standby_names")
    finally:
        await conn.close()
    conn = await asyncpg.connect(replica.dsn(), timeout=2.0)
    try:
        receiver = await conn.fetchrow(
            "SELECT status, received_tli, sender_port FROM pg_stat_wal_receiver"
        )
    finally:
        await conn.close()
    return (
        row is not None
        and (row["state"], row["sync_state"]) == ("streaming", "sync")
        and names == sync_names
        and receiver is not None
        and (receiver["status"], receiver["received_tli"]) == ("streaming", 2)
        and receiver["sender_port"] == primary.port
    )


async def detached(primary: PostgresServer, name: str) -> bool:
    conn = await asyncpg.connect(primary.dsn(), timeout=2.0)
    try:
        return not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", name
        )
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value
