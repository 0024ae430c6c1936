"""Real partitions between Linux network namespaces (root only), with iproute2's ``ip``.

``NetnsLab`` creates namespaces and veth pairs between them, runs commands inside a namespace,
and partitions or heals a pair by setting both ends down or up. It touches only what it created:
every namespace name carries the lab's prefix, every address is set with ``ip -n NS`` inside one
of those namespaces, and both ends of every veth pair live inside them, so the host's own
interfaces, routes and addresses are never changed. ``close()`` deletes the namespaces, which
deletes their veth ends with them.

Addresses come from 10.213.0.0/16, one /30 per pair (``pair_addresses``), visible only inside
the lab's namespaces.

nft/iptables DROP rules would give one-way partitions; this machine's image has neither
(Debian's iproute2 only), so partitions here are link-level and symmetric.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from photostack.blocks.chaos._errors import NetnsError, NetnsUnavailable

__all__ = [
    "NetnsCapability",
    "NetnsLab",
    "Runner",
    "VethPair",
    "netns_capability",
    "pair_addresses",
    "require_netns",
    "run_ip",
]

_POOL = ipaddress.IPv4Network("10.213.0.0/16")
_TIMEOUT_S = 10.0

Runner = Callable[[Sequence[str]], None]  # runs one command; raises NetnsError on failure


def run_ip(argv: Sequence[str]) -> None:
    """Run an ``ip`` command. Raises NetnsError with its stderr when it fails."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


@dataclass(frozen=True)
class NetnsCapability:
    available: bool
    reason: str  # why not, or what is used

    def to_json(self) -> dict[str, object]:
        return {"available": self.available, "reason": self.reason}


def netns_capability(runner: Runner = run_ip) -> NetnsCapability:
    """Whether namespaces can be created here, found by creating (and deleting) one."""
    if os.geteuid() != 0:
        return NetnsCapability(False, "netns unavailable: needs root")
    if shutil.which("ip") is None:
        return NetnsCapability(False, "netns unavailable: iproute2's `ip` is not installed")
    probe = f"psprobe{uuid.uuid4().hex[:8]}"
    try:
        runner(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return NetnsCapability(False, f"netns unavailable: {exc}")
    try:
        runner(["ip", "netns", "del", probe])
    except NetnsError as exc:
        return NetnsCapability(False, f"netns unavailable: cannot delete a namespace: {exc}")
    tools = [t for t in ("nft", "iptables") if shutil.which(t)]
    extra = f"; packet filters: {', '.join(tools)}" if tools else "; no nft/iptables: link-level"
    return NetnsCapability(True, f"ip netns + veth{extra}")


def pair_addresses(index: int) -> tuple[str, str]:
    """The two interface addresses (with ``/30``) of veth pair ``index`` (0-based)."""
    subnets = 1 << (30 - _POOL.prefixlen)
    if not 0 <= index < subnets:
        raise ValueError(f"pair index {index} is outside 0..{subnets - 1}")
    base = int(_POOL.network_address) + 4 * index
    return (
        f"{ipaddress.IPv4Address(base + 1)}/30",
        f"{ipaddress.IPv4Address(base + 2)}/30",
    )


@dataclass(frozen=True)
class VethPair:
    """A veth pair between two of the lab's namespaces; addresses without the prefix length."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str


class NetnsLab:
    """Namespaces and links this object created, and nothing else. Use as a context manager."""

    def __init__(self, prefix: str | None = None, runner: Runner = run_ip) -> None:
        # Interface names are limited to 15 bytes: a short prefix leaves room for "v<n>a".
        self.prefix = prefix or f"ps{uuid.uuid4().hex[:6]}"
        if len(self.prefix) > 9 or not self.prefix.isalnum():
            raise ValueError("prefix: at most 9 letters or digits")
        self._run = runner
        self.namespaces: list[str] = []
        self.pairs: list[VethPair] = []

    def __repr__(self) -> str:
        return f"<NetnsLab {self.prefix} ns={self.namespaces} pairs={len(self.pairs)}>"

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_namespace(self, name: str) -> str:
        """Create namespace ``<prefix>-<name>`` with its loopback up; returns its full name."""
        full = f"{self.prefix}-{name}"
        self._run(["ip", "netns", "add", full])
        self.namespaces.append(full)
        self._run(["ip", "-n", full, "link", "set", "dev", "lo", "up"])
        return full

    def connect(self, ns_a: str, ns_b: str) -> VethPair:
        """A veth pair between two of this lab's namespaces, addressed from its own /30."""
        for ns in (ns_a, ns_b):
            if ns not in self.namespaces:
                raise NetnsError(f"{ns} is not a namespace of this lab")
        index = len(self.pairs)
        dev_a, dev_b = f"{self.prefix}v{index}a", f"{self.prefix}v{index}b"
        cidr_a, cidr_b = pair_addresses(index)
        # Created directly inside the namespaces: no end ever exists in the host's namespace.
        self._run(
            ["ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b,
             "netns", ns_b]
        )  # fmt: skip
        for ns, dev, cidr in ((ns_a, dev_a, cidr_a), (ns_b, dev_b, cidr_b)):
            self._run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            self._run(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
        pair = VethPair(ns_a, ns_b, dev_a, dev_b, cidr_a.split("/")[0], cidr_b.split("/")[0])
        self.pairs.append(pair)
        return pair

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``ns`` (for subprocess.Popen and friends)."""
        if ns not in self.namespaces:
            raise NetnsError(f"{ns} is not a namespace of this lab")
        return ["ip", "netns", "exec", ns, *argv]

    def partition(self, pair: VethPair) -> None:
        """Cut the pair: both ends down, so neither side's packets reach the other."""
        self._set(pair, "down")

    def heal(self, pair: VethPair) -> None:
        self._set(pair, "up")

    def _set(self, pair: VethPair, state: str) -> None:
        if pair not in self.pairs:
            raise NetnsError("not a pair of this lab")
        self._run(["ip", "-n", pair.ns_a, "link", "set", "dev", pair.dev_a, state])
        self._run(["ip", "-n", pair.ns_b, "link", "set", "dev", pair.dev_b, state])

    def close(self) -> None:
        """Delete every namespace this lab created (their veth ends go with them)."""
        errors = []
        for ns in reversed(self.namespaces):
            try:
                self._run(["ip", "netns", "del", ns])
            except NetnsError as exc:
                errors.append(str(exc))
        self.namespaces.clear()
        self.pairs.clear()
        if errors:
            raise NetnsError("; ".join(errors))


def require_netns(runner: Runner = run_ip) -> None:
    """Raises NetnsUnavailable (with the reason) when namespaces cannot be used here."""
    capability = netns_capability(runner)
    if not capability.available:
        raise NetnsUnavailable(capability.reason)
