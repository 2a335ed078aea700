"""kube-prometheus-stack fit of the kustomize tree: its Prometheus selects ServiceMonitors, PodMonitors and
PrometheusRules by `release: <its release>`, and its Grafana sidecar loads ConfigMaps labelled
`grafana_dashboard: "1"` (folder from the `grafana_folder` annotation when the sidecar's folderAnnotation is
set). The kube-prometheus-stack overlay and component must label exactly those objects, and nothing else; the
PodMonitor component is the alternative to the ServiceMonitor. Rendered offline with `kubectl kustomize`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from . import policy
from .render import ROOT, helm_template, kustomize, one

KPS = "deploy/overlays/kube-prometheus-stack"
CRDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "AlertmanagerConfig"}


def test_overlay_labels_what_kube_prometheus_stack_selects() -> None:
    objs = kustomize(KPS)
    assert policy.only_crd_objects_are(objs) == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
    for o in objs:
        labels = o["metadata"].get("labels", {})
        if o["kind"] in CRDS:
            assert labels["release"] == "kube-prometheus-stack", o["kind"]
        else:
            assert "release" not in labels, f"{o['kind']} needs no release label"
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Kubernetes / Networking"}


def test_overlay_is_the_example_plus_labels() -> None:
    """Same objects, same specs as the example overlay: the component only adds metadata; the overlay adds
    the inhibition (the component's generated AlertmanagerConfig, unchanged but for the label)."""
    def strip(o: dict[str, Any]) -> dict[str, Any]:
        o = yaml.safe_load(yaml.safe_dump(o))
        o["metadata"].get("labels", {}).pop("release", None)
        if o["kind"] == "ConfigMap":
            o["metadata"].pop("annotations", None)
        return o
    kps = kustomize(KPS)
    amc = [strip(o) for o in kps if o["kind"] == "AlertmanagerConfig"]
    assert amc == [yaml.safe_load((ROOT / "deploy/components/alertmanagerconfig/alertmanagerconfig.yaml").read_text())]
    assert [strip(o) for o in kps if o["kind"] != "AlertmanagerConfig"] == [
        strip(o) for o in kustomize("deploy/overlays/example")]


def test_component_labels_a_podmonitor_too(tmp_path: Path) -> None:
    """An overlay choosing the PodMonitor gets it labelled as well (the component patches every CRD kind)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    def rel(p: Path) -> str:  # kustomize refuses absolute paths
        return os.path.relpath(p, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(ROOT / "deploy" / "base")],
        "components": [rel(ROOT / "deploy" / "components" / c)
                       for c in ("podmonitor", "prometheusrule", "kube-prometheus-stack")]}))
    objs = kustomize(str(overlay))
    pm = one(objs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "ServiceMonitor" not in {o["kind"] for o in objs}
    policy.validate_core(objs)
    policy.check_monitor_feeds_the_rules(objs)


def test_chart_values_file_matches_the_kustomize_component() -> None:
    """The chart's kube-prometheus-stack values and the kustomize component put the same release label and
    folder annotation on the same kinds."""
    h = helm_template("conntrack-dns-exporter", "conntrack-dns-exporter",
                      str(ROOT / "deploy/helm/conntrack-dns-exporter/values-kube-prometheus-stack.yaml"))
    k = kustomize(KPS)
    for kind in ("ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"):
        assert one(h, kind)["metadata"]["labels"]["release"] == one(k, kind)["metadata"]["labels"]["release"]
    assert one(h, "AlertmanagerConfig")["spec"] == one(k, "AlertmanagerConfig")["spec"]
    assert one(h, "ConfigMap")["metadata"]["annotations"] == one(k, "ConfigMap")["metadata"]["annotations"]
