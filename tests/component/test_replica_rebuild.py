"""A replica that cannot follow its primary is rebuilt: real Postgres, primary + 1 replica.

The replica is made to diverge (promoted, written to, then restarted as a standby of the old
primary: its timeline forked off the primary's, so it can never stream from it). The leading
coordinator sees it pointed at the primary yet not attached, and marks it ``rebuild``; the
supervisor's ``RoleKeeper`` (driving a small supervisor double that starts and stops the real
servers) stops it, rebuilds it with ``PostgresEngine.rebuild`` (a fresh ``pg_basebackup -R`` of
the primary) and starts it: it streams with the primary's data and nothing of its own, and the
mark clears.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from photostack.blocks.storage import ReplicationMode
from photostack.cluster._roles import RoleKeeper, replicas_to_rebuild
from photostack.cluster.engines._sysuser import chown_to
from photostack.cluster.engines.testing import (
    EngineProcess,
    PostgresServer,
    start_engine,
)
from photostack.cluster.state import NodeLifecycle, NodeState
from photostack.cluster.topology import Role
from photostack.service.directory import (
    Endpoint,
    MapStore,
    PhysicalShard,
    apply_directory_schema,
    initial_map,
)
from photostack.service.directory._coordinator import Coordinator, GroupRule
from photostack.service.directory._coordinator_policy import CoordinatorConfig
from photostack.service.directory._replica_policy import ReplicaPolicy
from tests.component.conftest import eventually, streaming_pair

pytestmark = pytest.mark.component

NAMES = ("users-1-primary", "users-1-replica-1")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with streaming_pair(tmp_path, NAMES[0], NAMES[1]) as servers:
        yield servers


async def fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=2.0)
    try:
        return await conn.fetchval(query, timeout=5.0)
    finally:
        await conn.close()


async def execute(dsn: str, *queries: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=2.0)
    try:
        for query in queries:
            await conn.execute(query, timeout=10.0)
    finally:
        await conn.close()


def test_a_replica_that_cannot_follow_is_marked_and_rebuilt_from_a_base_backup(
    pair: tuple[PostgresServer, PostgresServer], pg_server: PostgresServer
) -> None:
    primary, replica = pair

    async def scenario() -> None:
        db = f"rebuild_{int(time.time() * 1000) % 10**9}"
        await pg_server.acreate_database(db)
        first = initial_map(
            {
                "users": [
                    PhysicalShard(
                        0,
                        Endpoint(NAMES[0], primary.dsn()),
                        (Endpoint(NAMES[1], replica.dsn()),),
                    )
                ]
            }
        )
        conn = await asyncpg.connect(pg_server.dsn(db))
        await apply_directory_schema(conn)
        await MapStore.initialise(conn, first)
        await conn.close()
        await execute(primary.dsn(), "CREATE TABLE items (id text PRIMARY KEY)")
        await execute(primary.dsn(), "INSERT INTO items VALUES ('from-primary')")
        coordinator = Coordinator(
            "d1",
            pg_server.dsn(db),
            rules={"users": GroupRule(ReplicationMode.ASYNC)},
            observers=("d1",),
            current_map=lambda: first,
            install=lambda new: None,
            config=CoordinatorConfig(min_failover_interval_s=0.0),
            replica_policy=ReplicaPolicy(reattach_after_s=0.5, rebuild_after_s=3.0),
        )
        task = asyncio.create_task(coordinator.run())
        try:
            await run(coordinator, primary, replica)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


async def run(coordinator: Coordinator, primary: PostgresServer, replica: PostgresServer) -> None:
    def action() -> str:
        return str(coordinator.state()["shards"]["users-1"]["replicas"][NAMES[1]]["action"])

    await eventually(lambda: streams(primary), 30.0)
    await eventually(lambda: _true(coordinator.is_leader and action() == "keep"), 30.0)

    # diverge: promote the replica and write there, then make it a standby of the primary again
    await execute(replica.dsn(), "SELECT pg_promote(true, 10)")
    await execute(replica.dsn(), "INSERT INTO items VALUES ('diverged')")
    await asyncio.to_thread(replica.process.stop)
    signal = replica.engine.config.pgdata / "standby.signal"
    signal.touch()
    chown_to(signal, replica.engine.config.install.run_user)
    started = [
        await asyncio.to_thread(start_engine, replica.engine, log_path=replica.process.log_path)
    ]
    try:
        await rebuilt(coordinator, primary, replica, started)
    finally:
        for proc in started:
            await asyncio.to_thread(proc.stop)


async def rebuilt(
    coordinator: Coordinator,
    primary: PostgresServer,
    replica: PostgresServer,
    started: list[EngineProcess],
) -> None:
    def action() -> str:
        return str(coordinator.state()["shards"]["users-1"]["replicas"][NAMES[1]]["action"])

    assert await fetch(replica.dsn(), "SELECT pg_is_in_recovery()") is True

    # pointed at the primary, never attached: marked for a rebuild (not repointed)
    await eventually(lambda: _true(action() == "rebuild"), 20.0)
    assert not await streams(primary)
    assert coordinator.replicas.repoints == 0
    assert replicas_to_rebuild(coordinator.state()) == {NAMES[1]: NAMES[0]}

    # the supervisor's RoleKeeper: stop, fresh base backup of the primary, start
    supervisor = Supervisor(primary, replica, started)
    keeper = RoleKeeper(supervisor, lambda: True)  # type: ignore[arg-type]
    keeper._leader_view = _answer(coordinator.state())  # type: ignore[method-assign]
    newest = initial_map(
        {
            "users": [
                PhysicalShard(
                    0,
                    Endpoint(NAMES[0], primary.dsn()),
                    (Endpoint(NAMES[1], replica.dsn()),),
                )
            ]
        }
    ).to_json()
    assert await keeper._rebuild_stuck(newest) == [NAMES[1]]
    assert supervisor.calls == [("stop", NAMES[1]), ("start", NAMES[1])]
    assert keeper.rebuilds == 1
    assert replica.engine.rejoined_by == "pg_basebackup"
    assert await keeper._rebuild_stuck(newest) == []  # once per interval, whatever it says
    await eventually(lambda: streams(primary), 30.0)
    rows = await fetch(replica.dsn(), "SELECT string_agg(id, ',' ORDER BY id) FROM items")
    assert rows == "from-primary"
    await eventually(lambda: _true(action() == "keep"), 10.0)
    assert replicas_to_rebuild(coordinator.state()) == {}


async def streams(primary: PostgresServer) -> bool:
    return (
        await fetch(
            primary.dsn(),
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = "
            "'users-1-replica-1' AND state = 'streaming'",
        )
        == 1
    )


class Supervisor:
    """The part of the cluster supervisor RoleKeeper uses, over the real servers."""

    def __init__(
        self, primary: PostgresServer, replica: PostgresServer, started: list[EngineProcess]
    ) -> None:
        self._replica = replica
        self._started = started
        self.calls: list[tuple[str, str]] = []
        self.nodes = {
            NAMES[0]: _node(NAMES[0], primary),
            NAMES[1]: _node(NAMES[1], replica),
        }

    async def stop(self, name: str) -> None:
        self.calls.append(("stop", name))
        await asyncio.to_thread(self._started[-1].stop)

    async def start(self, name: str) -> None:
        self.calls.append(("start", name))
        engine, log_path = self._replica.engine, self._replica.process.log_path
        self._started.append(await asyncio.to_thread(start_engine, engine, log_path=log_path))


def _node(name: str, server: PostgresServer) -> SimpleNamespace:
    spec = SimpleNamespace(
        name=name, role=Role.STORAGE, group="users", host=server.host, port=server.port
    )
    return SimpleNamespace(
        name=name,
        spec=spec,
        engine=server.engine,
        lifecycle=NodeLifecycle(name, NodeState.READY),
    )


def _answer(value: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def answer() -> dict[str, Any]:
        return value

    return answer


async def _true(value: bool) -> bool:
    return value
