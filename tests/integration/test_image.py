"""The real image, built and run as a cluster runs it (issue 13, items 8-10).

Builds the project's Dockerfile with Debian's podman/buildah on a local bookworm base (no registry here;
tests/support/image.py says how and why podman can never set up its bridge network), then runs it:
- with podman and every capability dropped, `IMAGE --version` (what `docker run IMAGE --version` does);
- with runc and the OCI spec containerd writes for deploy/base's DaemonSet container: its uid/gid, read-only
  root, in-memory /tmp, RuntimeDefault seccomp, capabilities exactly `add` (NET_ADMIN), no_new_privs from
  `allowPrivilegeEscalation: false`, its args (plus no Kubernetes API and no DNS probes: neither exists in
  the test's network namespace), inside a fresh network namespace the test scrapes;
- the same without NET_ADMIN (removed by a policy): it must still serve.
The machine's own nft ruleset and ip_forward are checked unchanged afterwards.

Slow (about 45 s with the base in place, of which the build is about 40 s; about 2 min the first time):
marked `image` and skipped unless CDET_IMAGE_TEST=1 (`make image-test` sets it). Needs root, podman, runc,
mmdebstrap.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter import __version__
from tests.support import image
from tests.support.exporter_proc import Samples, parse, value
from tests.support.netns import Netns

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/conntrack-dns-exporter:image-test"
NOTRACK = ("inet", "conntrack_dns_exporter_notrack")
# Nothing to reach in the test's namespace: no API server, no DNS server.
OFFLINE = ["--kubernetes.enabled=false", "--no-collector.dns"]

pytestmark = [pytest.mark.image, pytest.mark.slow,
              pytest.mark.skipif(image.skip_reason() is not None, reason=image.skip_reason() or "")]


def _machine_network_state() -> tuple[str, str]:
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return ruleset, Path("/proc/sys/net/ipv4/ip_forward").read_text()


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest) -> Iterator[str]:
    before = _machine_network_state()
    context = Path(tempfile.mkdtemp(prefix="cdet-image-ctx-"))
    try:
        # The build context .dockerignore lets through (tests/unit/test_dockerfile.py checks that list).
        for name in ("Dockerfile", "pyproject.toml", "README.md", "LICENSE", "requirements.lock"):
            shutil.copy(ROOT / name, context)
        shutil.copytree(ROOT / "exporter", context / "exporter",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_build.py", "*.so"))
        base_s = image.ensure_base()
        build_s = image.build(context, TAG)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"image: base {base_s:.0f} s (0 = cached), build {build_s:.0f} s")
        yield TAG
    finally:
        shutil.rmtree(context, ignore_errors=True)
        image.podman("rmi", "--force", TAG, check=False)
        image.podman("image", "prune", "--force", check=False)  # the untagged build stage
        assert _machine_network_state() == before, "podman changed the machine's nft ruleset or ip_forward"


def _daemonset_container() -> tuple[dict[str, Any], dict[str, Any]]:
    ds = yaml.safe_load((ROOT / "deploy" / "base" / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return pod, c


def _spec_as_the_daemonset(rootfs: Path, cfg: dict[str, Any], netns: Netns, *, net_admin: bool) -> dict[str, Any]:
    pod, c = _daemonset_container()
    sc, psc = c["securityContext"], pod["securityContext"]
    caps = [cap for cap in sc["capabilities"]["add"] if net_admin or cap != "NET_ADMIN"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    return image.runc_spec(
        rootfs, args=[*cfg["Entrypoint"], *c["args"], *OFFLINE],
        env=[*cfg["Env"], "NODE_NAME=image-test-node"],
        uid=int(sc.get("runAsUser", psc["runAsUser"])), gid=int(sc.get("runAsGroup", psc["runAsGroup"])),
        caps=caps, no_new_privs=not sc["allowPrivilegeEscalation"], read_only_root=sc["readOnlyRootFilesystem"],
        netns=netns.name)


def _scrape(netns: Netns, ctr: image.RuncContainer, port: int = 19153, timeout: float = 20) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        if ctr.proc.poll() is not None:
            raise AssertionError(f"container exited with {ctr.proc.returncode}:\n{ctr.stderr()}")
        try:
            sock = netns.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.sock = sock
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            assert resp.status == 200, body
            return parse(body)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"/metrics never answered:\n{ctr.stderr()}") from None
            time.sleep(0.2)


def _scrape_until(netns: Netns, ctr: image.RuncContainer, done: Callable[[Samples], bool], timeout: float = 20
                  ) -> Samples:
    """Scrape until `done` holds (the table's first scan runs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(netns, ctr)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def _status_caps(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v, 16) for k, v in (ln.split(":\t") for ln in lines if ln.startswith("Cap"))}


def _log(ctr: image.RuncContainer) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in ctr.stderr().splitlines() if ln.startswith("{")]


def _notrack_table(netns: Netns) -> bool:
    return netns.exec(["nft", "list", "table", *NOTRACK], check=False).returncode == 0


def test_version_without_any_capability(built: str) -> None:
    """`docker run IMAGE --version` with no NET_ADMIN in the bounding set: the exec must not fail."""
    r = image.podman("run", "--rm", "--network", "none", "--cap-drop", "all", built, "--version", check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"conntrack-dns-exporter {__version__}", r.stderr


def test_runs_as_65532_with_its_own_group(built: str) -> None:
    r = image.podman("run", "--rm", "--network", "none", "--cap-drop", "all", "--entrypoint", "id", built, check=False)
    assert r.stdout.strip() == "uid=65532(exporter) gid=65532(exporter) groups=65532(exporter)", r.stdout + r.stderr


def test_as_the_daemonset_runs_it_with_net_admin(built: str, netns: Netns, tmp_path: Path) -> None:
    with image.mounted(built) as rootfs, image.RuncContainer(
            _spec_as_the_daemonset(rootfs, image.image_config(built), netns, net_admin=True), tmp_path) as ctr:
        samples = _scrape_until(
            netns, ctr, lambda s: value(s, "conntrack_table_last_scan_timestamp_seconds") is not None)
        pid = ctr.pid()
        assert pid is not None
        sets = _status_caps(pid)
        assert _notrack_table(netns), ctr.stderr()
        code = ctr.stop()
    assert value(samples, "conntrack_dns_exporter_collector_success", collector="conntrack") == 1.0, ctr.stderr()
    assert value(samples, "conntrack_dns_exporter_collector_success", collector="table") == 1.0, ctr.stderr()
    assert value(samples, "conntrack_table_scan_partial") == 0.0
    # the native dump parser and event drain were compiled in the build stage and shipped in the wheel
    info = [dict(labels) for name, labels in samples if name == "conntrack_dns_exporter_build_info"]
    assert [i["table_parser"] for i in info] == ["native"], info
    assert [i["event_parser"] for i in info] == ["native"], info  # the DNS-flow listener's event drain too
    assert value(samples, "conntrack_entries") is not None
    assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 1.0
    # exactly NET_ADMIN, effective, with allowPrivilegeEscalation: false (no_new_privs)
    assert sets["CapEff"] == sets["CapPrm"] == sets["CapBnd"] == 1 << 12, sets
    assert code == 0, ctr.stderr()
    assert not _notrack_table(netns), "SIGTERM must remove the NOTRACK table"
    assert not [e for e in _log(ctr) if e["level"] in ("warn", "error")], ctr.stderr()


def test_as_the_daemonset_runs_it_without_net_admin(built: str, netns: Netns, tmp_path: Path) -> None:
    """A policy removed NET_ADMIN: the pod serves (probes would still run) and says why, once."""
    with image.mounted(built) as rootfs, image.RuncContainer(
            _spec_as_the_daemonset(rootfs, image.image_config(built), netns, net_admin=False), tmp_path) as ctr:
        scrapes = [_scrape_until(netns, ctr, lambda s: value(
            s, "conntrack_dns_exporter_collector_success", collector="table") == 0.0)]
        scrapes += [_scrape(netns, ctr) for _ in range(2)]
        code = ctr.stop()
    last = scrapes[-1]
    assert value(last, "conntrack_dns_exporter_collector_success", collector="conntrack") == 0.0
    errors = [value(x, "conntrack_dns_exporter_collector_errors_total", collector="conntrack", reason="permission")
              for x in scrapes]
    assert errors[1] == errors[0] + 1 and errors[2] == errors[1] + 1, errors  # each scrape tries, and counts
    assert value(last, "conntrack_entries") is None
    assert value(last, "conntrack_dns_exporter_collector_success", collector="table") == 0.0
    assert value(last, "conntrack_dns_exporter_web_notrack_rule_present") == 0.0
    assert not _notrack_table(netns)
    log = _log(ctr)
    conntrack = [e for e in log if e.get("collector") == "conntrack" and e["level"] == "warn"]
    assert len(conntrack) == 1 and "CAP_NET_ADMIN" in conntrack[0]["msg"], ctr.stderr()
    notrack = [e for e in log if "--web.notrack" in e["msg"]]
    assert len(notrack) == 1 and "bounding set" in notrack[0]["msg"], ctr.stderr()
    assert "Traceback" not in ctr.stderr()
    assert code == 0, ctr.stderr()
