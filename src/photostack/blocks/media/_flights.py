"""Collapsed forwarding: at most one origin fetch per key in flight; everyone else awaits it.

The fetch runs as its own task, not inside the first requester's task, so a client that
disconnects cancels only its own wait, never the fetch the others are waiting on. A purge that
arrives while a fetch is in flight marks it: the fetched response still answers the requests
waiting for it, but is not stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["Flights"]

T = TypeVar("T")


class Flights(Generic[T]):
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}
        self._purged: set[str] = set()
        self.started = 0  # fetches started
        self.joined = 0  # requests that waited on a fetch another request started

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def run(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The fetch in flight for ``key``, starting ``fetch()`` if there is none."""
        task = self._tasks.get(key)
        if task is not None:
            self.joined += 1
            return task
        task = asyncio.get_running_loop().create_task(fetch())
        self.started += 1
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._landed(key, done))
        return task

    def _landed(self, key: str, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
            self._purged.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: a fetch nobody awaited any more must not warn

    def mark_purged(self, key: str) -> None:
        if key in self._tasks:
            self._purged.add(key)

    def was_purged(self, key: str) -> bool:
        return key in self._purged

    def cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
