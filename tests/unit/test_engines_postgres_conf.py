"""Pure parts of the Postgres engine: settings files, paths, process spec."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from photostack.cluster.engines import (
    EngineError,
    PostgresConfig,
    PostgresEngine,
    PostgresInstall,
    postgres_data_home,
    postgres_dsn,
)
from photostack.cluster.engines._pginstall import basebackup_staging, data_home_key
from photostack.cluster.engines.postgres import (
    render_pg_hba,
    render_photostack_conf,
    with_include_line,
)

INSTALL = PostgresInstall(bin_dir=Path("/opt/pg/bin"), lib_dir=Path("/opt/pg/lib"))


def make_config(**overrides: object) -> PostgresConfig:
    values: dict[str, object] = {
        "name": "users-1",
        "install": INSTALL,
        "pgdata": Path("/data/users-1/pg"),
        "port": 5433,
        "log_path": Path("/logs/users-1.log"),
    }
    values.update(overrides)
    return PostgresConfig(**values)  # type: ignore[arg-type]


def settings_of(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    return {key: value for key, value in pairs}


def test_conf_listens_on_tcp_only_with_replication_enabled() -> None:
    conf = settings_of(render_photostack_conf(make_config()))

    assert conf["listen_addresses"] == "'127.0.0.1'"
    assert conf["port"] == "5433"
    assert conf["unix_socket_directories"] == "''"
    assert conf["wal_level"] == "replica"
    assert conf["max_wal_senders"] == "10"
    assert conf["hot_standby"] == "on"
    assert conf["shared_buffers"] == "'32MB'"
    assert conf["logging_collector"] == "off"
    assert conf["synchronous_standby_names"] == "''"


def test_conf_quotes_sync_names_and_appends_settings_last() -> None:
    text = render_photostack_conf(
        make_config(
            synchronous_standby_names="FIRST 1 (users-2)",
            settings={"work_mem": "8MB", "application_name": "it's"},
        )
    )
    conf = settings_of(text)

    assert conf["synchronous_standby_names"] == "'FIRST 1 (users-2)'"
    assert conf["application_name"] == "'it''s'"
    assert text.splitlines()[-1] == "application_name = 'it''s'"


def test_conf_rejects_a_setting_name_that_could_inject_lines() -> None:
    with pytest.raises(EngineError, match="invalid postgres setting name"):
        render_photostack_conf(make_config(settings={"port = 1\nfsync": "off"}))


def test_include_line_is_appended_once_and_stays_last() -> None:
    original = "max_connections = 100\n#comment\n"

    once = with_include_line(original)
    twice = with_include_line(once + "work_mem = 4MB\n")

    assert once == original + "include_if_exists = 'photostack.conf'\n"
    assert twice.count("photostack.conf") == 1
    assert twice.endswith("work_mem = 4MB\ninclude_if_exists = 'photostack.conf'\n")


def test_include_line_replaces_a_variant_written_by_hand() -> None:
    text = with_include_line("include_if_exists 'photostack.conf'  # mine\nport = 1\n")

    assert text == "port = 1\ninclude_if_exists = 'photostack.conf'\n"
    assert with_include_line("") == "include_if_exists = 'photostack.conf'\n"


def test_hba_trusts_loopback_clients_and_replicas() -> None:
    rows = [line.split() for line in render_pg_hba("127.0.0.1").splitlines()]
    rules = {tuple(row) for row in rows if row and not row[0].startswith("#")}

    assert ("host", "all", "all", "127.0.0.1/32", "trust") in rules
    assert ("host", "replication", "all", "127.0.0.1/32", "trust") in rules
    assert ("host", "replication", "all", "::1/128", "trust") in rules
    assert not any("samenet" in rule for rule in rules)


def test_hba_adds_local_subnets_when_listening_beyond_loopback() -> None:
    assert "replication  all   samenet" in render_pg_hba("10.200.0.2")


def test_data_home_as_normal_user_is_inside_the_data_dir(tmp_path: Path) -> None:
    home = postgres_data_home(tmp_path / "node", as_root=False)

    assert home == tmp_path / "node" / "pg"
    assert not home.exists()  # initdb creates it with the mode Postgres wants


def test_data_home_key_is_short_stable_and_path_specific(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    key = data_home_key(tmp_path / "a")

    assert len(key) == 16
    assert int(key, 16) >= 0
    assert data_home_key(Path("a")) == key  # resolved before hashing
    assert data_home_key(tmp_path / "b") != key


def test_basebackup_staging_is_a_sibling() -> None:
    assert basebackup_staging(Path("/x/pg")) == Path("/x/pg.basebackup")


def test_process_spec_runs_postgres_in_the_foreground_as_the_run_user() -> None:
    install = PostgresInstall(
        bin_dir=Path("/opt/pg/bin"), lib_dir=Path("/opt/pg/lib"), run_user="photostack"
    )
    spec = PostgresEngine(make_config(install=install)).process_spec()

    assert spec.argv == ["/opt/pg/bin/postgres", "-D", "/data/users-1/pg"]
    assert spec.user == "photostack"
    assert spec.stop_signal == signal.SIGINT
    assert spec.stop_timeout_s == 30.0
    assert spec.cwd == Path("/data/users-1/pg")


def test_replica_is_named_by_its_primary() -> None:
    primary = PostgresEngine(make_config())
    replica = PostgresEngine(make_config(name="users-2", primary=("127.0.0.1", 5433)))

    assert not primary.is_replica
    assert replica.is_replica
    assert "replica" in repr(replica)


def test_dsn_brackets_ipv6_hosts() -> None:
    assert postgres_dsn("127.0.0.1", 5433) == "postgresql://postgres@127.0.0.1:5433/postgres"
    assert postgres_dsn("::1", 5433, "users") == "postgresql://postgres@[::1]:5433/users"
