"""Which Kubernetes configuration the exporter picks (`--kubernetes.enabled=auto|true|false`), and how it
refuses a configuration it cannot use. No API server is contacted here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from exporter.cli import parse_args
from exporter.core.errors import ConfigError
from exporter.core.feature import AppContext
from exporter.kubernetes import client, config, feature
from exporter.kubernetes.incluster import InClusterConfig


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Not in a pod, no KUBECONFIG; the service account directory points into tmp_path."""
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "NODE_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONNTRACK_DNS_EXPORTER_KUBERNETES_SERVICE_ACCOUNT_DIR", str(tmp_path))
    return tmp_path


def fake_pod(monkeypatch: pytest.MonkeyPatch, sa: Path) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (sa / "token").write_text("eyJhbGciOiJSUzI1NiJ9.test.token")
    shutil.copy(certifi_ca(), sa / "ca.crt")


def certifi_ca() -> str:
    """A real PEM bundle (Python's TLS context refuses a fake certificate)."""
    import ssl

    path = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    assert os.path.isfile(path), path
    return path


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
    args = parse_args([])
    cfg = config.load_configuration(None, True, args.kubernetes_service_account_dir)
    assert isinstance(cfg, InClusterConfig)  # the standard-library client, not the `kubernetes` package
    assert cfg.host == "https://10.96.0.1:443"
    assert cfg.token() == "eyJhbGciOiJSUzI1NiJ9.test.token"
    assert cfg.ca_file == str(no_cluster / "ca.crt")
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


def test_in_cluster_configuration_errors_are_one_line(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pod(monkeypatch, no_cluster)
    (no_cluster / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    args = parse_args([])
    with pytest.raises(ConfigError, match="in-cluster service account: cannot load the service account CA") as e:
        feature.FEATURE.build(args, AppContext())
    assert "\n" not in str(e.value)
    shutil.copy(certifi_ca(), no_cluster / "ca.crt")
    (no_cluster / "token").write_text("  \n")
    with pytest.raises(ConfigError, match=r"token .* is empty"):
        feature.FEATURE.build(args, AppContext())
    (no_cluster / "token").write_text("t")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "https")
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_PORT is not a port"):
        feature.FEATURE.build(args, AppContext())


def test_rotated_token_is_read_again(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet replaces the projected token file: the next request carries the new token; after a 401
    the file is read again even if it looks unchanged; a file briefly missing keeps the last token."""
    fake_pod(monkeypatch, no_cluster)
    cfg = InClusterConfig.load(str(no_cluster))
    tmp = no_cluster / "new"
    tmp.write_text("second")
    os.replace(tmp, no_cluster / "token")
    assert cfg.token() == "second"
    (no_cluster / "token").unlink()
    assert cfg.token() == "second"
    (no_cluster / "token").write_text("third")
    st = os.stat(no_cluster / "token")
    cfg.token()
    (no_cluster / "token").write_text("forth")  # same size; force the old mtime: looks unchanged
    os.utime(no_cluster / "token", ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg.token_rejected()
    assert cfg.token() == "forth"


@pytest.mark.parametrize("text", ["10.0.0.1", "api.example.com:6443", "10.0.0.1:0", "10.0.0.1:70000", "[::1]"])
def test_bad_api_server_addresses(text: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args([f"--kubernetes.api-server-address={text}"])
    assert e.value.code == 2


def test_api_server_address_is_exempted_with_web_notrack(no_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pod with --web.notrack, the API server's own address becomes a flow the NOTRACK table exempts,
    the client connects from the exempt ports and checks the certificate for kubernetes.default.svc."""
    fake_pod(monkeypatch, no_cluster)
    ctx = AppContext()
    built = feature.FEATURE.build(parse_args(["--web.notrack", "--kubernetes.api-server-address=[fd00::1]:6443"]),
                                  ctx)
    assert [(f.address, f.port, f.local_ports) for f in ctx.notrack_flows] == [("fd00::1", 6443, range(19154, 19170))]
    watcher = built.services[0]
    assert watcher.host == "https://[fd00::1]:6443"  # type: ignore[attr-defined]
    ctx = AppContext()
    feature.FEATURE.build(parse_args(["--web.notrack"]), ctx)  # the Service IP: DNAT needs conntrack
    assert ctx.notrack_flows == []
