"""One source of truth for the two deployment forms: the Helm chart with its default values (plus the CRD
objects switched on) and the kustomize example overlay render the same pod spec (every field but the image
reference, which is checked separately), the same RBAC rules, subjects and namespaces, the same Service spec,
the same scrape endpoints, the same PrometheusRule groups and the same dashboard. A change to either form
alone fails here. Both are rendered offline (real helm, `kubectl kustomize`)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from .render import CHART, NS, ROOT, Obj, helm_template, kustomize, one

ALL_ON = ("serviceMonitor.enabled=true", "podMonitor.enabled=true", "prometheusRule.enabled=true",
          "dashboards.enabled=true")


def helm_objs() -> tuple[Obj, ...]:
    return helm_template(NS, NS, *ALL_ON)


def kustomize_objs() -> tuple[Obj, ...]:
    # The example overlay plus the PodMonitor component, the other scrape alternative.
    return kustomize("deploy/overlays/example") + _podmonitor()


def _podmonitor() -> tuple[Obj, ...]:
    return tuple(yaml.safe_load_all((ROOT / "deploy/components/podmonitor/podmonitor.yaml").read_text()))


def without_image(pod: Obj) -> Obj:
    pod = copy.deepcopy(pod)
    for c in pod["containers"]:
        c.pop("image")
    return pod


def test_pod_spec_is_identical_but_for_the_image() -> None:
    h = one(helm_objs(), "DaemonSet")["spec"]
    k = one(kustomize_objs(), "DaemonSet")["spec"]
    assert without_image(h["template"]["spec"]) == without_image(k["template"]["spec"])
    assert h["updateStrategy"] == k["updateStrategy"]


def test_image_is_the_same_release() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    images = yaml.safe_load((ROOT / "deploy/base/kustomization.yaml").read_text())["images"]
    (img,) = images
    assert img["newName"] == values["image"]["repository"]
    assert img["newTag"] == chart["appVersion"]
    hc = one(helm_objs(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    kc = one(kustomize_objs(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert hc["image"] == kc["image"]


def _rbac(objs: tuple[Obj, ...]) -> dict[tuple[str, str | None], Obj]:
    out = {}
    for o in objs:
        if o["kind"] in ("Role", "ClusterRole"):
            out[(o["kind"], o["metadata"].get("namespace"))] = {"rules": o["rules"]}
        elif o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            out[(o["kind"], o["metadata"].get("namespace"))] = {"roleRef": o["roleRef"], "subjects": o["subjects"]}
    return out


def test_rbac_is_identical() -> None:
    h, k = _rbac(helm_objs()), _rbac(kustomize_objs())
    assert set(h) == {("ClusterRole", None), ("ClusterRoleBinding", None), ("Role", "kube-system"),
                      ("RoleBinding", "kube-system")}
    assert h == k


def test_service_account_and_service() -> None:
    h, k = helm_objs(), kustomize_objs()
    for objs in (h, k):
        assert one(objs, "ServiceAccount")["metadata"]["namespace"] == NS
        assert "automountServiceAccountToken" not in one(objs, "ServiceAccount")
    hs, ks = one(h, "Service")["spec"], one(k, "Service")["spec"]
    assert {k_: v for k_, v in hs.items() if k_ != "selector"} == {k_: v for k_, v in ks.items() if k_ != "selector"}


@pytest.mark.parametrize(("kind", "key"), [("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")])
def test_scrape_endpoints_are_identical(kind: str, key: str) -> None:
    h, k = one(helm_objs(), kind)["spec"], one(kustomize_objs(), kind)["spec"]
    assert h[key] == k[key]
    assert h["namespaceSelector"] == k["namespaceSelector"]
    assert "jobLabel" not in h and "jobLabel" not in k


def test_rules_and_dashboard_are_identical() -> None:
    h, k = helm_objs(), kustomize_objs()
    assert one(h, "PrometheusRule")["spec"] == one(k, "PrometheusRule")["spec"]
    hd = {key: json.loads(v) for key, v in one(h, "ConfigMap")["data"].items()}
    kd = {key: json.loads(v) for key, v in one(k, "ConfigMap")["data"].items()}
    assert hd == kd
    for objs in (h, k):
        assert one(objs, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_nothing_security_relevant_is_left_out_of_the_comparison() -> None:
    """The objects compared above are every object of both renders (the Namespace exists only in kustomize:
    Helm does not own the namespace it installs into)."""
    compared = {"DaemonSet", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount",
                "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    assert {o["kind"] for o in helm_objs()} == compared
    assert {o["kind"] for o in kustomize_objs()} == compared | {"Namespace"}
