"""HotEvents' retry queue over a scripted push (no sockets): a failed push is retried in seq
order until it lands, and until then this node's reads of the user go to the log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from photostack.blocks.realtime.testing import make_event
from photostack.service._events_hot import EventRetention, HotEvents

DEADLINE_S = 5.0


class ScriptedPush:
    """Stands in for the Lua script: fails while ``failing`` holds a user's node, records calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls: list[tuple[str, int, str]] = []
        self.landed: list[tuple[str, int]] = []

    async def __call__(self, *, keys: list[str], args: list[Any], client: Any) -> int:
        user = keys[0].removeprefix("ev:")
        self.calls.append((user, int(args[0]), str(args[5])))
        if self.failing:
            raise RedisTimeoutError("Timeout reading from socket (scripted)")
        self.landed.append((user, int(args[0])))
        return 1


def hot_events(nodes: int = 1) -> tuple[HotEvents, ScriptedPush]:
    hot = HotEvents([("127.0.0.1", 1)] * nodes, EventRetention())  # never connected
    script = ScriptedPush()
    hot._script = script  # type: ignore[assignment]
    return hot, script


async def until(predicate: Any) -> None:
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_failed_pushes_are_retried_in_seq_order_and_reads_skip_the_list_meanwhile() -> None:
    async def main() -> None:
        hot, script = hot_events()
        try:
            assert await hot.push_and_publish("u1", make_event(1), "t1") is False
            assert await hot.push_and_publish("u1", make_event(2), "t2") is False
            assert hot.unpushed_users == 1
            # Known to be behind: answered "ask the log" without touching Redis.
            assert await hot.read("u1", 0, 10) is None
            await until(lambda: len(script.calls) >= 4)  # the retry is trying too
            script.failing = False
            await until(lambda: hot.unpushed_users == 0)
            assert script.landed == [("u1", 1), ("u1", 2)]
            retried_tokens = [c[2] for c in script.calls if c[1] == 2]
            assert set(retried_tokens) == {"t2"}  # the retry clears the producer's marker
            assert hot.retried == 2
        finally:
            await hot.aclose()

    asyncio.run(main())


def test_a_push_that_lands_first_time_queues_nothing() -> None:
    async def main() -> None:
        hot, script = hot_events()
        script.failing = False
        try:
            assert await hot.push_and_publish("u2", make_event(1), "t") is True
            assert hot.unpushed_users == 0
            assert hot._retry_task is None
        finally:
            await hot.aclose()

    asyncio.run(main())


def test_a_down_node_is_tried_once_per_round_not_once_per_user() -> None:
    async def main() -> None:
        hot, script = hot_events()
        try:
            for user in ("a", "b", "c"):
                assert await hot.push_and_publish(user, make_event(1), user) is False
            before = len(script.calls)
            await until(lambda: len(script.calls) > before)
            await asyncio.sleep(0)  # the round ends at its first failure on the node
            assert len(script.calls) == before + 1
            script.failing = False
            await until(lambda: hot.unpushed_users == 0)
            assert sorted(script.landed) == [("a", 1), ("b", 1), ("c", 1)]
        finally:
            await hot.aclose()

    asyncio.run(main())


def test_closing_stops_the_retry() -> None:
    async def main() -> None:
        hot, script = hot_events()
        assert await hot.push_and_publish("u3", make_event(1), "t") is False
        task = hot._retry_task
        assert task is not None
        await hot.aclose()
        assert task.cancelled()  # not left running against closed clients
        assert script.landed == []

    asyncio.run(main())


def test_connection_errors_count_as_failed_pushes() -> None:
    async def main() -> None:
        hot, _ = hot_events()

        async def reset(**_: Any) -> int:
            raise RedisConnectionError("Connection reset by peer")

        hot._script = reset  # type: ignore[assignment]
        try:
            assert await hot.push_and_publish("u4", make_event(7), "t") is False
            assert await hot.read("u4", 6, 10) is None
        finally:
            await hot.aclose()

    asyncio.run(main())
