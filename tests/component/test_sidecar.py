"""`photostack sidecar` as a user runs it: a process in front of two plain HTTP servers."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from photostack.blocks.balancer.testing import closed_port
from photostack.cluster.engines.testing import free_port

pytestmark = pytest.mark.component


def _server(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"{name} {self.path}".encode()
            self.send_response(200)
            self.send_header("X-Served-By", name)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def backends() -> Iterator[list[ThreadingHTTPServer]]:
    servers = [_server("one"), _server("two")]
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _sidecar(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "photostack.cli", "sidecar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _first_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        lines.put(process.stdout.readline())

    threading.Thread(target=read, daemon=True).start()
    return lines.get(timeout=timeout_s)


def test_a_plain_http_client_is_balanced(backends: list[ThreadingHTTPServer]) -> None:
    port = free_port()
    upstreams = [f"--upstream=127.0.0.1:{s.server_address[1]}" for s in backends]
    dead = f"--upstream=127.0.0.1:{closed_port()}"  # refused: retried elsewhere, then ejected
    process = _sidecar("--listen", f"127.0.0.1:{port}", *upstreams, dead)
    try:
        line = _first_line(process, 20.0)
        assert line.startswith(f"sidecar: http://127.0.0.1:{port}"), line
        served: Counter[str] = Counter()
        for i in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello/{i}", timeout=5) as r:
                assert r.status == 200
                served[r.headers["X-Served-By"]] += 1
                assert r.read().decode().endswith(f"/hello/{i}")
        assert set(served) == {"one", "two"}
        assert abs(served["one"] - served["two"]) <= 2
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Missing option '--upstream'"),
        (("--upstream", "nohost"), "--upstream must be HOST:PORT"),
        (("--upstream", "127.0.0.1:1", "--strategy", "fastest"), "unknown strategy"),
        (("--upstream", "127.0.0.1:1", "--listen", "x"), "--listen must be HOST:PORT"),
        (("--upstream", "127.0.0.1:1=0"), "weight must be a positive number"),
        (("--upstream", "127.0.0.1:1", "--frobnicate"), "No such option"),
    ],
)
def test_bad_flags_give_one_line_and_a_nonzero_exit(args: tuple[str, ...], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "photostack.cli", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_a_taken_port_is_one_line_too() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as taken:
        port = taken.server_address[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "photostack.cli",
                "sidecar",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                "127.0.0.1:1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")
