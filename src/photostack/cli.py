"""The `photostack` command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

__all__ = ["main"]

DEFAULT_DATA_DIR = Path(".photostack")
DEFAULT_PORT_BASE = 8080

_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="The cluster's data directory.",
)
_port_base_option = click.option(
    "--port-base",
    type=click.IntRange(1024, 65000),
    default=None,
    help="Find the cluster by its port base.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """photostack: a scalable photo-sharing back end, every block a real process."""


@cli.command()
@click.option(
    "--topology",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Topology TOML file (default: the one shipped in the package).",
)
@_data_dir_option
@click.option(
    "--port-base",
    type=click.IntRange(1024, 65000),
    default=DEFAULT_PORT_BASE,
    show_default=True,
    help="api=N, static=N+1, dashboard=N+10, internal ports above.",
)
def up(topology: Path | None, data_dir: Path, port_base: int) -> None:
    """Start every node, wait for health, print `ready:`, run until Ctrl-C."""
    import logging

    from photostack.cluster.up import UpOptions, run_up

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    code = run_up(
        UpOptions(topology_path=topology, data_dir=data_dir, port_base=port_base),
        out=click.echo,
    )
    sys.exit(code)


@cli.command()
@_data_dir_option
@_port_base_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(data_dir: Path, port_base: int | None, as_json: bool) -> None:
    """Every node: name, role, pid, address, state, key figures."""
    cluster = _control(data_dir, port_base, lambda c: c.cluster())
    from photostack.ops._shard_status import fetch_shard_skew, print_shard_skew

    skew = fetch_shard_skew(data_dir, port_base)  # per group: rows, tx/s, std/mean per shard
    if as_json:
        click.echo(json.dumps({**cluster, "shard_skew": skew}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cluster['name']} ({'ready' if cluster['ready'] else 'starting'})")
    for column in ("node", "role", "pid", "address", "state", "restarts", "figures"):
        table.add_column(column, no_wrap=column != "figures")
    for node in cluster["nodes"]:
        figures = _figures_text(node["figures"])
        table.add_row(
            node["name"],
            node["role"],
            str(node["pid"] or "-"),
            node["address"],
            node["state"],
            str(node["restarts"]),
            figures,
        )
    console = Console(width=max(140, shutil.get_terminal_size().columns))
    console.print(table)
    console.print(" ".join(f"{k}={v}" for k, v in cluster["urls"].items()))
    from photostack.ops._replication_status import print_replication

    print_replication(console, data_dir, port_base)
    print_shard_skew(console, skew)


@cli.command()
@click.argument("shard")
@_data_dir_option
@_port_base_option
def failover(shard: str, data_dir: Path, port_base: int | None) -> None:
    """Planned switchover of SHARD (e.g. users-1): no write lost, old primary rejoins."""
    done = _control(
        data_dir,
        port_base,
        lambda c: c.request("POST", f"/v1/failover/{shard}"),
        timeout_s=40.0,
    )
    click.echo(
        f"failover: {done['shard']} primary {done['from_node']} -> {done['to_node']} "
        f"(epoch {done['epoch']}, map version {done['map_version']})"
    )


def _figures_text(figures: dict[str, Any]) -> str:
    """One short line of a node's figures (the JSON keeps every detail)."""
    if "error" in figures:
        return f"error: {figures['error']}"
    if "replicas" in figures:
        replicas = figures["replicas"]
        return ", ".join(f"{k} {v}" for k, v in replicas.items()) if replicas else "no replica"
    if "in_recovery" in figures:
        role = "standby" if figures["in_recovery"] else "NOT in recovery"
        return (
            f"{role}, wal receiver {figures['wal_receiver']}, replay age {figures['replay_age_s']}s"
        )
    return ", ".join(f"{k} {v}" for k, v in figures.items())


def _node_command(command: str, doc: str) -> None:
    @cli.command(name=command, help=doc)
    @click.argument("node")
    @_data_dir_option
    @_port_base_option
    def run(node: str, data_dir: Path, port_base: int | None) -> None:
        # A graceful stop drains the node's pool (up to 10 s) and then its process (up to 30 s
        # for Postgres) before the control API answers.
        result = _control(
            data_dir, port_base, lambda c: c.command(node, command), timeout_s=90.0
        )
        if command == "kill":
            click.echo(f"kill: {result['name']} (pid {result['pid']}) got SIGKILL; it will restart")
        else:
            click.echo(f"{command}: {result['name']} is {result['state']}")


_node_command("kill", "SIGKILL a node, as a crash would (the supervisor restarts it).")
_node_command("stop", "Stop a node gracefully; it stays down until `start`.")
_node_command("start", "Start a stopped node.")


class _OneLineErrors(click.Command):
    """Usage errors as one ``error:`` line and exit code 2 (no usage dump)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            ctx.exit(2)


@cli.command(cls=_OneLineErrors)
@click.option("--listen", default="127.0.0.1:9000", show_default=True, help="HOST:PORT to serve.")
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    required=True,
    help="HOST:PORT[=WEIGHT] of a backend; repeat for each one.",
)
@click.option("--strategy", default="round-robin", show_default=True, help="See docs/balancing.md.")
@click.option("--hash-key", default=None, help="For --strategy hash: header:NAME, path:N or path.")
@click.option("--slow-start-s", type=float, default=None, help="Slow-start window (default 10).")
@click.option("--check-path", default="/healthz", show_default=True, help="Active check path.")
@click.option("--no-health-checks", is_flag=True, help="Passive health only.")
def sidecar(  # noqa: PLR0917 - one parameter per flag, as click passes them
    listen: str,
    upstreams: tuple[str, ...],
    strategy: str,
    hash_key: str | None,
    slow_start_s: float | None,
    check_path: str,
    no_health_checks: bool,
) -> None:
    """A local load-balancing proxy (the edge's core) for any program: use it as localhost."""
    from photostack.blocks.balancer import Backend, BalancerConfigError, parse_settings

    settings: dict[str, Any] = {"strategy": strategy, "checks": not no_health_checks}
    settings["check_path"] = check_path
    if hash_key is not None:
        settings["hash_key"] = hash_key
    if slow_start_s is not None:
        settings["slow_start_s"] = slow_start_s
    try:
        host, port = _host_port(listen, "--listen")
        backends = []
        for index, text in enumerate(upstreams, start=1):
            address, _, weight_text = text.partition("=")
            up_host, up_port = _host_port(address, "--upstream")
            weight = _positive(weight_text, "--upstream weight") if weight_text else 1.0
            backends.append(Backend(f"upstream-{index}", up_host, up_port, weight))
        config, _ = parse_settings(settings)
    except (click.BadParameter, BalancerConfigError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(_run_sidecar(host, port, tuple(backends), config))


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{flag} must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise click.BadParameter(f"{flag} must be a positive number, not {text!r}")
    return value


def _run_sidecar(host: str, port: int, backends: tuple[Any, ...], config: Any) -> int:
    import asyncio
    import signal

    import uvloop

    from photostack.blocks.proxy import ProxyConfig, ProxyServer

    proxy = ProxyConfig(
        backends=backends, listen_host=host, listen_port=port, name="sidecar", upstream=config
    )

    async def run() -> int:
        server = ProxyServer(proxy)
        try:
            await server.start()
        except OSError as exc:
            await server.aclose()
            click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror}", err=True)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        targets = ", ".join(f"{b.host}:{b.port}" for b in backends)
        click.echo(
            f"sidecar: http://{host}:{server.port} -> {targets} ({config.strategy.value}); "
            "Ctrl-C stops"
        )
        try:
            await stop.wait()
        finally:
            await server.aclose()
        return 0

    return uvloop.run(run())


@cli.command()
@click.argument("scenario")
@_data_dir_option
@_port_base_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--warmup-s", type=click.FloatRange(0.5, 60), default=3.0, show_default=True,
    help="Load before each fault.",
)  # fmt: skip
@click.option(
    "--deadline-s", type=click.FloatRange(5, 600), default=90.0, show_default=True,
    help="How long a fault's effects may last before the scenario fails.",
)  # fmt: skip
def drill(  # noqa: PLR0917 - one parameter per flag, as click passes them
    scenario: str,
    data_dir: Path,
    port_base: int | None,
    as_json: bool,
    warmup_s: float,
    deadline_s: float,
) -> None:
    """Run failure SCENARIO (or `all`) on the running cluster under load: expected vs observed.

    Scenarios: web-node, app-node, cache-node, workers, latency (docs/chaos.md), failover,
    partition (docs/replication.md). Exit code 1
    when an expectation failed, 3 when the scenario asked for cannot run on this cluster.
    """
    from photostack.ops.client import ControlError, find_control_url
    from photostack.ops.drill import DrillOptions, run_drill

    try:
        url = find_control_url(data_dir, port_base)
    except ControlError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    options = DrillOptions(warmup_s=warmup_s, recover_deadline_s=deadline_s)
    sys.exit(run_drill(scenario, url, options, click.echo, as_json=as_json))


@cli.group()
def jobs() -> None:
    """Cross-shard jobs: reconcile-follows, user-cleanup, orphan-sweep (docs/directory.md)."""


@jobs.command(name="run")
@click.argument("name")
@_data_dir_option
@_port_base_option
def jobs_run(name: str, data_dir: Path, port_base: int | None) -> None:
    """Run job NAME now on one app node (under the job's lease) and print its report."""
    report = _control(
        data_dir, port_base, lambda c: c.request("POST", f"/v1/jobs/{name}/run"), timeout_s=300.0
    )
    click.echo(json.dumps(report, indent=2))


@cli.group()
def users() -> None:
    """Operator actions on users (API.md has no public user deletion)."""


@users.command(name="delete")
@click.argument("user_id")
@_data_dir_option
@_port_base_option
def users_delete(user_id: str, data_dir: Path, port_base: int | None) -> None:
    """Delete USER_ID: gone for reads at once; the cleanup job removes photos, edges, events."""
    done = _control(data_dir, port_base, lambda c: c.request("DELETE", f"/v1/users/{user_id}"))
    click.echo(f"delete: user {done['user_id']} recorded (cleanup stage: {done['stage']})")


@cli.group()
def directory() -> None:
    """The directory service's shard map."""


@directory.command(name="show")
@_data_dir_option
@_port_base_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def directory_show(data_dir: Path, port_base: int | None, as_json: bool) -> None:
    """The current shard map: version, each group's partitioner and its physical shards."""
    shard_map = _control(data_dir, port_base, lambda c: c.request("GET", "/v1/directory/map"))
    if as_json:
        click.echo(json.dumps(shard_map, indent=2))
        return
    click.echo(f"shard map version {shard_map['version']}")
    for name, group in shard_map["groups"].items():
        part = group["partitioner"]
        click.echo(f"  {name}: {part['kind']}, {part['logical_shards']} logical shards")
        for shard in group["shards"]:
            owned = sum(1 for p in group["placement"] if p == shard["index"])
            replicas = ", ".join(r["name"] for r in shard["replicas"]) or "no replica"
            click.echo(
                f"    shard {shard['index'] + 1}: {shard['primary']['name']} ({replicas}), "
                f"{owned} logical"
            )


@cli.group()
def reshard() -> None:
    """Online resharding: add or remove a shard, move a hot shard, watch, cancel
    (docs/resharding.md)."""


def _echo_move(move: dict[str, Any]) -> None:
    progress = move.get("progress", {})
    figures = " ".join(
        f"{k}={progress[k]}"
        for k in ("copied", "replayed", "rows_moved", "moved_vs_ideal", "cutover_s", "duration_s")
        if progress.get(k) is not None
    )
    new = move.get("new_shard") or {}
    removed = move.get("removed_shard") or {}
    target = f" -> {new['name']}" if new else ""
    if removed:
        target = f" shard {removed['number']} ({removed['name']})"
    click.echo(
        f"move {move['id']}: {move['kind']} {move['group']}{target}: {move['state']}, "
        f"{move['moves']} of {move['logical_shards']} logical shards"
        + (f" ({figures})" if figures else "")
        + (f"; last error: {move['error']}" if move.get("error") else "")
    )


@reshard.command(name="add-shard")
@click.argument("group")
@_data_dir_option
@_port_base_option
def reshard_add_shard(group: str, data_dir: Path, port_base: int | None) -> None:
    """Start a new primary for GROUP and move ~1/(n+1) of its logical shards to it, online."""
    move = _control(
        data_dir,
        port_base,
        lambda c: c.request("POST", f"/v1/reshard/{group}/add-shard"),
        timeout_s=180.0,
    )
    _echo_move(move)


@reshard.command(name="remove-shard")
@click.argument("group")
@click.argument("shard")
@_data_dir_option
@_port_base_option
def reshard_remove_shard(group: str, shard: str, data_dir: Path, port_base: int | None) -> None:
    """Empty GROUP's shard SHARD (1-based, as `directory show` numbers them) onto the others,
    online, then stop its nodes; the shards after it are renumbered down by one."""
    move = _control(
        data_dir,
        port_base,
        lambda c: c.request(
            "POST", f"/v1/reshard/{quote(group, safe='')}/remove-shard/{quote(shard, safe='')}"
        ),
        timeout_s=180.0,
    )
    _echo_move(move)


@reshard.command(name="hot-shard")
@click.argument("group")
@_data_dir_option
@_port_base_option
def reshard_hot_shard(group: str, data_dir: Path, port_base: int | None) -> None:
    """Measure GROUP's per-shard load and move logical shards off the hottest onto the coolest."""
    move = _control(
        data_dir, port_base, lambda c: c.request("POST", f"/v1/reshard/{group}/hot-shard")
    )
    load = move.get("load", {})
    click.echo(f"load (tx/s): {load.get('tps')} skew={load.get('skew')}")
    _echo_move(move)


@reshard.command(name="status")
@_data_dir_option
@_port_base_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def reshard_status(data_dir: Path, port_base: int | None, as_json: bool) -> None:
    """Recent moves (newest first) and each group's per-shard load and skew."""
    status = _control(data_dir, port_base, lambda c: c.request("GET", "/v1/reshard"))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"shard map version {status['map_version']}")
    for load in status["load"]:
        click.echo(
            f"  {load['group']}: tx/s per shard {load['tps']}, "
            f"load skew (std/mean) {load['skew']} (hottest: shard {load['hottest']})"
        )
    for move in status["moves"]:
        _echo_move(move)
    if not status["moves"]:
        click.echo("no moves yet")


@reshard.command(name="cancel")
@_data_dir_option
@_port_base_option
def reshard_cancel(data_dir: Path, port_base: int | None) -> None:
    """Roll the move in progress back to the old placement (only before its cut-over)."""
    move = _control(
        data_dir, port_base, lambda c: c.request("POST", "/v1/reshard/cancel"), timeout_s=180.0
    )
    _echo_move(move)


def _control(data_dir: Path, port_base: int | None, call: Any, timeout_s: float = 10.0) -> Any:
    from photostack.ops.client import ControlClient, ControlError, find_control_url

    try:
        with ControlClient(find_control_url(data_dir, port_base), timeout_s=timeout_s) as client:
            return call(client)
    except ControlError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
