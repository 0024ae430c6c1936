"""The `photostack` command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

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
    if as_json:
        click.echo(json.dumps(cluster, indent=2))
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
        result = _control(data_dir, port_base, lambda c: c.command(node, command))
        if command == "kill":
            click.echo(f"kill: {result['name']} (pid {result['pid']}) got SIGKILL; it will restart")
        else:
            click.echo(f"{command}: {result['name']} is {result['state']}")


_node_command("kill", "SIGKILL a node, as a crash would (the supervisor restarts it).")
_node_command("stop", "Stop a node gracefully; it stays down until `start`.")
_node_command("start", "Start a stopped node.")


def _control(data_dir: Path, port_base: int | None, call: Any) -> Any:
    from photostack.ops.client import ControlClient, ControlError, find_control_url

    try:
        with ControlClient(find_control_url(data_dir, port_base)) as client:
            return call(client)
    except ControlError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
