"""Shared test helpers: engine-needing tests fail in CI instead of skipping."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def engine_missing(reason: str) -> None:
    """An engine a test needs is unavailable: a failure in CI, a skip on a developer's machine."""
    if IN_CI:
        pytest.fail(f"engine unavailable in CI: {reason}")
    pytest.skip(reason)
