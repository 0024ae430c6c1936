"""The data directory: one cluster's persistent state, logs, secret and run-time record.

Layout (default ``./.photostack``)::

    supervisor.lock   held while a supervisor runs from this directory
    cluster.json      control URL, supervisor pid and node pids of the running cluster
    secret            token-signing key, generated at first `up`, mode 0600
    logs/NODE.log     every node's stdout and stderr
    run/NODE.json     the spec each photostack node process was started with
    redis/NODE/       cache nodes' working directories
    pg                Postgres data (a symlink to a directory the postgres user can reach, as root)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any

__all__ = ["DataDir", "DataDirBusy"]


class DataDirBusy(Exception):
    """Another supervisor already runs from this data directory."""


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._lock_file: IO[str] | None = None

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def secret_path(self) -> Path:
        return self.root / "secret"

    def log_path(self, node: str) -> Path:
        return self.logs / f"{node}.log"

    def redis_dir(self, node: str) -> Path:
        return self.root / "redis" / node

    def create(self) -> None:
        for path in (self.root, self.logs, self.run):
            path.mkdir(parents=True, exist_ok=True)

    def acquire(self) -> None:
        """Take the directory's lock for this process's lifetime. Raises DataDirBusy."""
        self.create()
        handle = (self.root / "supervisor.lock").open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            pid = self.read_state().get("pid", "?")
            raise DataDirBusy(f"a cluster is already running from {self.root} (pid {pid})") from exc
        self._lock_file = handle

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def ensure_secret(self) -> Path:
        """The token-signing key: created once, readable only by its owner."""
        if not self.secret_path.exists():
            fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        os.chmod(self.secret_path, 0o600)
        return self.secret_path

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, self.state_file)

    def read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def clear_state(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
