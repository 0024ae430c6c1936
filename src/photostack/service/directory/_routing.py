"""The app node's storage routing driven by the directory: map in, ShardRouter out.

On every newer map the router's groups are replaced in one step each: pools are reused by DSN
(a new DSN gets a new pool) and each group gets a :class:`DirectoryPartitioner` over its new
placement. A reshard (item 7) therefore needs nothing here beyond publishing the next version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from photostack.blocks.storage import ShardRouter
from photostack.service.settings import Peer

from ._client import DirectoryClient, DirectoryClientConfig, Transport
from ._errors import DirectoryUnavailableError
from ._map import ClusterMap

__all__ = ["MapRouting", "epoch_dsn"]

PoolT = TypeVar("PoolT")
log = logging.getLogger(__name__)


def epoch_dsn(dsn: str, epoch: int) -> str:
    """``dsn`` with the server setting ``photostack.epoch=N`` (asyncpg passes query parameters
    as settings): a shard's fence refuses writes from an app routing by another epoch, and a
    failover (new epoch) gets new pools (docs/replication.md)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}photostack.epoch={epoch}"


OnInstall = Callable[[ClusterMap, dict[str, Any]], Awaitable[None]]


class MapRouting(Generic[PoolT]):
    """Keeps ``router`` in step with the directory's map. ``open_pool(group, dsn)`` opens a pool
    (retrying as long as it takes; the caller bounds it)."""

    def __init__(
        self,
        peers: Sequence[Peer],
        transport: Transport,
        open_pool: Callable[[str, str], Awaitable[PoolT]],
        config: DirectoryClientConfig | None = None,
        on_install: OnInstall | None = None,
    ) -> None:
        self.client = DirectoryClient(peers, transport, config, on_change=self.install)
        self._on_install = on_install  # e.g. the replication layer's read router
        self._transport = transport
        self._open_pool = open_pool
        self._pools: dict[str, PoolT] = {}
        self._router: ShardRouter[PoolT] | None = None
        self.installed_version = 0

    @property
    def router(self) -> ShardRouter[PoolT]:
        if self._router is None:
            raise RuntimeError("no shard map installed yet")
        return self._router

    @property
    def pools(self) -> dict[str, PoolT]:
        """dsn -> pool, every pool opened so far."""
        return self._pools

    async def install(self, new: ClusterMap) -> None:
        """Route by ``new`` (pools for new DSNs are opened first, then groups swapped)."""
        if new.version <= self.installed_version:
            return
        shards: dict[str, list[PoolT]] = {}
        for name, group in new.groups.items():
            shards[name] = [
                await self._pool(name, epoch_dsn(s.primary.dsn, s.epoch)) for s in group.shards
            ]
        partitioners = {name: group.partitioner() for name, group in new.groups.items()}
        if self._router is None:
            self._router = ShardRouter(shards, partitioners=partitioners)
        else:
            for name in new.groups:
                self._router.replace(name, shards[name], partitioners[name])
        self.installed_version = new.version
        if self._on_install is not None:
            await self._on_install(new, dict(self._pools))

    async def _pool(self, group: str, dsn: str) -> PoolT:
        pool = self._pools.get(dsn)
        if pool is None:
            pool = await self._open_pool(group, dsn)
            self._pools[dsn] = pool
        return pool

    async def start(self, max_backoff_s: float = 2.0) -> ShardRouter[PoolT]:
        """Load the first map (retrying while no directory node answers) and route by it."""
        delay = 0.05
        while True:
            try:
                await self.client.load()
                return self.router
            except DirectoryUnavailableError as exc:
                log.warning("waiting for the directory: %s (retry in %.2fs)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(max_backoff_s, delay * 2)

    async def poll_forever(self) -> None:
        """Follow the directory's version until cancelled."""
        await self.client.run(asyncio.Event())

    async def aclose(self) -> None:
        close = getattr(self._transport, "aclose", None)
        if close is not None:
            await close()

    def current(self) -> ClusterMap:
        return self.client.map

    async def refresh(self, seen_version: int) -> bool:
        return await self.client.note_version(seen_version)
