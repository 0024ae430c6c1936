"""The directory's pure parts: the map, versions, the client's refresh logic, routing, the
ownership guard, photo ids and scatter-gather (fakes only, no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from photostack.blocks.storage import HashModPartitioner, ShardOutcome, scatter_gather
from photostack.service._photos import (
    TRANSITIONS,
    PhotoNotFoundError,
    PhotoStatus,
    new_photo_id,
    owner_of_photo,
)
from photostack.service.directory import (
    ClusterMap,
    DirectoryClient,
    DirectoryClientConfig,
    DirectoryUnavailableError,
    Endpoint,
    MapFormatError,
    MapGuard,
    MapRouting,
    PhysicalShard,
    StaleMapError,
    WrongShardError,
    check_successor,
    initial_map,
    with_addresses_of,
)
from photostack.service.settings import Peer


def shards(group: str, n: int, port: int = 5000) -> list[PhysicalShard]:
    return [
        PhysicalShard(
            i,
            Endpoint(f"{group}-{i + 1}-primary", f"postgresql://h:{port + i}/p"),
            (Endpoint(f"{group}-{i + 1}-replica-1", f"postgresql://h:{port + 50 + i}/p"),),
        )
        for i in range(n)
    ]


def sample_map(users: int = 1, social: int = 2, photos: int = 2, port: int = 5000) -> ClusterMap:
    return initial_map(
        {
            "users": shards("users", users, port),
            "social": shards("social", social, port + 10),
            "photos": shards("photos", photos, port + 20),
        }
    )


# -- the map ------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50))
def test_the_first_map_places_every_key_where_hash_mod_does(n: int, keys: list[str]) -> None:
    group = initial_map({"g": shards("g", n)}).group("g")
    static = HashModPartitioner(n)
    partitioner = group.partitioner()
    for key in keys:
        assert group.physical_of(key) == static.shard_for(key) == partitioner.shard_for(key)


def test_logical_shards_are_split_evenly_and_completely() -> None:
    group = sample_map().group("social")
    assert group.logical_shards == 128
    owned = [group.owned_by(i) for i in range(2)]
    assert sorted(owned[0] + owned[1]) == list(range(128))
    assert len(owned[0]) == len(owned[1]) == 64


def test_the_map_round_trips_through_json() -> None:
    first = sample_map()
    again = ClusterMap.from_json(first.to_json())
    assert again == first
    assert again.group("photos").shards[1].replicas[0].name == "photos-2-replica-1"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("version"),
        lambda d: d.update(version="2"),
        lambda d: d.update(version=0),
        lambda d: d["groups"]["users"]["partitioner"].update(kind="range"),
        lambda d: d["groups"]["social"]["placement"].pop(),
        lambda d: d["groups"]["social"]["placement"].__setitem__(0, 7),
        lambda d: d["groups"]["social"]["shards"][0].update(index=5),
        lambda d: d.update(groups=[]),
    ],
)
def test_a_malformed_map_is_refused(mutate: Any) -> None:
    doc = sample_map().to_json()
    mutate(doc)
    with pytest.raises(MapFormatError):
        ClusterMap.from_json(doc)


def test_versions_only_increase() -> None:
    first = sample_map()
    second = first.successor({"social": {"logical-0": 1}})
    assert second.version == 2
    assert second.group("social").placement.entries["logical-0"] == 1
    assert first.group("social").placement.entries["logical-0"] == 0
    check_successor(first, second)
    check_successor(None, first)
    with pytest.raises(StaleMapError):
        check_successor(second, first)
    with pytest.raises(StaleMapError):
        check_successor(second, second)


def test_new_addresses_keep_the_placement_and_bump_the_version() -> None:
    stored = sample_map().successor({"social": {"logical-3": 0}})
    assert with_addresses_of(stored, sample_map()) is None
    moved = with_addresses_of(stored, sample_map(port=7000))
    assert moved is not None
    assert moved.version == stored.version + 1
    assert moved.group("social").placement.entries == stored.group("social").placement.entries
    assert moved.group("users").shards[0].primary.dsn == "postgresql://h:7000/p"


# -- the client ---------------------------------------------------------------------------------


class FakeDirectory:
    """Directory nodes by name: a map each, or down."""

    def __init__(self, maps: dict[str, ClusterMap | None]) -> None:
        self.maps = maps
        self.calls: list[tuple[str, str]] = []

    async def get_json(self, peer: Peer, path: str, timeout_s: float) -> tuple[int, Any]:
        self.calls.append((peer.name, path))
        current = self.maps[peer.name]
        if current is None:
            raise OSError("connection refused")
        if path == "/v1/map/version":
            return 200, {"version": current.version}
        return 200, current.to_json()


PEERS = (Peer("directory-1", "127.0.0.1", 1), Peer("directory-2", "127.0.0.1", 2))


def test_the_client_fails_over_and_sticks_to_the_node_that_answered() -> None:
    first = sample_map()
    fake = FakeDirectory({"directory-1": None, "directory-2": first})
    changes: list[int] = []

    async def on_change(new: ClusterMap) -> None:
        changes.append(new.version)

    client = DirectoryClient(PEERS, fake, on_change=on_change)
    assert asyncio.run(client.load()) is True
    assert client.version == 1
    assert changes == [1]
    assert client.failovers == 1
    fake.calls.clear()
    assert asyncio.run(client.check()) is False  # same version: no map fetch
    assert fake.calls == [("directory-2", "/v1/map/version")]


def test_the_client_loads_only_newer_maps() -> None:
    first = sample_map()
    second = first.successor({"photos": {"logical-1": 0}})
    fake = FakeDirectory({"directory-1": second, "directory-2": first})
    client = DirectoryClient(PEERS, fake)
    asyncio.run(client.load())
    assert client.version == 2
    fake.maps["directory-1"] = None  # the other node lags behind: never go back
    assert asyncio.run(client.load()) is False
    assert client.version == 2
    assert client.map is not None


def test_a_wrong_shard_answer_refreshes_at_once() -> None:
    first = sample_map()
    fake = FakeDirectory({"directory-1": first, "directory-2": first})
    client = DirectoryClient(PEERS, fake)
    asyncio.run(client.load())
    fake.maps["directory-1"] = first.successor({"social": {"logical-0": 1}})
    assert asyncio.run(client.note_version(2)) is True
    assert client.map.group("social").placement.entries["logical-0"] == 1


def test_no_directory_node_is_an_error_naming_each() -> None:
    client = DirectoryClient(PEERS, FakeDirectory({"directory-1": None, "directory-2": None}))
    with pytest.raises(DirectoryUnavailableError, match=r"directory-1.*directory-2"):
        asyncio.run(client.load())
    with pytest.raises(DirectoryUnavailableError):
        _ = client.map


def test_the_poll_loop_picks_up_a_new_version_and_stops() -> None:
    first = sample_map()
    fake = FakeDirectory({"directory-1": first, "directory-2": first})
    changed = asyncio.Event()

    async def on_change(new: ClusterMap) -> None:
        if new.version == 2:
            changed.set()

    client = DirectoryClient(
        PEERS, fake, DirectoryClientConfig(poll_interval_s=0.01), on_change=on_change
    )

    async def main() -> None:
        await client.load()
        stop = asyncio.Event()
        task = asyncio.create_task(client.run(stop))
        fake.maps["directory-1"] = fake.maps["directory-2"] = first.successor()
        async with asyncio.timeout(5):
            await changed.wait()
        stop.set()
        await task
        assert client.version == 2

    asyncio.run(main())


# -- routing and the guard ----------------------------------------------------------------------


def test_routing_follows_the_map_and_reuses_pools() -> None:
    first = sample_map()
    fake = FakeDirectory({"directory-1": first, "directory-2": first})
    opened: list[str] = []

    async def open_pool(group: str, dsn: str) -> str:
        opened.append(dsn)
        return f"pool:{dsn}"

    routing: MapRouting[str] = MapRouting(PEERS, fake, open_pool)
    router = asyncio.run(routing.start())
    key = next(k for k in (f"u{i}" for i in range(1000)) if router.shard_index("social", k) == 0)
    logical = first.group("social").logical_of(key)
    assert len(opened) == 5
    fake.maps["directory-1"] = first.successor({"social": {f"logical-{logical}": 1}})
    assert asyncio.run(routing.refresh(2)) is True
    assert router.shard_index("social", key) == 1
    assert routing.installed_version == 2
    assert len(opened) == 5  # same DSNs: same pools


class FakeConn:
    def __init__(self, owned: set[int], version: int) -> None:
        self.owned, self.version = owned, version

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if "FOR SHARE" in sql:
            return self.version if args[0] in self.owned else None
        return self.version


def test_the_guard_says_wrong_shard_and_retries_once_after_a_refresh() -> None:
    current = sample_map()
    group = current.group("photos")
    key = "owner-1"
    home = FakeConn(set(group.owned_by(group.physical_of(key))), 1)
    elsewhere = FakeConn(set(), 2)
    refreshed: list[int] = []

    async def refresh(seen: int) -> bool:
        refreshed.append(seen)
        return True

    guard = MapGuard(lambda: current, refresh)
    asyncio.run(guard.verify(home, "photos", key))
    with pytest.raises(WrongShardError) as caught:
        asyncio.run(guard.verify(elsewhere, "photos", key))
    assert caught.value.shard_version == 2
    conns = [elsewhere, home]

    async def attempt() -> str:
        conn = conns.pop(0)
        await guard.verify(conn, "photos", key)
        return "written"

    assert asyncio.run(guard.retrying(attempt)) == "written"
    assert refreshed == [2]
    assert guard.wrong_shard_answers == 1


# -- photo ids ----------------------------------------------------------------------------------


@given(st.from_regex(r"[0-9a-z_]{1,40}", fullmatch=True))
def test_a_photo_id_names_its_owner(owner: str) -> None:
    photo_id = new_photo_id(owner)
    assert owner_of_photo(photo_id) == owner
    group = sample_map().group("photos")
    assert group.physical_of(owner_of_photo(photo_id)) == group.physical_of(owner)


@pytest.mark.parametrize("bad", ["", "nounderscore", "_0123456789abcdef", "owner_short"])
def test_an_id_of_another_shape_is_no_photo(bad: str) -> None:
    with pytest.raises(PhotoNotFoundError):
        owner_of_photo(bad)


def test_photo_status_moves_only_forward() -> None:
    assert TRANSITIONS[PhotoStatus.PROCESSING] == {PhotoStatus.READY, PhotoStatus.FAILED}
    assert not TRANSITIONS[PhotoStatus.READY]
    assert not TRANSITIONS[PhotoStatus.FAILED]


# -- scatter-gather -----------------------------------------------------------------------------


def test_scatter_gather_reports_a_stalled_and_a_failed_shard() -> None:
    async def ok() -> int:
        return 1

    async def stalled() -> int:
        await asyncio.Event().wait()
        return 2

    async def broken() -> int:
        raise ConnectionResetError("peer went away")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await scatter_gather({"a": ok, "b": stalled, "c": broken}, deadline_s=0.2)
        assert loop.time() - started < 1.0
        assert result.results == {"a": 1}
        assert result.failures["b"].outcome is ShardOutcome.TIMED_OUT
        assert result.failures["c"].outcome is ShardOutcome.FAILED
        assert "ConnectionResetError" in result.failures["c"].detail
        report = result.report()
        assert report["complete"] is False
        assert report["answered"] == ["a"]
        assert report["missing"]["b"]["outcome"] == "timed_out"

    asyncio.run(main())


def test_scatter_gather_complete_and_bad_deadline() -> None:
    async def ok() -> str:
        return "x"

    result = asyncio.run(scatter_gather({1: ok, 2: ok}, deadline_s=1.0))
    assert result.complete
    assert dict(result.results) == {1: "x", 2: "x"}
    with pytest.raises(ValueError, match="deadline_s"):
        asyncio.run(scatter_gather({1: ok}, deadline_s=0))
