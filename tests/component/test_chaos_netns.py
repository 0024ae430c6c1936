"""A real partition between two network namespaces (root + iproute2 only): TCP between them
works, stops while the veth pair is cut, and works again once healed.

Namespaces are an optional capability (docs/chaos.md): where they cannot be created the test
skips with the reason, in CI too.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from photostack.blocks.chaos import NetnsLab, VethPair, netns_capability

pytestmark = pytest.mark.component

PORT = 7000
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.settimeout(float(sys.argv[3]))
        sys.exit(0 if c.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"""


@pytest.fixture
def lab() -> Iterator[tuple[NetnsLab, VethPair]]:
    capability = netns_capability()
    if not capability.available:
        pytest.skip(capability.reason)  # optional capability: skipped with its reason, even in CI
    with NetnsLab() as lab:
        a, b = lab.add_namespace("a"), lab.add_namespace("b")
        yield lab, lab.connect(a, b)


def _reaches(lab: NetnsLab, pair: VethPair, timeout_s: float) -> bool:
    argv = lab.exec_argv(
        pair.ns_a, [sys.executable, "-c", CLIENT, pair.addr_b, str(PORT), str(timeout_s)]
    )
    return subprocess.run(argv, timeout=timeout_s + 10, check=False).returncode == 0


def test_a_partition_blocks_traffic_between_namespaces_and_heals(
    lab: tuple[NetnsLab, VethPair],
) -> None:
    netns, pair = lab
    server = subprocess.Popen(
        netns.exec_argv(pair.ns_b, [sys.executable, "-c", SERVER, pair.addr_b, str(PORT)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"  # bound: ready
        assert _reaches(netns, pair, 2.0)
        netns.partition(pair)
        assert not _reaches(netns, pair, 1.0)
        netns.heal(pair)
        assert _reaches(netns, pair, 5.0)
    finally:
        server.kill()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def test_the_host_never_sees_the_labs_interfaces(lab: tuple[NetnsLab, VethPair]) -> None:
    _, pair = lab
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert pair.dev_a not in host_links.stdout
    assert pair.dev_b not in host_links.stdout
    host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    assert pair.addr_a not in host_addrs.stdout
