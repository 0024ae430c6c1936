from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "photostack.service",
        "photostack.service.app",
        "photostack.service.web",
        "photostack.service.schema",
        "photostack.service.settings",
        "photostack.service.testing",
        "photostack.blocks.storage",
    ],
)
def test_exports_import(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_schema_covers_every_group() -> None:
    from photostack.service.schema import GROUPS, SCHEMA_VERSION

    assert set(GROUPS) == {"users", "social", "photos"}
    assert all(v >= 1 for v in SCHEMA_VERSION.values())


def test_app_refuses_settings_without_every_group() -> None:
    from photostack.service.app import create_app
    from photostack.service.settings import AppSettings, ShardDsns

    with pytest.raises(ValueError, match="photos"):
        create_app(AppSettings(name="a", storage={"users": (ShardDsns(0, "x"),), "social": ()}))


def test_connect_backoff_is_capped() -> None:
    from photostack.service.app import connect_backoff_s

    delays = [connect_backoff_s(n) for n in range(12)]
    assert delays == sorted(delays)
    assert delays[0] == 0.05
    assert max(delays) == 2.0
