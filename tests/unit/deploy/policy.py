"""The least-privilege and wiring assertions every rendered deployment is held to, whichever form rendered it
(kustomize overlays, the Helm chart with default and non-default values): the same functions, so a chart that
grants more than the kustomize base fails the same check. tests/unit/test_deploy.py holds the kustomize-only
ones (components, namespaces)."""

from __future__ import annotations

import re

import kubernetes_validate

from exporter.cli import parse_args

from .render import K8S_VERSION, ROOT, Obj, one, rbac_rules

CRD_GROUP = "monitoring.coreos.com/"


def validate_core(objs: tuple[Obj, ...]) -> None:
    """Every object without a CRD passes the Kubernetes schema, strictly (no unknown fields)."""
    assert objs
    for o in objs:
        if not o["apiVersion"].startswith(CRD_GROUP):
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def pod_spec(objs: tuple[Obj, ...]) -> Obj:
    spec: Obj = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(objs: tuple[Obj, ...]) -> Obj:
    cs = pod_spec(objs)["containers"]
    assert len(cs) == 1, "one container, no sidecars"
    c: Obj = cs[0]
    return c


def dockerfile_uid() -> int:
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert user
    return int(user.group(1))


def image_file_capability() -> str:
    """The flags of the interpreter's file capability in the Dockerfile (`ep` or `p`)."""
    m = re.search(r"setcap cap_net_admin\+(\w+) /opt/venv/bin/python", (ROOT / "Dockerfile").read_text())
    assert m, "the Dockerfile gives the venv interpreter a NET_ADMIN file capability"
    return m.group(1)


def check_pod_privileges(objs: tuple[Obj, ...]) -> None:
    """Only NET_ADMIN, non-root (the image's uid), read-only root filesystem, RuntimeDefault seccomp, not
    privileged; privilege escalation allowed only if the image's file capability needs it (docs/deploy.md)."""
    spec, c = pod_spec(objs), container(objs)
    assert spec["hostNetwork"] is True
    for flag in ("hostPID", "hostIPC"):
        assert not spec.get(flag), flag
    assert not spec.get("initContainers") and not spec.get("ephemeralContainers")
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert (sc.get("seccompProfile") or spec["securityContext"]["seccompProfile"]) == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid() != 0
    assert sc.get("runAsUser", spec["securityContext"]["runAsUser"]) != 0
    # Privilege escalation only where the image needs it: an effective file capability (`+ep`) is ignored under
    # no_new_privs (tests/integration/test_deploy_capabilities.py), a permitted-only one (`+p`) is not.
    assert sc["allowPrivilegeEscalation"] is (image_file_capability() == "ep"), "escalation beyond the image's need"
    # Only an in-memory /tmp is writable; nothing of the node's filesystem is mounted.
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}
    for v in spec["volumes"]:
        assert set(v) == {"name", "emptyDir"}, f"volume {v['name']} is not an emptyDir"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind


def check_wiring(objs: tuple[Obj, ...], port: int = 19153) -> None:
    """Flags the exporter accepts, the probes on its real endpoints, NODE_NAME from the downward API, and
    every ServiceMonitor/PodMonitor scraping the path the exporter serves its metrics on."""
    c = container(objs)
    args = parse_args(c["args"])  # an unknown flag exits 2 here
    assert args.web_notrack is True
    assert args.web_listen_address[1] == port
    for m in (o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")):
        for ep in m["spec"].get("endpoints", []) + m["spec"].get("podMetricsEndpoints", []):
            assert ep["path"] == args.web_telemetry_path, m["kind"]
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["metrics"]["containerPort"] == ports["metrics"]["hostPort"] == port
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert (ports[get["port"]]["containerPort"] if isinstance(get["port"], str) else get["port"]) == port
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod_spec(objs)["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert 3 <= pod_spec(objs)["terminationGracePeriodSeconds"] <= 10


def granted(objs: tuple[Obj, ...]) -> set[tuple[str, str, str, str, tuple[str, ...]]]:
    """(scope, apiGroup, resource, verb, resourceNames) granted to the exporter's ServiceAccount."""
    sa = one(objs, "ServiceAccount")
    out = set()
    bindings = [o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                  "namespace": sa["metadata"]["namespace"]}]
        ref = b["roleRef"]
        role = next(o for o in objs if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]
                    and o["metadata"].get("namespace") == b["metadata"].get("namespace"))
        scope = b["metadata"].get("namespace", "*")
        for r in role["rules"]:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    for v in r["verbs"]:
                        out.add((scope, g, res, v, tuple(r.get("resourceNames", ()))))
    return out


def check_rbac(objs: tuple[Obj, ...], dns_namespace: str = "kube-system", dns_name: str = "kube-dns") -> None:
    """Exactly what the discovery calls, in the DNS Service's namespace; pods are the only cluster-wide grant."""
    g = granted(objs)
    assert g == {
        (dns_namespace, "", "services", "get", (dns_name,)),
        (dns_namespace, "discovery.k8s.io", "endpointslices", "list", ()),
        (dns_namespace, "discovery.k8s.io", "endpointslices", "watch", ()),
        ("*", "", "pods", "list", ()),
        ("*", "", "pods", "watch", ()),
    }
    for group, resource, verbs in rbac_rules().values():
        for verb in (v.strip() for v in verbs.split(",")):
            assert any(gr == group and r == resource and v == verb for _s, gr, r, v, _n in g), (resource, verb)
    for o in objs:
        if o["kind"] in ("Role", "ClusterRole"):
            assert o["kind"] == "Role" or all(r["resources"] == ["pods"] for r in o["rules"])
            for r in o["rules"]:
                assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"], "no wildcard grants"


def check_headless_service(objs: tuple[Obj, ...], port: int = 19153) -> None:
    svc, ds = one(objs, "Service"), one(objs, "DaemonSet")
    assert svc["spec"]["clusterIP"] == "None", "scrapes must not go through kube-proxy's DNAT"
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (p,) = svc["spec"]["ports"]
    assert p["port"] == port and p["targetPort"] == "metrics"


def rules_jobs(rule_spec: Obj) -> set[str]:
    """Every job="..." the rules select."""
    return {j for g in rule_spec["groups"] for r in g["rules"] for j in re.findall(r'job="([^"]*)"', r["expr"])}


def check_monitor_feeds_the_rules(objs: tuple[Obj, ...]) -> None:
    """The scrape (ServiceMonitor: job = Service name; PodMonitor: relabelled job) gives the job the
    PrometheusRule selects, and the `node` label the alerts and dashboard name nodes by."""
    pr = one(objs, "PrometheusRule")
    (job,) = rules_jobs(pr["spec"])
    monitors = [o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    assert monitors
    ds = one(objs, "DaemonSet")
    for m in monitors:
        assert m["metadata"]["namespace"] in m["spec"]["namespaceSelector"]["matchNames"]
        key = "endpoints" if m["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
        (ep,) = m["spec"][key]
        assert ep["port"] == "metrics"
        assert int(ep["scrapeTimeout"].rstrip("s")) < int(ep["interval"].rstrip("s"))
        relabel = ep["relabelings"]
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
                "action": "replace"} in relabel
        forced = [r["replacement"] for r in relabel if r.get("targetLabel") == "job"]
        if m["kind"] == "ServiceMonitor":
            svc = one(objs, "Service")
            assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            assert "jobLabel" not in m["spec"]
            assert (forced or [svc["metadata"]["name"]])[-1] == job
        else:
            assert m["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
            assert forced[-1:] == [job], "a PodMonitor's default job is <namespace>/<name>"


def only_crd_objects_are(objs: tuple[Obj, ...]) -> set[str]:
    return {o["kind"] for o in objs if o["apiVersion"].startswith(CRD_GROUP)}


