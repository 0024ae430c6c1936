"""The system user and state root that let engines run when photostack itself runs as root.

PostgreSQL refuses to start as root, and a venv under ``/root`` (mode 0700) is unreadable to any
other user. So, as root, photostack creates one system user once and keeps what that user must
read (binaries, data directories) under a world-traversable state root.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from photostack.cluster.engines.base import EngineError

__all__ = [
    "RUN_USER",
    "STATE_ROOT",
    "RunAs",
    "chown_to",
    "ensure_system_user",
    "is_root",
    "last_line",
    "run_as",
    "state_lock",
]

RUN_USER = "photostack"
STATE_ROOT = Path("/var/lib/photostack")
_USERADD_TIMEOUT_S = 30.0


def is_root() -> bool:
    """True when engines must be run under :data:`RUN_USER` instead of ourselves."""
    return os.geteuid() == 0


@contextmanager
def state_lock(name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock under the state root, across processes.

    Several supervisors or test workers may prepare engines at once; the lock makes user
    creation and the binary copy happen exactly once.
    """
    STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    with (STATE_ROOT / name).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def ensure_system_user(user: str = RUN_USER) -> None:
    """Create the system user once (idempotent, safe under concurrent calls). Raises EngineError."""
    if _user_exists(user):
        return
    with state_lock():
        if _user_exists(user):
            return
        argv = [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            str(STATE_ROOT),
            "--shell",
            "/usr/sbin/nologin",
            user,
        ]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=_USERADD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"cannot create system user {user!r}: {exc}") from exc
        # Another host tool may have created it between our check and useradd (exit 9).
        if result.returncode != 0 and not _user_exists(user):
            reason = last_line(result.stderr) or f"useradd exited {result.returncode}"
            raise EngineError(f"cannot create system user {user!r}: {reason}")


@dataclass(frozen=True)
class RunAs:
    """Identity arguments for ``subprocess`` so a child drops root entirely.

    ``user=`` alone keeps root's group and supplementary groups; passing all three
    does not.
    """

    user: str | None = None
    group: int | None = None
    extra_groups: list[int] | None = None


def run_as(user: str | None) -> RunAs:
    """The ``subprocess`` identity for ``user`` (None: stay who we are). Raises EngineError."""
    if user is None:
        return RunAs()
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise EngineError(f"system user {user!r} does not exist") from exc
    return RunAs(user=user, group=entry.pw_gid, extra_groups=[])


def chown_to(path: Path, user: str | None) -> None:
    """Give ``path`` to ``user`` (no-op for None) without following a symlink."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def last_line(text: str) -> str:
    """The last non-blank line of a tool's output: the one-line reason users need."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
