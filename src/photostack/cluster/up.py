"""`photostack up`: lay out the topology, start nodes in order, serve control, stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import uvicorn
from starlette.applications import Starlette

from photostack.cluster import figures, plan
from photostack.cluster.control import ClusterInfo, ControlServer, create_control_app
from photostack.cluster.datadir import DataDir, DataDirBusy
from photostack.cluster.engines import EngineError, ensure_port_free, prepare_postgres_install
from photostack.cluster.supervisor import StartupError, Supervisor, install_signal_handlers
from photostack.cluster.topology import Layout, TopologyError, layout, load_topology

__all__ = ["EXIT_OK", "EXIT_STARTUP_FAILED", "UpOptions", "run_up"]

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_USAGE = 2

Out = Callable[[str], None]


@dataclass(frozen=True)
class UpOptions:
    topology_path: Path | None
    data_dir: Path
    port_base: int


def run_up(options: UpOptions, out: Out) -> int:
    """Run a cluster in the foreground until SIGINT/SIGTERM. Returns the process exit code."""
    try:
        topology = load_topology(options.topology_path)
        lay = layout(topology, options.port_base)
    except TopologyError as exc:
        out(f"error: {exc}")
        return EXIT_USAGE
    data = DataDir(options.data_dir)
    try:
        data.acquire()
    except DataDirBusy as exc:
        out(f"error: {exc}")
        return EXIT_STARTUP_FAILED
    except OSError as exc:
        out(f"error: cannot use data dir {options.data_dir}: {exc.strerror}")
        return EXIT_STARTUP_FAILED
    try:
        _stop_leftovers(data, out)
        return asyncio.run(_run(lay, data, out))
    finally:
        data.clear_state()
        data.release()


async def _run(lay: Layout, data: DataDir, out: Out) -> int:
    stop = asyncio.Event()
    install_signal_handlers(asyncio.get_running_loop(), stop)
    try:
        _check_ports(lay)
        install = await asyncio.to_thread(prepare_postgres_install)
        nodes, phases = plan.build(lay, data, install)
    except (StartupError, EngineError) as exc:
        out(f"error: {exc}")
        return EXIT_STARTUP_FAILED

    host = lay.topology.host
    info = ClusterInfo(
        name=lay.topology.name,
        port_base=lay.port_base,
        data_dir=str(data.root),
        urls={
            "api": f"http://{host}:{lay.api_port}",
            "static": f"http://{host}:{lay.static_port}",  # the CDN edge (docs/media.md)
            "dashboard": f"http://{host}:{lay.control_port}",
        },
        replication=plan.group_replication(lay),
    )
    supervisor = Supervisor(
        nodes, [p.names for p in phases], on_event=lambda line: out(f"  {line}")
    )
    control = ControlServer(
        _control_config(
            create_control_app(supervisor, info, figures.collect), host, lay.control_port
        )
    )
    control_task = asyncio.create_task(control.serve())
    data.write_state(_state(lay, info, supervisor))
    started = time.monotonic()
    startup = asyncio.create_task(_start(supervisor, phases, lay))
    stopper = asyncio.create_task(stop.wait())
    code = EXIT_OK
    try:
        await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if startup.done():
            failure = startup.exception()
            if failure is not None:
                out(f"error: {failure}")
                code = EXIT_STARTUP_FAILED
            else:
                info.ready = True
                data.write_state(_state(lay, info, supervisor))
                urls = " ".join(f"{k}={v}" for k, v in info.urls.items())
                out(f"ready: {urls} ({len(nodes)} nodes in {time.monotonic() - started:.1f}s)")
                health = asyncio.create_task(supervisor.watch_health())
                await stopper
                health.cancel()
                await asyncio.gather(health, return_exceptions=True)
        else:
            startup.cancel()
            await asyncio.gather(startup, return_exceptions=True)
    finally:
        out("stopping: edge, web, app, cache, storage primaries, replicas")
        stopper.cancel()
        await supervisor.shutdown()
        control.should_exit = True
        await asyncio.gather(control_task, return_exceptions=True)
    out("stopped")
    return code


async def _start(supervisor: Supervisor, phases: list[plan.Phase], lay: Layout) -> None:
    for phase in phases:
        await supervisor.start_phase(phase.names)
        if phase.after is not None:
            try:
                await phase.after()
            except (OSError, EngineError) as exc:
                raise StartupError(f"{phase.label}: {exc}") from exc


def _check_ports(lay: Layout) -> None:
    wanted = [(n.name, n.host, n.port) for n in lay.nodes]
    wanted += [(n.name, n.host, n.admin_port) for n in lay.nodes if n.admin_port is not None]
    wanted.append(("control", lay.topology.host, lay.control_port))
    for name, host, port in wanted:
        try:
            ensure_port_free(host, port)
        except EngineError as exc:
            raise StartupError(f"{exc} (needed by {name}; choose another --port-base)") from exc


def _control_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def _state(lay: Layout, info: ClusterInfo, supervisor: Supervisor) -> dict[str, object]:
    """What a later `up` or CLI command needs to know about this run (cluster.json)."""
    return {
        "pid": os.getpid(),
        "name": info.name,
        "ready": info.ready,
        "port_base": lay.port_base,
        "control_url": info.urls["dashboard"],
        "urls": info.urls,
        # pid and start time: enough to find our own processes again, never a recycled pid
        "processes": {
            n.name: [n.pid, _create_time(n.pid)] for n in supervisor.nodes.values() if n.pid
        },
    }


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _stop_leftovers(data: DataDir, out: Out) -> None:
    """Kill node processes left by a supervisor that died without stopping them."""
    state = data.read_state()
    pid = state.get("pid")
    if not isinstance(pid, int) or psutil.pid_exists(pid):
        return
    victims = []
    for name, entry in dict(state.get("processes") or {}).items():
        try:
            node_pid, created = entry
            proc = psutil.Process(node_pid)
            if created is None or abs(proc.create_time() - created) > 0.01:
                continue  # the pid was reused by someone else's process
        except (psutil.Error, TypeError, ValueError):
            continue
        out(f"  stopping leftover process {node_pid} ({name}) from a previous run")
        with contextlib.suppress(psutil.Error):
            proc.kill()
        victims.append(proc)
    psutil.wait_procs(victims, timeout=10)
