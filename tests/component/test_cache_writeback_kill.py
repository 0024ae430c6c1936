"""The loss window of write-back: SIGKILL a process holding dirty entries and count what the
store never got; then the same with the write-ahead log, replayed after the crash."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from photostack.blocks.cache import WriteAheadLog, WriteBack, WriteBackConfig
from photostack.blocks.cache.testing import FakeCacheTier
from tests.component._writeback_child import FileStore, read_store

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]
FLUSH_INTERVAL_S = 0.5
KILL_AFTER_ACKS = 1200  # > 2 flush intervals at ~1000 writes/s
DEADLINE_S = 60.0


def _run_and_kill(store: Path, wal_dir: Path | None) -> int:
    """Start the child, SIGKILL it once KILL_AFTER_ACKS writes were acknowledged; returns how
    many writes it acknowledged in total."""
    argv = [sys.executable, "-m", "tests.component._writeback_child", str(store)]
    argv.append(str(FLUSH_INTERVAL_S))
    if wal_dir is not None:
        argv.append(str(wal_dir))
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    acked = 0
    deadline = time.monotonic() + DEADLINE_S
    try:
        while acked < KILL_AFTER_ACKS:
            line = proc.stdout.readline()
            if not line:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"child exited early: {stderr[-500:]}")
            acked = int(line.split()[1])
            assert time.monotonic() < deadline, "child too slow"
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in rest.splitlines():
        acked = max(acked, int(line.split()[1]))
    return acked


def test_write_back_loses_at_most_one_flush_interval_of_writes(tmp_path: Path) -> None:
    store = tmp_path / "store.txt"
    acked = _run_and_kill(store, wal_dir=None)
    landed = read_store(store)
    lost = [i for i in range(acked) if b"k%d" % i not in landed]
    print(f"write-back without a log: acked {acked}, lost {len(lost)}")  # noqa: T201
    assert lost, "a kill between flushes must lose the dirty entries"
    # What is lost is exactly a suffix: the writes since the last flush began.
    assert lost == list(range(lost[0], acked))
    # ~1000 writes/s and a 0.5 s interval: bounded by one interval (with slack for a busy CPU).
    assert len(lost) <= 1000 * FLUSH_INTERVAL_S * 3


def test_write_ahead_log_recovers_every_acknowledged_write(tmp_path: Path) -> None:
    store, wal_dir = tmp_path / "store.txt", tmp_path / "wal"
    acked = _run_and_kill(store, wal_dir=wal_dir)
    before = read_store(store)
    assert len(before) < acked  # the crash did leave dirty entries behind

    async def recover() -> int:
        log = WriteAheadLog(wal_dir)
        records = list(log.replay())
        wb = WriteBack(FileStore(store), FakeCacheTier(), WriteBackConfig(), log=log)
        wb.recover(records)
        await wb.flush()
        log.close()
        return len(records)

    replayed = asyncio.run(recover())
    after = read_store(store)
    missing = [i for i in range(acked) if b"k%d" % i not in after]
    print(f"write-back with a log: acked {acked}, replayed {replayed}, lost {len(missing)}")  # noqa: T201
    assert missing == []
