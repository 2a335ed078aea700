"""Which Kubernetes configuration the exporter picks (`--kubernetes.enabled=auto|true|false`), and how it
refuses a configuration it cannot use. No API server is contacted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.cli import parse_args
from exporter.core.errors import ConfigError
from exporter.core.feature import AppContext
from exporter.kubernetes import client, config, feature


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Not in a pod, no KUBECONFIG; the service account directory points into tmp_path."""
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "NODE_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(config, "IN_CLUSTER_TOKEN", str(tmp_path / "token"))
    monkeypatch.setattr(config, "IN_CLUSTER_CA", str(tmp_path / "ca.crt"))
    return tmp_path


def fake_pod(monkeypatch: pytest.MonkeyPatch, sa: Path) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (sa / "token").write_text("eyJhbGciOiJSUzI1NiJ9.test.token")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")


def kubeconfig(path: Path, server: str = "https://192.0.2.1:6443") -> str:
    path.write_text('{"apiVersion": "v1", "kind": "Config", "current-context": "c", '
                    f'"clusters": [{{"name": "k", "cluster": {{"server": "{server}"}}}}], '
                    '"users": [{"name": "u", "user": {"token": "t"}}], '
                    '"contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}')
    return str(path)


def test_auto_is_off_outside_a_cluster(no_cluster: Path) -> None:
    assert feature.resolve(parse_args([])) is None
    assert feature.FEATURE.build(parse_args([]), AppContext()).services == []


def test_true_without_configuration_is_refused(no_cluster: Path) -> None:
    with pytest.raises(ConfigError, match="no Kubernetes configuration"):
        feature.resolve(parse_args(["--kubernetes.enabled=true"]))


def test_in_a_pod_uses_the_service_account(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pod(monkeypatch, no_cluster)
    assert feature.resolve(parse_args([])) == (None, True)
    cfg = config.load_configuration(None, in_cluster=True)
    assert cfg.host == "https://10.96.0.1:443"
    assert cfg.auth_settings()["BearerToken"]["value"].split(" ", 1)[1] == "eyJhbGciOiJSUzI1NiJ9.test.token"
    assert cfg.ssl_ca_cert == str(no_cluster / "ca.crt")
    assert cfg.retries is False  # retries are ours (backoff + metric), not silent urllib3 ones
    # An explicit kubeconfig wins over the pod's service account; `false` wins over everything.
    path = kubeconfig(no_cluster / "kc")
    assert feature.resolve(parse_args([f"--kubernetes.kubeconfig={path}"])) == (path, False)
    assert feature.resolve(parse_args(["--kubernetes.enabled=false"])) is None


def test_kubeconfig_env_and_bad_file(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", kubeconfig(no_cluster / "kc", "https://192.0.2.7:6443"))
    args = parse_args(["--kubernetes.node-name=node-1"])
    assert feature.resolve(args) == (None, False)
    built = feature.FEATURE.build(args, AppContext())  # builds, does not start: no request is sent
    assert [c.name for c in built.collectors] == ["kubernetes"] and len(built.services) == 1
    (no_cluster / "kc").write_text("clusters: [unterminated")
    with pytest.raises(ConfigError, match="cannot load Kubernetes configuration"):
        feature.FEATURE.build(args, AppContext())


def test_node_name_from_the_downward_api_is_checked(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", kubeconfig(no_cluster / "kc"))
    monkeypatch.setenv("NODE_NAME", "Not A Node!")
    with pytest.raises(SystemExit) as e:
        parse_args([])
    assert e.value.code == 2
    monkeypatch.setenv("NODE_NAME", "ip-10-0-1-23.eu-west-1.compute.internal")
    assert parse_args([]).kubernetes_node_name == "ip-10-0-1-23.eu-west-1.compute.internal"


@pytest.mark.parametrize("text", ["kube-dns", "/kube-dns", "kube-system/", "Kube-System/kube-dns", "a/b/c"])
def test_bad_dns_service_values(text: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args([f"--kubernetes.dns-service={text}"])
    assert e.value.code == 2


def test_forbidden_message_names_the_rule() -> None:
    msg = client.forbidden_message("pods", "watch", "")
    assert "watch on pods cluster-wide" in msg and 'ClusterRole rule apiGroups=[""] resources=["pods"]' in msg
    msg = client.forbidden_message("services", "get", "dns")
    assert 'Role rule apiGroups=[""] resources=["services"] verbs=[get] in namespace dns' in msg
