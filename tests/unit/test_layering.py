"""The import rules of DESIGN.md section 4, checked on the source tree (no imports executed)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import photostack

SRC = Path(photostack.__file__).parent

# Blocks that may use another block: the edge proxy is one shape of the balancer core.
BLOCK_EDGES_ALLOWED = {
    ("proxy", "balancer"),
    ("proxy", "ring"),
    ("balancer", "ring"),
    ("storage", "ring"),
    ("cache", "ring"),  # the distributed cache client places keys with the consistent-hash ring
    ("media", "balancer"),  # origin calls reuse the balancer's pooled keep-alive Upstream
    ("media", "cache"),  # the CDN's byte-bounded LRU is the cache block's BoundedCache
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("photostack")}


def _modules(package: str) -> list[tuple[Path, set[str]]]:
    return [(p, _imports(p)) for p in sorted((SRC / package).rglob("*.py"))]


def test_blocks_never_import_service_cluster_or_ops() -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path, names in _modules("blocks")
        for name in names
        if name.split(".")[1] in {"service", "cluster", "ops"}
    ]
    assert bad == []


def test_blocks_import_each_other_only_where_allowed() -> None:
    bad = []
    for path, names in _modules("blocks"):
        own = path.relative_to(SRC / "blocks").parts[0]
        for name in names:
            parts = name.split(".")
            crosses = len(parts) > 2 and parts[1] == "blocks" and parts[2] != own
            if crosses and (own, parts[2]) not in BLOCK_EDGES_ALLOWED:
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert bad == []


def test_ops_never_imports_service() -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path, names in _modules("ops")
        for name in names
        if name.startswith("photostack.service")
    ]
    assert bad == []


def _packages() -> list[str]:
    names = ["photostack"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="photostack."):
        if info.ispkg:
            names.append(info.name)
    return names


@pytest.mark.parametrize("package", _packages())
def test_every_export_imports(package: str) -> None:
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which does not exist"
