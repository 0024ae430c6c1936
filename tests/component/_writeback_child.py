"""A process that holds write-back dirty entries, to be SIGKILLed by test_cache_writeback_kill.

``python -m tests.component._writeback_child STORE_FILE FLUSH_INTERVAL_S [WAL_DIR]`` writes
keys k0, k1, ... one per millisecond through a WriteBack whose store appends ``key=value`` lines
to STORE_FILE, and prints ``acked N`` after each write returns. It never stops on its own
before 20 000 writes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from photostack.blocks.cache import WriteAheadLog, WriteBack, WriteBackConfig
from photostack.blocks.cache.testing import FakeCacheTier

MAX_WRITES = 20_000


class FileStore:
    """The system of record: one ``key=value`` line per write, appended in one syscall."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def read(self, key: bytes) -> bytes | None:
        return None

    async def write(self, key: bytes, value: bytes) -> None:
        await self.write_many([(key, value)])

    async def write_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        os.write(self._fd, b"".join(k + b"=" + v + b"\n" for k, v in items))


def read_store(path: Path) -> dict[bytes, bytes]:
    if not path.exists():
        return {}
    pairs = (line.split(b"=", 1) for line in path.read_bytes().splitlines() if line)
    return {k: v for k, v in pairs}


async def main(store_path: Path, interval_s: float, wal_dir: Path | None) -> None:
    log = WriteAheadLog(wal_dir) if wal_dir is not None else None
    cache: FakeCacheTier[bytes, bytes] = FakeCacheTier()
    wb = WriteBack(
        FileStore(store_path), cache, WriteBackConfig(flush_interval_s=interval_s), log=log
    )
    wb.start()
    for i in range(MAX_WRITES):
        await wb.write(b"k%d" % i, b"v%d" % i)
        print(f"acked {i + 1}", flush=True)  # noqa: T201
        await asyncio.sleep(0.001)  # pacing: ~1000 writes/s
    await wb.aclose()


if __name__ == "__main__":
    wal = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2]), wal))
