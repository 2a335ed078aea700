"""End to end: the exporter in the lab's node namespace, scraped every second by a real Prometheus that loads
the shipped rules (and an accelerated copy, see tests/e2e/stack.py), a real Alertmanager routing to a webhook
receiver in this test, and the shipped Grafana dashboard's queries run against that Prometheus.

The exporter runs as the DaemonSet runs it (`--web.notrack`, Kubernetes discovery, DNS probes, table scan).
Kubernetes discovery talks to the project's stand-in API server (tests/support/fakeapi.py: no real
kube-apiserver can run here), serving the lab's DNS Service IP and its two live backends as EndpointSlice
endpoints, so the exporter probes `kind="service"` (through the lab's DNAT) and `kind="endpoint"` targets.

Faults come from the lab: the table filled to 92% and to 100%, a stale endpoint in the Service's DNAT; the
insert_failed case replays the recorded fixture tests/fixtures/conntrack-insert-failed.json. Each fault is
healed and the alert must resolve at the receiver.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import ACCELERATED, JOB, Stack, missing_binaries, wait_until
from tests.lab import Lab
from tests.support import fakeapi
from tests.support.exporter_proc import Exporter, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.lab]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "conntrack-dns-exporter.json"
INSERT_FAILED_FIXTURE = ROOT / "tests" / "fixtures" / "conntrack-insert-failed.json"
NODE = "lab-node"
PORT = 19261  # in the lab's node namespace
RUNBOOK_PREFIX = "https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/runbooks/"


class Env:
    def __init__(self, lab: Lab, stack: Stack, exporter: Any) -> None:
        self.lab, self.stack, self.exporter = lab, stack, exporter
        self.instance = f"{lab.host_node_ip}:{PORT}"

    def labels(self, alertname: str, severity: str) -> dict[str, str]:
        return {"alertname": alertname, "severity": severity, "job": JOB, "instance": self.instance,
                "node": NODE, **ACCELERATED}


@pytest.fixture(scope="module")
def env(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages prometheus, prometheus-alertmanager)")
    api = fakeapi.FakeAPI(host=lab.host_root_ip).start()
    api.put(fakeapi.service("kube-system", "kube-dns", lab.service_ip))
    api.put(fakeapi.endpoint_slice("kube-system", "kube-dns", "kube-dns-e2e", [
        fakeapi.Endpoint(b.ip, f"coredns-e2e-{i}", node=NODE) for i, b in enumerate(lab.backends)]))
    workdir = tmp_path_factory.mktemp("e2e-stack")
    kubeconfig = api.write_kubeconfig(str(workdir / "kubeconfig"))
    exporter = lab.start_exporter(
        "--web.notrack", "--collector.dns", "--kubernetes.enabled=true", f"--kubernetes.kubeconfig={kubeconfig}",
        f"--kubernetes.node-name={NODE}", f"--probe.nodelocal={lab.nodelocal_ip}", "--probe.interval=1s",
        "--probe.timeout=1s",
        "--collector.table.interval=10s", "--collector.table.cpu-budget=0", port=PORT)
    stack = Stack(workdir, f"{lab.host_node_ip}:{PORT}", NODE)
    try:
        stack.start()
        e = Env(lab, stack, exporter)
        wait_until("first scrapes with probe data", lambda: stack.query(
            f'count(dns_probe_requests_total{{job="{JOB}", node="{NODE}"}}) > 0'), 60)
        yield e
    finally:
        stack.stop()
        exporter.stop()
        api.stop()


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_every_dashboard_query_returns_data(env: Env) -> None:
    """Grafana substitutes $job, $node, $instance (All -> .*) and $__rate_interval; every query must return
    series."""
    # Rates and histogram quantiles need two samples of every series inside the window, and the table scan
    # needs to have run once.
    wait_until("a table scan", lambda: env.stack.query(f'conntrack_table_scan_entries{{node="{NODE}"}} > 0'), 60)
    time.sleep(3)
    empty = []
    for title, expr in _panel_queries():
        if title == "Firing alerts of this exporter":
            continue  # empty while healthy; tests/unit/test_dashboard.py runs it against firing shipped rules
        q = (expr.replace("$__rate_interval", "30s").replace("$job", JOB).replace("$node", ".*")
             .replace("$instance", ".*"))
        if not env.stack.query(q):
            empty.append(f"{title}: {q}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_healthy_lab_fires_none_of_the_provoked_alerts(env: Env) -> None:
    for name in ("ConntrackTableNearFull", "ConntrackDroppingPackets", "DNSServiceIPPathBroken",
                 "ConntrackInsertFailed"):
        for accelerated in (True, False):
            for state in ("pending", "firing"):
                assert not env.stack.alerts(name, state, accelerated, node=NODE), (name, state, accelerated)


def _check_annotations(alert: dict[str, Any], name: str, *fragments: str) -> None:
    ann = alert["annotations"]
    assert ann["runbook_url"] == f"{RUNBOOK_PREFIX}{name}.md"
    assert ann["summary"]
    for f in fragments:
        assert f in ann["description"], (f, ann["description"])


def test_service_ip_path_broken_by_a_stale_endpoint(healthy_lab: Lab, env: Env) -> None:
    """Runs before the table-full tests on purpose: those make every probe fail, endpoints included, and the
    shipped rule (5m windows) then rightly refuses to blame the Service path for the next 5 minutes."""
    start = time.monotonic()
    healthy_lab.fault("stale-endpoint")
    alert = env.stack.webhook.wait("firing", after=start, timeout=90,
                                   **env.labels("DNSServiceIPPathBroken", "critical"))
    _check_annotations(alert, "DNSServiceIPPathBroken", f"On node {NODE}", "%")
    assert env.stack.alerts("DNSServiceIPPathBroken", "pending", accelerated=False, node=NODE)
    healed = time.monotonic()
    healthy_lab.heal("stale-endpoint")
    env.stack.webhook.wait("resolved", after=healed, timeout=90, **env.labels("DNSServiceIPPathBroken", "critical"))


def test_table_near_full(healthy_lab: Lab, env: Env) -> None:
    start = time.monotonic()
    healthy_lab.fault("table-full", 92)
    alert = env.stack.webhook.wait("firing", after=start, **env.labels("ConntrackTableNearFull", "critical"))
    assert alert["receiver"] == "webhook"
    _check_annotations(alert, "ConntrackTableNearFull", f"node {NODE}", "92")
    # The shipped rule (for: 5m) sees the same condition and waits.
    assert env.stack.alerts("ConntrackTableNearFull", "pending", accelerated=False, node=NODE)
    assert not env.stack.alerts("ConntrackTableNearFull", "firing", accelerated=False, node=NODE)
    assert not [a for a in env.stack.webhook.matching("firing", alertname="ConntrackTableNearFull")
                if "ruleset" not in a["labels"]], "the shipped rule must not fire before its 5m"
    healed = time.monotonic()
    healthy_lab.heal("table-full")
    env.stack.webhook.wait("resolved", after=healed, **env.labels("ConntrackTableNearFull", "critical"))
    # The shipped group evaluates on its own schedule: give it a few evaluations to drop the pending alert.
    wait_until("the shipped ConntrackTableNearFull to leave pending",
               lambda: not env.stack.alerts("ConntrackTableNearFull", "pending", accelerated=False, node=NODE), 10)


def test_dropping_packets_at_100_percent(healthy_lab: Lab, env: Env) -> None:
    start = time.monotonic()
    healthy_lab.fault("table-full", 100)
    # Traffic: the exporter's own probes need new conntrack entries every second; at 100% they are dropped.
    alert = env.stack.webhook.wait("firing", after=start, timeout=90,
                                   **env.labels("ConntrackDroppingPackets", "critical"))
    _check_annotations(alert, "ConntrackDroppingPackets", f"Node {NODE} dropped")
    # This rule has no `for`: the shipped rule fires too, through the same Alertmanager.
    shipped = wait_until("the shipped ConntrackDroppingPackets", lambda: [
        a for a in env.stack.webhook.matching("firing", alertname="ConntrackDroppingPackets", node=NODE)
        if "ruleset" not in a["labels"] and a["received"] >= start], 30)
    assert shipped[-1]["labels"]["severity"] == "critical"
    # Scrapes kept working at 100% (NOTRACK on the exporter's port, keep-alive): the alert came from fresh data.
    assert env.stack.target_health(env.instance) == "up"
    healed = time.monotonic()
    healthy_lab.heal("table-full")
    env.stack.webhook.wait("resolved", after=healed, timeout=90, **env.labels("ConntrackDroppingPackets", "critical"))


def test_insert_failed_from_a_recorded_fixture(env: Env) -> None:
    """A second exporter replays a recording whose insert_failed grows for five samples and then stays flat:
    the alert fires while it grows and resolves once it stops."""
    port = free_port()
    replay = Exporter(["--collector.conntrack.fixtures", str(INSERT_FAILED_FIXTURE), "--no-collector.table",
                       "--kubernetes.enabled=false", "--no-collector.dns"], port=port,
                      env={k: v for k, v in os.environ.items() if k.startswith("CONNTRACK_DNS_EXPORTER_")})
    try:
        replay.wait_ready()
        start = time.monotonic()
        env.stack.add_target(f"127.0.0.1:{port}", node="replay-node")
        labels = {"alertname": "ConntrackInsertFailed", "severity": "warning", "job": JOB,
                  "instance": f"127.0.0.1:{port}", "node": "replay-node", **ACCELERATED}
        alert = env.stack.webhook.wait("firing", after=start, timeout=60, **labels)
        _check_annotations(alert, "ConntrackInsertFailed", "Node replay-node failed to insert")
        assert wait_until("the shipped ConntrackInsertFailed", lambda: [
            a for a in env.stack.webhook.matching("firing", alertname="ConntrackInsertFailed", node="replay-node")
            if "ruleset" not in a["labels"]], 30)
        env.stack.webhook.wait("resolved", after=start, timeout=60, **labels)
    finally:
        replay.stop()
