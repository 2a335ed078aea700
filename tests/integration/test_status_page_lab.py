"""The `/` status page during a fault, in a real browser: Debian's headless Chromium loads the page the
exporter serves from the lab's node namespace and the verdict is read from its DOM; a screenshot is kept
as a test artefact (build/artifacts/status-page.png).

The Kubernetes API is a stand-in (`tests.support.fakeapi.FakeAPI`: the real API's JSON and watch
streams; no real kube-apiserver runs here) listing the lab's two backends as the DNS Service's endpoints.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.lab import Lab
from tests.support import fakeapi

pytestmark = [pytest.mark.lab, pytest.mark.slow]
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/bootstrap.sh installs it)")
def test_status_page_names_the_cause_in_a_real_browser(healthy_lab: Lab, tmp_path: Path) -> None:
    lab = healthy_lab
    api = fakeapi.FakeAPI(host=lab.host_root_ip).start()
    try:
        api.put(fakeapi.service("kube-system", "kube-dns", lab.service_ip))
        api.put(fakeapi.endpoint_slice("kube-system", "kube-dns", "kube-dns-page", [
            fakeapi.Endpoint(b.ip, f"coredns-page-{i}", node="node-page") for i, b in enumerate(lab.backends)]))
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        exp = lab.start_exporter("--collector.dns", "--kubernetes.enabled=true",
                                 f"--kubernetes.kubeconfig={kubeconfig}", "--kubernetes.node-name=node-page",
                                 "--probe.interval=1s", "--probe.timeout=500ms", f"--probe.name={lab.cluster_name}",
                                 "--no-collector.table")
        url = f"http://{lab.host_node_ip}:{exp.port}/"
        try:
            lab.fault("backend-down", 0)
            deadline = time.monotonic() + 45
            page = ""
            while time.monotonic() < deadline:
                page = urllib.request.urlopen(url, timeout=5).read().decode()
                if "CoreDNSPodNotAnswering" in page:
                    break
                time.sleep(1)
            assert "CoreDNSPodNotAnswering" in page, page[:2000]
            dom = chromium("--dump-dom", url)
            assert dom.returncode == 0, dom.stderr[-2000:]
            assert 'id="verdict"' in dom.stdout and "DEGRADED: CoreDNSPodNotAnswering" in dom.stdout
            assert "coredns-page-0" in dom.stdout and "CoreDNSPodNotAnswering.md" in dom.stdout
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            r = chromium(f"--screenshot={shot}", "--window-size=1200,1000", url)
            assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
        finally:
            exp.stop()
    finally:
        api.stop()
