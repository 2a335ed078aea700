"""The layout is the architecture (docs/architecture.md): data paths never import each other, shared
layers never import upwards, and no module grows past one responsibility's size."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "exporter"
SHARED = {"core", "netlink", "discovery"}
TOP = {"app", "cli", "features", "record", "diagnose", "__main__", "__init__"}  # wiring: may import anything
# what each shared layer may import (besides itself)
SHARED_ALLOWED = {"core": {"discovery"}, "netlink": {"core"}, "discovery": set()}


def _imports(path: Path) -> set[str]:
    """First component below `exporter.` of every exporter module this file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "exporter" \
                else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "exporter" and len(parts) > 1 and parts[1] != "__version__":
                out.add(parts[1])
    return out


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_data_path_imports_another_and_no_upward_import() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        if unit in TOP:
            continue
        allowed = SHARED_ALLOWED.get(unit, SHARED) | {unit}
        for dep in _imports(path) - allowed:
            problems.append(f"{path.relative_to(ROOT)} ({unit}) imports exporter.{dep}")
    assert not problems, problems


def test_no_module_over_500_lines() -> None:
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not big, big


def test_unit_tests_mirror_the_packages() -> None:
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    unit = ROOT / "tests" / "unit"
    missing = sorted(p for p in packages - {"discovery"} if not list((unit / p).glob("test_*.py")))
    assert not missing, f"packages without tests/unit/<package>/: {missing}"
