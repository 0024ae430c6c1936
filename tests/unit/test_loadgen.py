"""The load generator's pure parts: plan, percentiles, result and summary math."""
# ruff: noqa: RUF001 - the reports print ratios and counts with the multiplication sign

from __future__ import annotations

import math

import pytest

from photostack.ops.loadgen import LoadPlan, LoadResult, percentile, summarize


def _result(
    latencies_ms: list[float],
    statuses: dict[int, int],
    transport: dict[str, int] | None = None,
    elapsed_s: float = 2.0,
) -> LoadResult:
    return LoadResult(
        latencies_ns=tuple(int(ms * 1e6) for ms in latencies_ms),
        statuses=statuses,
        transport_errors=transport or {},
        elapsed_s=elapsed_s,
    )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 1) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("pct", [0, -1, 100.5])
def test_percentile_rejects_out_of_range(pct: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], pct)


def test_result_counts_non_2xx_and_transport_failures_as_errors() -> None:
    result = _result([1.0] * 10, {200: 6, 204: 1, 404: 2, 503: 1}, {"timeout": 3})
    assert result.responses == 10
    assert result.ok == 7
    assert result.errors == 3 + 3


def test_summary_throughput_counts_2xx_only_and_names_every_error() -> None:
    result = _result([1.0, 2.0, 3.0, 4.0], {200: 3, 503: 1}, {"connection lost": 2}, 0.5)
    summary = summarize(result)
    assert summary.ok == 3
    assert summary.errors == 3
    assert summary.requests_per_s == pytest.approx(6.0)
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.p99_ms == pytest.approx(4.0)
    assert summary.error_detail == "503×1, connection lost×2"


def test_summary_of_an_empty_run_is_nan_not_a_crash() -> None:
    summary = summarize(_result([], {}, elapsed_s=0.0))
    assert summary.ok == 0
    assert math.isnan(summary.requests_per_s)
    assert math.isnan(summary.p50_ms)


def test_plan_encodes_one_keep_alive_request() -> None:
    plan = LoadPlan("127.0.0.1", 8080, "/v1/users/abc", 10, 2, 1.0)
    assert plan.request_bytes() == (
        b"GET /v1/users/abc HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"User-Agent: photostack-loadgen\r\nAccept: */*\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("requests", "concurrency", "cap_s"), [(0, 1, 1.0), (1, 0, 1.0), (1, 1, 0.0)]
)
def test_plan_rejects_empty_bounds(requests: int, concurrency: int, cap_s: float) -> None:
    with pytest.raises(ValueError, match="must"):
        LoadPlan("127.0.0.1", 1, "/", requests, concurrency, cap_s)
