"""NetnsLab's commands, recorded instead of run: it only ever touches namespaces it created."""

from __future__ import annotations

import ipaddress

import pytest

from photostack.blocks.chaos import NetnsError, NetnsLab, netns_capability, pair_addresses
from photostack.blocks.chaos import _netns as netns_module
from photostack.blocks.chaos.testing import RecordingRunner


def _lab() -> tuple[NetnsLab, RecordingRunner]:
    runner = RecordingRunner()
    return NetnsLab("pst1", runner=runner), runner


def test_every_command_names_one_of_the_labs_own_namespaces() -> None:
    lab, runner = _lab()
    a = lab.add_namespace("a")
    b = lab.add_namespace("b")
    pair = lab.connect(a, b)
    lab.partition(pair)
    lab.heal(pair)
    lab.close()
    own = {a, b}
    for argv in runner.commands:
        assert argv[0] == "ip"
        if argv[1] == "-n":  # address and link changes happen inside a namespace
            assert argv[2] in own, argv
        elif argv[1] == "netns":
            assert argv[3] in own, argv
        else:  # the veth pair: both ends created inside the lab's namespaces
            assert argv[1:3] == ["link", "add"]
            assert [argv[i + 1] for i, v in enumerate(argv) if v == "netns"] == [a, b]


def test_partition_sets_both_ends_down_and_heal_up() -> None:
    lab, runner = _lab()
    pair = lab.connect(lab.add_namespace("a"), lab.add_namespace("b"))
    runner.commands.clear()
    lab.partition(pair)
    assert runner.commands == [
        ["ip", "-n", pair.ns_a, "link", "set", "dev", pair.dev_a, "down"],
        ["ip", "-n", pair.ns_b, "link", "set", "dev", pair.dev_b, "down"],
    ]
    runner.commands.clear()
    lab.heal(pair)
    assert [c[-1] for c in runner.commands] == ["up", "up"]


def test_close_deletes_every_namespace_even_when_one_fails() -> None:
    runner = RecordingRunner(fail_on="pst1-a")
    lab = NetnsLab("pst1", runner=RecordingRunner())
    lab.add_namespace("a")
    lab.add_namespace("b")
    lab._run = runner  # the deletion of pst1-a fails
    with pytest.raises(NetnsError, match="pst1-a"):
        lab.close()
    assert ["ip", "netns", "del", "pst1-b"] in runner.commands
    assert lab.namespaces == []


def test_the_lab_refuses_namespaces_it_did_not_create() -> None:
    lab, _ = _lab()
    a = lab.add_namespace("a")
    with pytest.raises(NetnsError):
        lab.connect(a, "someone-elses")
    with pytest.raises(NetnsError):
        lab.exec_argv("someone-elses", ["true"])
    assert lab.exec_argv(a, ["echo", "hi"]) == ["ip", "netns", "exec", a, "echo", "hi"]
    with pytest.raises(ValueError, match="prefix"):
        NetnsLab("has-dash")
    with pytest.raises(ValueError, match="prefix"):
        NetnsLab("waytoolongprefix")


def test_interface_names_fit_the_kernels_limit() -> None:
    lab, _ = _lab()
    a, b = lab.add_namespace("a"), lab.add_namespace("b")
    for _ in range(12):
        pair = lab.connect(a, b)
        assert len(pair.dev_a) <= 15
        assert len(pair.dev_b) <= 15


def test_pair_addresses_are_disjoint_private_slash_30s() -> None:
    pool = ipaddress.IPv4Network("10.213.0.0/16")
    seen: set[str] = set()
    for index in (0, 1, 2, 500, 16383):
        a, b = pair_addresses(index)
        net_a = ipaddress.IPv4Interface(a).network
        assert net_a == ipaddress.IPv4Interface(b).network
        assert net_a.prefixlen == 30
        assert net_a.subnet_of(pool)
        assert net_a.is_private
        assert str(net_a) not in seen
        seen.add(str(net_a))
    with pytest.raises(ValueError, match="outside"):
        pair_addresses(16384)


def test_capability_reports_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns_module.os, "geteuid", lambda: 1000)
    assert netns_capability(RecordingRunner()).reason == "netns unavailable: needs root"
    monkeypatch.setattr(netns_module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns_module.shutil, "which", lambda name: None)
    assert "not installed" in netns_capability(RecordingRunner()).reason
    monkeypatch.setattr(netns_module.shutil, "which", lambda name: f"/usr/sbin/{name}")
    failing = RecordingRunner(fail_on="add")
    capability = netns_capability(failing)
    assert not capability.available
    assert "scripted failure" in capability.reason
    working = netns_capability(RecordingRunner())
    assert working.available
    assert working.to_json() == {"available": True, "reason": working.reason}
