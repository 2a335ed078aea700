"""Packaging: the published metadata (SPDX license with its LICENSE file, classifiers, project URLs), runtime
dependencies equal to what the exporter imports at run time (pyroute2 and the test tools live in the `test`
dependency group, not in published extras), and requirements.lock: every runtime dependency pinned exactly,
within pyproject's range, with hashes, which the Dockerfile installs with `--require-hashes`
(tests/unit/test_dockerfile.py reproduces that install). The built wheel's METADATA is read from a real
`python -m build` in test_dockerfile; here pyproject.toml and the code are compared directly."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# import name -> distribution name, for the exporter's third-party imports
DISTRIBUTIONS = {"prometheus_client": "prometheus-client", "dns": "dnspython", "yaml": "pyyaml", "bcrypt": "bcrypt",
                 "kubernetes": "kubernetes"}


def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def runtime_imports() -> set[str]:
    """Top-level modules the exporter package imports, minus the standard library and itself."""
    found: set[str] = set()
    for f in (ROOT / "exporter").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"exporter", "__future__"}


def test_runtime_dependencies_are_what_the_exporter_imports() -> None:
    deps = {canonicalize_name(Requirement(d).name) for d in project()["project"]["dependencies"]}
    imports = runtime_imports()
    assert imports <= set(DISTRIBUTIONS), f"new third-party import without a mapping: {imports - set(DISTRIBUTIONS)}"
    assert deps == {DISTRIBUTIONS[i] for i in imports}


def test_test_tools_are_a_dependency_group_not_published_extras() -> None:
    p = project()
    assert "optional-dependencies" not in p["project"], "test/dev tools must not be published as extras"
    test = {canonicalize_name(Requirement(d).name) for d in p["dependency-groups"]["test"]}
    assert {"pytest", "ruff", "mypy", "pyroute2", "kubernetes-validate"} <= test
    runtime = {canonicalize_name(Requirement(d).name) for d in p["project"]["dependencies"]}
    assert "pyroute2" not in runtime
    assert (ROOT / "scripts" / "bootstrap.sh").read_text().count("--group test") == 1


def test_license_classifiers_and_urls() -> None:
    p = project()["project"]
    assert p["license"] == "Apache-2.0", "an SPDX expression (PEP 639)"
    assert p["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in p["classifiers"]), "PEP 639: no license classifiers"
    assert "Programming Language :: Python :: 3.11" in p["classifiers"]
    assert "Operating System :: POSIX :: Linux" in p["classifiers"]
    for key in ("Homepage", "Source", "Documentation", "Issues"):
        assert p["urls"][key].startswith("https://github.com/conntrack-dns-exporter/"), key
    build = project()["build-system"]["requires"]
    assert any(Requirement(r).name == "setuptools" and Requirement(r).specifier.contains("77") for r in build)
    assert not any(Requirement(r).specifier.contains("76") for r in build if Requirement(r).name == "setuptools"), (
        "license expressions need setuptools 77")


def lock() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: name -> (pinned version, hashes)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "requirements.lock").read_text())
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", line)
        assert m, f"not an exact, hashed pin: {line}"
        out[canonicalize_name(m.group(1))] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    pins = lock()
    for dep in project()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} missing from requirements.lock (run scripts/lock.sh)"
        version, hashes = pins[name]
        assert req.specifier.contains(version), f"{name}=={version} is outside {req.specifier} (run scripts/lock.sh)"
        assert hashes, name
    test_only = {canonicalize_name(Requirement(d).name) for d in project()["dependency-groups"]["test"]}
    assert not set(pins) & test_only, "test tools do not belong in the image's lock"
    assert "scripts/lock.sh" in (ROOT / "requirements.lock").read_text(), "says how to regenerate it"
