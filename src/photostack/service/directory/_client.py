"""The directory client used by app nodes: a cached map, refreshed when its version moves.

The client asks one directory node at a time, starting with the last one that answered, and moves
to the next on any failure, so losing a directory node costs one failed attempt, never a request.
Freshness: :meth:`DirectoryClient.run` polls the cheap ``GET /v1/map/version`` every
``poll_interval_s`` and fetches ``GET /v1/map`` only when the version moved; a storage shard's
"wrong shard" answer calls :meth:`DirectoryClient.note_version` for an immediate check. A map
older than the cached one is never installed (a directory node may lag its peer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from photostack.service.settings import Peer

from ._errors import DirectoryUnavailableError, MapFormatError
from ._map import ClusterMap

__all__ = ["DirectoryClient", "DirectoryClientConfig", "HttpTransport", "Transport"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """One GET to one directory node: ``(status, decoded JSON body)``.

    Raises OSError (or any Exception) when the node cannot be reached.
    """

    async def get_json(self, peer: Peer, path: str, timeout_s: float) -> tuple[int, Any]: ...


class HttpTransport:
    """:class:`Transport` over one keep-alive httpx client."""

    def __init__(self) -> None:
        self._client = httpx.AsyncClient()

    async def get_json(self, peer: Peer, path: str, timeout_s: float) -> tuple[int, Any]:
        response = await self._client.get(
            f"http://{peer.host}:{peer.port}{path}", timeout=timeout_s
        )
        return response.status_code, response.json()

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class DirectoryClientConfig:
    poll_interval_s: float = 1.0
    request_timeout_s: float = 1.0


OnChange = Callable[[ClusterMap], Awaitable[None]]


class DirectoryClient:
    """The app's cached view of the shard map. ``on_change`` runs after a newer map is installed."""

    def __init__(
        self,
        peers: Sequence[Peer],
        transport: Transport,
        config: DirectoryClientConfig | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        if not peers:
            raise ValueError("a directory client needs at least one directory node")
        self._peers = tuple(peers)
        self._transport = transport
        self.config = config or DirectoryClientConfig()
        self._on_change = on_change
        self._preferred = 0
        self._map: ClusterMap | None = None
        self._lock = asyncio.Lock()
        self.failovers = 0  # attempts that moved on to the next directory node

    @property
    def map(self) -> ClusterMap:
        """The cached map. Raises DirectoryUnavailableError before the first load."""
        if self._map is None:
            raise DirectoryUnavailableError("no shard map loaded yet")
        return self._map

    @property
    def version(self) -> int:
        return self._map.version if self._map is not None else 0

    async def load(self) -> bool:
        """Fetch the whole map; True when it was newer and installed.

        Raises DirectoryUnavailableError when no node answers, MapFormatError for a bad map.
        """
        async with self._lock:
            body = await self._ask("/v1/map")
            fresh = ClusterMap.from_json(body)
            if fresh.version <= self.version:
                return False
            self._map = fresh
        log.info("shard map version %d installed", fresh.version)
        if self._on_change is not None:
            await self._on_change(fresh)
        return True

    async def check(self) -> bool:
        """Ask for the version; load the map when it moved. True when a newer map was installed.

        Raises DirectoryUnavailableError.
        """
        body = await self._ask("/v1/map/version")
        try:
            version = int(body["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MapFormatError(f"bad version answer: {body!r}") from exc
        if version <= self.version:
            return False
        return await self.load()

    async def note_version(self, seen: int) -> bool:
        """A shard said "not mine" at map version ``seen``: check the directory now.

        Even when ``seen`` is not newer than ours the directory may be (the shard recorded its
        part of a cut-over before the directory published it, or after we cached): always ask.
        Raises DirectoryUnavailableError.
        """
        changed = await self.check()
        if not changed and seen > self.version:
            log.warning("a shard is at map version %d, the directory at %d", seen, self.version)
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; a failed poll is logged and retried next interval."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.poll_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.check()
            except (DirectoryUnavailableError, MapFormatError) as exc:
                log.warning("shard map poll failed: %s", exc)

    async def _ask(self, path: str) -> Any:
        """GET ``path`` from the preferred node, then each other one in turn."""
        errors = []
        count = len(self._peers)
        for step in range(count):
            index = (self._preferred + step) % count
            peer = self._peers[index]
            try:
                status, body = await self._transport.get_json(
                    peer, path, self.config.request_timeout_s
                )
            except Exception as exc:  # noqa: BLE001 - any failure: try the next node
                errors.append(f"{peer.name}: {type(exc).__name__}")
            else:
                if status == 200:
                    if step:
                        self.failovers += step
                        log.warning("directory: %s answered after %s", peer.name, errors)
                    self._preferred = index
                    return body
                errors.append(f"{peer.name}: HTTP {status}")
        raise DirectoryUnavailableError("no directory node answered (" + "; ".join(errors) + ")")
