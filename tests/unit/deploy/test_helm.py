"""The Helm chart (deploy/helm/conntrack-dns-exporter/), tested with the real helm 3.17 binary: `helm lint
--strict`, `helm template` with the default values, the kube-prometheus-stack values file and a non-default
values file (ci/), every core object validated with kubernetes-validate, and every render held to the same
least-privilege and wiring assertions as the kustomize overlays (tests/unit/deploy/policy.py). No cluster:
`helm template` renders offline, as `kubectl kustomize` does for the kustomize tests."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from exporter.cli import parse_args

from . import policy
from .render import CHART, HELM_VERSION, NS, ROOT, Obj, helm, helm_template, kustomize, one

KPS_VALUES = str(CHART / "values-kube-prometheus-stack.yaml")
NON_DEFAULT = str(CHART / "ci" / "non-default-values.yaml")
RULE_FILE = ROOT / "alerts" / "conntrack-dns-exporter.rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "conntrack-dns-exporter.json"

sys.path.insert(0, str(ROOT / "scripts"))
import gen_alerts  # noqa: E402
import gen_chart_readme  # noqa: E402

# name -> (render, port, DNS Service namespace/name)
RENDERS: dict[str, tuple[Callable[[], tuple[Obj, ...]], int, tuple[str, str]]] = {
    "kustomize-example": (lambda: kustomize("deploy/overlays/example"), 19153, ("kube-system", "kube-dns")),
    "kustomize-kube-prometheus-stack": (lambda: kustomize("deploy/overlays/kube-prometheus-stack"), 19153,
                                        ("kube-system", "kube-dns")),
    "helm-default": (lambda: helm_template(), 19153, ("kube-system", "kube-dns")),
    "helm-kube-prometheus-stack": (lambda: helm_template(NS, NS, KPS_VALUES), 19153, ("kube-system", "kube-dns")),
    "helm-non-default": (lambda: helm_template("kps-node", "monitoring-nodes", NON_DEFAULT), 29153,
                         ("dns-system", "coredns")),
}


def test_the_real_helm_binary_is_installed() -> None:
    r = helm("version", "--template", "{{.Version}}")
    assert r.stdout.strip() == HELM_VERSION


@pytest.mark.parametrize("values", [None, KPS_VALUES, NON_DEFAULT], ids=["default", "kps", "non-default"])
def test_helm_lint_strict(values: str | None) -> None:
    r = helm("lint", "--strict", str(CHART), *(["-f", values] if values else []))
    assert "1 chart(s) linted, 0 chart(s) failed" in r.stdout, r.stdout


@pytest.mark.parametrize("name", RENDERS)
def test_every_render_validates_and_is_least_privilege(name: str) -> None:
    render, port, (dns_ns, dns_name) = RENDERS[name]
    objs = render()
    policy.validate_core(objs)
    policy.check_pod_privileges(objs)
    policy.check_wiring(objs, port)
    policy.check_rbac(objs, dns_ns, dns_name)
    if any(o["kind"] == "Service" for o in objs):
        policy.check_headless_service(objs, port)
    if any(o["kind"] == "PrometheusRule" for o in objs):
        policy.check_monitor_feeds_the_rules(objs)


def test_default_values_install_no_crd_objects() -> None:
    """A plain `helm install` works on a cluster without the prometheus-operator CRDs."""
    objs = helm_template()
    assert policy.only_crd_objects_are(objs) == set()
    assert {o["kind"] for o in objs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                                         "RoleBinding", "DaemonSet", "Service"}
    spec = policy.pod_spec(objs)
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    for o in objs:
        if o["kind"] in ("Role", "RoleBinding"):
            assert o["metadata"]["namespace"] == "kube-system", "the Role lives next to the DNS Service"
        elif o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NS


def test_kube_prometheus_stack_values_label_everything_for_its_selectors() -> None:
    objs = helm_template(NS, NS, KPS_VALUES)
    assert policy.only_crd_objects_are(objs) == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
    for kind in ("ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"):
        assert one(objs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    pr = one(objs, "PrometheusRule")
    assert pr["spec"] == yaml.safe_load(RULE_FILE.read_text()), "the PrometheusRule is the shipped rule file"
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Kubernetes / Networking"}
    ((key, text),) = cm["data"].items()
    assert key == DASHBOARD.name
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


def test_the_alertmanager_config_carries_the_shipped_inhibition() -> None:
    """With `alertmanagerConfig.enabled` the chart installs the same inhibit rules as the kustomize component
    (and alerts/alertmanager/inhibit-rules.yaml, which amtool checks), labelled for the operator's selector."""
    objs = helm_template(NS, NS, "alertmanagerConfig.enabled=true",
                         "alertmanagerConfig.additionalLabels.alertmanagerConfig=main")
    amc = one(objs, "AlertmanagerConfig")
    component = yaml.safe_load((ROOT / "deploy/components/alertmanagerconfig/alertmanagerconfig.yaml").read_text())
    assert amc["spec"] == component["spec"] and amc["spec"]["inhibitRules"]
    assert amc["metadata"]["namespace"] == NS and amc["metadata"]["labels"]["alertmanagerConfig"] == "main"
    assert not [o for o in helm_template() if o["kind"] == "AlertmanagerConfig"], "off by default"


def test_non_default_values_reach_every_object() -> None:
    objs = helm_template("kps-node", "monitoring-nodes", NON_DEFAULT)
    c = policy.container(objs)
    digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    assert c["image"] == f"registry.example/mirror/conntrack-dns-exporter:0.1.0@{digest}"
    assert policy.pod_spec(objs)["imagePullSecrets"] == [{"name": "registry-example"}]
    args = parse_args(c["args"])
    assert args.kubernetes_dns_service == ("dns-system", "coredns"), "Role and flag move together"
    assert "--probe.nodelocal=169.254.20.10" in c["args"]
    assert args.web_telemetry_path == "/node/metrics"
    assert {e["name"] for e in c["env"]} == {"NODE_NAME", "CONNTRACK_DNS_EXPORTER_LOG_LEVEL"}
    assert one(objs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "networking"}
    kinds = {o["kind"] for o in objs}
    assert "Service" not in kinds and "ServiceMonitor" not in kinds
    pm, pr, cm = one(objs, "PodMonitor"), one(objs, "PrometheusRule"), one(objs, "ConfigMap")
    for o in (pm, pr, cm):
        assert o["metadata"]["labels"]["release"] == "kps", o["kind"]
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    assert policy.rules_jobs(pr["spec"]) == {"node-dns"}
    urls = [r["annotations"]["runbook_url"] for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u == f"https://wiki.example/runbooks/{u.rsplit('/', 1)[1]}" for u in urls)
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Networking"}


def test_the_chart_substitutes_exactly_what_the_generator_writes() -> None:
    """The template replaces gen_alerts' default job and runbook base URL; if either constant changed without
    the template, a default would survive somewhere in the rendered rules."""
    pr = one(helm_template("kps-node", "monitoring-nodes", NON_DEFAULT), "PrometheusRule")
    text = json.dumps(pr["spec"])
    assert f'job=\\"{gen_alerts.DEFAULT_JOB}\\"' not in text
    assert gen_alerts.RUNBOOK_BASE_URL not in text
    shipped = yaml.safe_load(RULE_FILE.read_text())
    assert [r.get("alert") or r["record"] for g in pr["spec"]["groups"] for r in g["rules"]] == [
        r.get("alert") or r["record"] for g in shipped["groups"] for r in g["rules"]]
    assert len(policy.rules_jobs(shipped)) == 1


def test_a_servicemonitor_without_its_service_fails_with_one_line() -> None:
    r = helm("template", "x", str(CHART), "--set", "serviceMonitor.enabled=true,service.enabled=false", check=False)
    assert r.returncode != 0
    assert "serviceMonitor.enabled needs service.enabled" in r.stderr


@pytest.mark.parametrize(("setting", "message"), [
    ("serviceMonitor.enable=true", "serviceMonitor: Additional property enable is not allowed"),
    ("servicemonitor.enabled=true", "Additional property servicemonitor is not allowed"),
    ("port=abc", "port: Invalid type. Expected: integer, given: string"),
    ("port=70000", "port: Must be less than or equal to 65535"),
    ("prometheusRule.enabled=yes", "prometheusRule.enabled: Invalid type. Expected: boolean, given: string"),
])
def test_a_mistyped_value_stops_with_a_message_naming_it(setting: str, message: str) -> None:
    """values.schema.json (generated from values.yaml): a typo is an error, not a silently ignored key."""
    r = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_numbers_where_strings_are_expected_are_accepted() -> None:
    objs = helm_template(NS, NS, "image.tag=1.2", "dashboards.enabled=true", "dashboards.labelValue=1")
    assert policy.container(objs)["image"].endswith(":1.2")
    assert one(objs, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_generated_chart_files_are_current() -> None:
    assert gen_alerts.main(["--check"]) == 0, "run python scripts/gen_alerts.py"
    assert gen_chart_readme.main(["--check"]) == 0, "run python scripts/gen_chart_readme.py"
    chart_copy = CHART / "files" / DASHBOARD.name
    assert chart_copy.read_text() == DASHBOARD.read_text(), "run python scripts/gen_dashboard.py"


def test_chart_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {k for k, *_ in gen_chart_readme.rows((CHART / "values.yaml").read_text())}
    for key, v in values.items():
        subkeys = [f"{key}.{s}" for s in v] if isinstance(v, dict) and v and key not in (
            "nodeSelector", "affinity", "updateStrategy", "livenessProbe", "readinessProbe", "podSecurityContext",
            "securityContext") else [key]
        for k in subkeys:
            assert k in documented or any(d.startswith(k + ".") for d in documented), f"{k} has no `# --` comment"


def test_packaged_chart_renders_the_same(tmp_path: Path) -> None:
    """`helm package` keeps files/ (rules, dashboard) and leaves ci/ out; the package renders identically."""
    r = helm("package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("conntrack-dns-exporter-*.tgz")
    assert str(tgz) in r.stdout
    with tarfile.open(tgz) as t:
        names = set(t.getnames())
    assert "conntrack-dns-exporter/files/conntrack-dns-exporter.rules.yaml" in names
    assert "conntrack-dns-exporter/values-kube-prometheus-stack.yaml" in names
    assert not any("/ci/" in n for n in names)
    out = helm("template", NS, str(tgz), "--namespace", NS, "-f", KPS_VALUES).stdout
    assert tuple(d for d in yaml.safe_load_all(out) if d) == helm_template(NS, NS, KPS_VALUES)


def test_helm_binary_install_is_idempotent() -> None:
    """The bootstrap step that installs helm does nothing when the pinned version is already there."""
    venv = str(Path(sys.executable).parent.parent)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install_helm.sh")], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "VENV": venv})
    assert r.returncode == 0, r.stderr
    assert "fetching" not in r.stdout + r.stderr
