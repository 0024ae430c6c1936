"""Drill bookkeeping as pure logic: the figures from a log of operations, expected vs observed,
verdicts, the registry and the report."""

from __future__ import annotations

import json
import math

import pytest

from photostack.ops import drill
from photostack.ops._drill_model import (
    Check,
    LoadLog,
    Op,
    Outcome,
    ScenarioResult,
    at_most,
    equals,
    standard_figures,
)


def _log(*ops: Op) -> LoadLog:
    log = LoadLog()
    for op in ops:
        log.record(op)
    return log


def _w(start: float, end: float, ok: bool = True, key: str = "") -> Op:
    return Op("write", start, end, ok, 204 if ok else None, "" if ok else "ConnectError", key)


def test_writes_resume_after_the_last_failure_following_the_fault() -> None:
    log = _log(
        _w(0.0, 0.1),  # before the fault
        _w(10.0, 10.5, ok=False),
        _w(11.0, 11.2, ok=False),
        _w(11.1, 11.4),  # acknowledged, but began before the last failure
        _w(12.0, 12.3),  # the first write that began after it
        _w(13.0, 13.1),
    )
    assert log.writes_resume_s(10.0) == pytest.approx(2.3)


def test_a_stall_without_errors_counts_until_the_first_write_completes() -> None:
    log = _log(_w(10.0, 14.0), _w(14.0, 14.1))
    assert log.writes_resume_s(10.0) == pytest.approx(4.0)
    assert log.writes_resume_s(20.0) is None  # nothing acknowledged after that
    assert _log(_w(10.0, 10.1, ok=False)).writes_resume_s(10.0) is None


def test_failures_stale_reads_and_served_by() -> None:
    log = _log(
        _w(0, 1, key="a>b"),
        _w(1, 2, ok=False, key="a>c"),
        Op("read", 2, 3, True, 200, served_by="web-1,app-2", stale=True),
        Op("read", 4, 5, False, 503, "HTTP 503 storage_unavailable"),
        Op("upload", 5, 6, False, 502, idempotent=False),
        Op("read", 6, 7, True, 200, served_by="web-1,app-1", marked_stale=True),
    )
    assert log.acknowledged_writes() == ["a>b"]
    assert len(log.failed()) == 3
    assert len(log.failed(idempotent_only=True)) == 2
    assert len(log.failed(since_s=3.5, until_s=5.5)) == 2
    assert [op.started_s for op in log.stale_reads()] == [2]
    assert log.stale_reads(since_s=3) == []
    assert log.served_by("app-2") == 1
    assert log.served_by("app-2", since_s=3) == 0
    assert log.served_by("web-1") == 2
    assert (
        log.error_summary(log.failed())
        == "ConnectError x1, HTTP 503 storage_unavailable x1, HTTP 502 x1"
    )
    assert standard_figures(log, fault_s=0.5, missing=1) == {
        "writes_resume_s": None,
        "requests": 6,
        "requests_failed": 3,
        "acknowledged_writes": 1,
        "acknowledged_writes_missing": 1,
        "stale_reads": 1,
        "stale_reads_marked": 1,
    }


def test_latency_percentiles_cover_successes_of_one_kind_in_a_window() -> None:
    log = _log(*(_w(float(i), i + 0.01 * (i + 1)) for i in range(100)), _w(0, 50, ok=False))
    assert log.latency_ms("write", 50) == pytest.approx(500.0)
    assert log.latency_ms("write", 99, since_s=90) == pytest.approx(1000.0)
    assert math.isnan(log.latency_ms("read", 50))


def test_checks_say_expected_and_observed() -> None:
    assert equals("missing", 0, 0) == Check("missing", "0", "0", True)
    assert not equals("missing", 0, 2).passed
    assert at_most("resume", 3.0, 0.25, " s") == Check("resume", "<= 3 s", "0.25 s", True)
    assert at_most("resume", 3.0, None, " s") == Check("resume", "<= 3 s", "never", False)
    assert not at_most("resume", 3.0, 3.5).passed


def test_a_scenario_passes_only_when_every_check_holds() -> None:
    good = equals("a", 0, 0)
    bad = equals("b", 0, 1)
    assert ScenarioResult.judged("s", "sum", [good], {}).outcome is Outcome.PASSED
    assert ScenarioResult.judged("s", "sum", [good, bad], {}).outcome is Outcome.FAILED
    assert ScenarioResult.judged("s", "sum", [], {}).outcome is Outcome.FAILED  # nothing checked
    skipped = ScenarioResult.skipped("s", "sum", "needs 2 app nodes")
    assert skipped.outcome is Outcome.SKIPPED
    assert skipped.to_json()["notes"] == ["needs 2 app nodes"]
    body = ScenarioResult.judged("s", "sum", [bad], {"x": 1}, duration_s=1.234).to_json()
    assert body["passed"] is False
    assert body["duration_s"] == 1.23
    assert body["checks"][0] == {"name": "b", "expected": "0", "observed": "1", "passed": False}


def test_the_registry_holds_todays_scenarios_once_each() -> None:
    names = drill.scenario_names()
    assert names[:5] == ["web-node", "app-node", "cache-node", "workers", "latency"]
    assert names[5:] == ["failover", "partition"]  # issue 5 (docs/replication.md)
    assert len(set(names)) == len(names)
    assert all(s.summary for s in drill.SCENARIOS)


def test_an_unknown_scenario_is_a_usage_error_before_any_contact() -> None:
    lines: list[str] = []
    code = drill.run_drill("nope", "http://127.0.0.1:9", drill.DrillOptions(), lines.append)
    assert code == drill.EXIT_USAGE
    assert lines == [
        "error: unknown scenario 'nope' (known: " + ", ".join(drill.scenario_names()) + ", all)"
    ]


def test_the_report_renders_checks_figures_and_notes() -> None:
    result = ScenarioResult.judged(
        "app-node",
        "kill an app node",
        [equals("failed idempotent requests", 0, 0)],
        standard_figures(_log(_w(0, 0.1)), 0.0, 0),
        notes=("victim app-2",),
    )
    report = {
        "cluster": "c",
        "capabilities": {"netns": {"available": False, "reason": "netns unavailable: needs root"}},
        "passed": True,
        "scenarios": [
            result.to_json(),
            ScenarioResult.skipped("latency", "l", "no links").to_json(),
        ],
    }
    text = drill.render(report)
    assert "netns partitions: unavailable (netns unavailable: needs root)" in text
    assert "app-node: PASSED" in text
    assert "latency: SKIPPED" in text
    assert "failed idempotent requests" in text
    assert "time until writes resume 0.10 s" in text
    assert "note: no links" in text
    assert "every expectation held" in text
    json.dumps(report)  # the --json form is plain JSON
