"""The retry rule and request encoding: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photostack.blocks.balancer import (
    IDEMPOTENT_METHODS,
    FailureStage,
    RetryVerdict,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
    encode_request,
    failure_reason,
    max_tries_for,
    may_retry,
    retry_verdict,
)

METHODS = st.sampled_from(["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"])


@given(METHODS, st.integers(1, 5), st.integers(1, 5))
def test_before_send_retries_any_method_within_budget(method: str, done: int, budget: int) -> None:
    allowed = may_retry(
        method=method,
        headers=(),
        stage=FailureStage.BEFORE_SEND,
        tries_done=done,
        max_tries=budget,
    )
    assert allowed == (done < budget)


@given(METHODS, st.booleans())
def test_after_send_retries_only_idempotent(method: str, has_key: bool) -> None:
    headers = [("Idempotency-Key", "k")] if has_key else []
    allowed = may_retry(
        method=method, headers=headers, stage=FailureStage.AFTER_SEND, tries_done=1, max_tries=3
    )
    assert allowed == (method in IDEMPOTENT_METHODS or has_key)


def test_empty_idempotency_key_does_not_count() -> None:
    assert not may_retry(
        method="POST",
        headers=[("idempotency-key", "")],
        stage=FailureStage.AFTER_SEND,
        tries_done=1,
        max_tries=3,
    )


@pytest.mark.parametrize(("count", "expected"), [(0, 1), (1, 1), (2, 2), (3, 3), (9, 3)])
def test_max_tries(count: int, expected: int) -> None:
    assert max_tries_for(count) == expected


def test_failure_reasons_and_stage() -> None:
    refused = UpstreamConnectError("x", backend="a", request_sent=False)
    reset = UpstreamConnectError("x", backend="a", request_sent=True)
    assert failure_reason(refused) == "connect"
    assert failure_reason(reset) == "reset"
    assert failure_reason(UpstreamTimeout("x", backend="a", request_sent=True)) == "timeout"
    assert failure_reason(UpstreamProtocolError("x", backend="a", request_sent=True)) == "protocol"
    assert FailureStage.of(refused) is FailureStage.BEFORE_SEND
    assert FailureStage.of(reset) is FailureStage.AFTER_SEND


def test_encode_request_frames_the_body_and_adds_host() -> None:
    data = encode_request(
        "POST",
        "/v1/x?y=1",
        [("Content-Length", "999"), ("Connection", "close"), ("X-A", "1")],
        b"hello",
        default_host="10.0.0.1:80",
    )
    assert data == (
        b"POST /v1/x?y=1 HTTP/1.1\r\nX-A: 1\r\nHost: 10.0.0.1:80\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert b"Host: mine" in encode_request("GET", "/", [("Host", "mine")], b"", default_host="x")
    assert b"Content-Length" not in encode_request("GET", "/", [], b"", default_host="x")


def test_encode_request_rejects_header_injection() -> None:
    with pytest.raises(ValueError, match="invalid header"):
        encode_request("GET", "/", [("X-A", "1\r\nEvil: 1")], b"", default_host="x")


# -- the whole verdict: every (phase, method, key) case ----------------------------------------

ALL_METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"]


@pytest.mark.parametrize("stage", list(FailureStage))
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("key", [None, "", "k-1"])
def test_retry_verdict_for_every_phase_method_and_key(
    stage: FailureStage, method: str, key: str | None
) -> None:
    headers = [] if key is None else [("Idempotency-Key", key)]
    spent: list[int] = []

    def budget() -> bool:
        spent.append(1)
        return True

    verdict = retry_verdict(
        method=method,
        headers=headers,
        stage=stage,
        tries_done=1,
        max_tries=3,
        time_left_s=1.0,
        budget_allows=budget,
    )
    safe = stage is FailureStage.BEFORE_SEND or method in IDEMPOTENT_METHODS or bool(key)
    assert verdict is (RetryVerdict.RETRY if safe else RetryVerdict.MAY_HAVE_BEEN_PROCESSED)
    assert spent == ([1] if safe else [])  # the budget is only charged for real retries
    if method == "POST" and stage is FailureStage.AFTER_SEND and not key:
        assert verdict is not RetryVerdict.RETRY  # never: the POST may have been processed


def test_retry_verdict_order_tries_deadline_budget() -> None:
    def verdict(tries_done: int, time_left_s: float, budget: bool) -> RetryVerdict:
        return retry_verdict(
            method="GET",
            headers=(),
            stage=FailureStage.AFTER_SEND,
            tries_done=tries_done,
            max_tries=3,
            time_left_s=time_left_s,
            budget_allows=lambda: budget,
        )

    assert verdict(3, 1.0, True) is RetryVerdict.NO_TRIES_LEFT
    assert verdict(1, 0.0, True) is RetryVerdict.DEADLINE
    assert verdict(1, 1.0, False) is RetryVerdict.BUDGET_EXHAUSTED


@pytest.mark.parametrize("stage", list(FailureStage))
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("key", [None, "k-1"])
def test_a_streamed_body_is_retried_only_before_send(
    stage: FailureStage, method: str, key: str | None
) -> None:
    headers = [] if key is None else [("Idempotency-Key", key)]
    verdict = retry_verdict(
        method=method,
        headers=headers,
        stage=stage,
        tries_done=1,
        max_tries=3,
        time_left_s=1.0,
        budget_allows=lambda: True,
        body_replayable=False,
    )
    if stage is FailureStage.BEFORE_SEND:
        assert verdict is RetryVerdict.RETRY  # nothing of the body was read yet
    elif method in IDEMPOTENT_METHODS or key:
        assert verdict is RetryVerdict.BODY_NOT_REPLAYABLE  # safe to repeat, but it is gone
    else:
        assert verdict is RetryVerdict.MAY_HAVE_BEEN_PROCESSED
